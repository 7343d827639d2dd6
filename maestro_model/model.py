"""MAESTRO: the masked autoencoder and its downstream network, numerically equal to IGNF/MAESTRO@6a30075.

One module holds everything, with the official state-dict key names (``patch_embed``, ``encoder``, ``encoder_inter``,
``enc_to_dec``, ``decoder``, ``embed_to_rec``, ``mask_token``, ``heads``) so official weights load unchanged.
Pipeline (model-spec §13): tokenize -> + encodings -> sequences -> (mask) -> encoders [-> shared inter-group blocks]
-> heads, or -> enc_to_dec -> mask tokens back -> + decoder encodings -> decoders -> pixels -> loss.
Official behaviour is the default; the paper's variants are options (model-spec §10), see :func:`build_model`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from maestro_data.errors import MaestroError
from maestro_data.manifest import Manifest, load_manifest
from maestro_data.stream.batch import BatchError, check_batch
from maestro_data.stream.device import normalise_tensor
from maestro_model import encodings as enc
from maestro_model.heads import MultilabelHead, SegmentationHead
from maestro_model.losses import ReconSpec, parse_loss, reconstruction_loss
from maestro_model.masking import (
    TRIMS,
    MaskConfig,
    Sequence,
    TokenLayout,
    from_rows,
    num_masked,
    sample_masks,
    to_rows,
    visible_index,
)
from maestro_model.taps import Tapped
from maestro_model.tokenizer import Patchify, Pixelify
from maestro_model.transformer import Transformer

DIM_KEYS = ("embed_dim", "depth", "heads", "dim_head", "mlp_ratio", "decoder_dim", "decoder_depth", "decoder_heads",
            "decoder_dim_head", "decoder_mlp_ratio")
# Official widths (model-spec §3.5); the decoder MLP width is decoder_mlp_ratio x the *encoder* width.
SIZES = {
    "tiny": (192, 12, 3, 64, 2, 512, 1, 16, 32, 4),
    "small": (384, 12, 6, 64, 2, 512, 2, 16, 32, 4),
    "base": (768, 12, 12, 64, 4, 512, 3, 16, 32, 4),
    "large": (1024, 24, 16, 64, 4, 512, 4, 16, 32, 4),
}
SIZE_ALIASES = {"medium": "base"}
FUSIONS = ("shared", "monotemp", "mod", "group", "inter-group")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
HEADS = ("attentive", "linear")
MULTISPECTRAL = ("joint", "token")
PHASES = ("pretrain", "probe", "finetune")
DEFAULT_INTER_DEPTH = 3
OTHER_OPTIONS = ("pos_grid", "loss", "norm", "loss_weighting", "interpolate", "date_encoding", "head", "debug_checks")
MASK_OPTIONS = {"mask_ratio": "ratio", "mask_scale": "scale", "mask_mod": "p_mod", "mask_bands": "p_bands",
                "mask_dates": "p_dates", "mask_loc": "p_loc", "trim": "trim"}


class ModelError(MaestroError):
    """The model cannot be built as asked (unknown size/fusion/option, inconsistent manifest) or run on its input."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything besides the manifest that defines a model; stored with our checkpoints."""

    size: str = "base"
    fusion: str = "inter-group"
    multispectral: str = "joint"
    inter_depth: int = DEFAULT_INTER_DEPTH
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    mlp_ratio: int = 4
    decoder_dim: int = 512
    decoder_depth: int = 3
    decoder_heads: int = 16
    decoder_dim_head: int = 32
    decoder_mlp_ratio: int = 4
    pos_grid: str = "official"      # official: manifest grid_pos_enc; lcm: the paper's LCM of the token grids
    loss: str = "l1_norm"           # l1/l2 distance; the _norm suffix = patch-group-wise target normalisation
    norm: str | None = None         # overrides the normalisation implied by `loss`: patch-group | patch | none
    loss_weighting: str = "official"  # official: modalities weighted by token count; paper: every group equally
    mask: MaskConfig = field(default_factory=MaskConfig)
    interpolate: str = "nearest"    # how inputs are resized to a modality's model_image_size (official default)
    date_encoding: bool = True      # False: the official use_date_enc=False ablation (temporal encodings x 0)
    head: str = "attentive"         # attentive pooling, or linear: a plain mean over tokens (official type_head)
    debug_checks: bool = False      # NaN/inf checks on inputs and intermediates (a device sync each): off by default


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]   # per modality masked-mean term
    pixels: dict[str, torch.Tensor]   # per modality [B, D, C, H, W] reconstruction (not normalised)
    mask: dict[str, torch.Tensor]     # per modality bool [B, G*D, L] token mask (True = masked)


def build_model(manifest: Manifest | str, size: str = "base", fusion: str = "inter-group", *,
                multispectral: str = "joint", inter_depth: int | None = None, **options) -> MaestroModel:
    """Build MAESTRO for ``manifest``. ``size``: tiny | small | base (alias medium) | large, each dimension
    overridable (``embed_dim``, ``depth``, ...). ``fusion``: shared | monotemp | mod | group | inter-group
    (= group + ``inter_depth`` shared blocks, default 3). Other options: see :class:`ModelConfig` and
    ``mask_ratio``, ``mask_scale``, ``mask_mod``, ``mask_bands``, ``mask_dates``, ``mask_loc``, ``trim``."""
    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    size = SIZE_ALIASES.get(size, size)
    if size not in SIZES:
        raise ModelError(f"size must be one of {', '.join([*SIZES, *SIZE_ALIASES])}, got {size!r}")
    if fusion not in FUSIONS:
        raise ModelError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if multispectral not in MULTISPECTRAL:
        raise ModelError(f"multispectral must be one of {', '.join(MULTISPECTRAL)}, got {multispectral!r}")
    if inter_depth is None:
        inter_depth = DEFAULT_INTER_DEPTH if fusion == "inter-group" else 0
    if fusion == "inter-group" and inter_depth < 1:
        raise ModelError(f"fusion 'inter-group' needs inter_depth >= 1, got {inter_depth}")
    if fusion in ("shared", "monotemp") and inter_depth:
        raise ModelError(f"inter_depth {inter_depth} needs fusion mod, group or inter-group, not {fusion!r}")
    dims = dict(zip(DIM_KEYS, SIZES[size], strict=True))
    mask_kw, rest = {}, {}
    for key, value in options.items():
        if key in DIM_KEYS:
            dims[key] = value
        elif key in MASK_OPTIONS:
            mask_kw[MASK_OPTIONS[key]] = value
        elif key in OTHER_OPTIONS:
            rest[key] = value
        else:
            valid = sorted([*DIM_KEYS, *MASK_OPTIONS, *OTHER_OPTIONS])
            raise ModelError(f"unknown model option {key!r} (valid: {', '.join(valid)})")
    cfg = ModelConfig(size=size, fusion=fusion, multispectral=multispectral, inter_depth=inter_depth, **dims,
                      mask=MaskConfig(**mask_kw), **rest)
    return MaestroModel(manifest, cfg)


def resize_and_rescale(x: torch.Tensor, size: int, mode: str, rescale_elev: bool) -> torch.Tensor:
    """``[B, D, C, H, W]`` -> every date resized to ``size`` x ``size`` (``mode``; skipped when already that size),
    then for elevation channel 1 := 30 * (ch0 - ch1): the official model's first step (``resize_and_rescale``)."""
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.flatten(0, 1), size=(size, size), mode=mode).unflatten(0, x.shape[:2])
    if rescale_elev:
        x = torch.cat([x[:, :, :1], 30 * (x[:, :, :1] - x[:, :, 1:2]), x[:, :, 2:]], dim=2)
    return x


def _validate(manifest: Manifest, cfg: ModelConfig) -> None:
    if cfg.inter_depth >= cfg.depth:
        raise ModelError(f"inter_depth {cfg.inter_depth} must be smaller than depth {cfg.depth}")
    for w, name in ((cfg.embed_dim, "embed_dim"), (cfg.decoder_dim, "decoder_dim")):
        if (w - enc.DATE_DIM) % 4 or w < 16:
            raise ModelError(f"{name} {w} must be 8 + a multiple of 4 (sine-cosine and date channels)")
    if cfg.embed_dim % 8:
        raise ModelError(f"embed_dim {cfg.embed_dim} must be divisible by the 8 attentive-pooling heads")
    if cfg.pos_grid not in enc.POS_GRIDS:
        raise ModelError(f"pos_grid must be one of {', '.join(enc.POS_GRIDS)}, got {cfg.pos_grid!r}")
    if cfg.mask.trim not in TRIMS:
        raise ModelError(f"trim must be one of {', '.join(TRIMS)}, got {cfg.mask.trim!r}")
    if not 0 < cfg.mask.ratio < 1:
        raise ModelError(f"mask_ratio must lie in (0, 1), got {cfg.mask.ratio}")
    try:
        parse_loss(cfg.loss, cfg.norm)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if cfg.interpolate not in INTERPOLATIONS:
        raise ModelError(f"interpolate must be one of {', '.join(INTERPOLATIONS)}, got {cfg.interpolate!r}")
    if cfg.head not in HEADS:
        raise ModelError(f"head must be one of {', '.join(HEADS)}, got {cfg.head!r}")
    if cfg.loss_weighting not in ("official", "paper"):
        raise ModelError(f"loss_weighting must be official or paper, got {cfg.loss_weighting!r}")
    for t in manifest.targets.values():
        if t.type == "segmentation":
            grid = manifest.modalities[manifest.ref_input].grid_size
            if t.image_size % grid:
                raise ModelError(f"{manifest.name}: segmentation target {t.name!r} of {t.image_size} px is not "
                                 f"divisible by the reference ({manifest.ref_input}) token grid {grid}")


class MaestroModel(Tapped, nn.Module):
    """MAESTRO for one manifest; ``forward(batch, phase)`` runs pre-training or the downstream heads."""

    def __init__(self, manifest: Manifest, config: ModelConfig):
        super().__init__()
        _validate(manifest, config)
        self.manifest, self.config = manifest, config
        c, ce, cd = config, config.embed_dim, config.decoder_dim
        mods = manifest.modalities
        self.bands = {m: (s.norm_groups if c.multispectral == "token" else (s.channels,)) for m, s in mods.items()}
        self.layouts = {m: TokenLayout(m, len(self.bands[m]), s.temporal_bins, s.grid_size ** 2)
                        for m, s in mods.items()}
        if c.fusion in ("shared", "monotemp", "mod"):
            self.sequences = [Sequence(m, (m,), c.fusion != "mod") for m in mods]
        else:
            self.sequences = [Sequence(g, members, False) for g, members in manifest.groups.items()]
        keys = ["shared"] if c.fusion == "shared" else [s.name for s in self.sequences]

        def blocks(dim: int, depth: int, heads: int, dim_head: int, mlp: int) -> Transformer:
            return Transformer(dim, depth, heads, dim_head, mlp)

        # modalities with one `embed` name share the patch embedding and pixel head (official name_embed)
        self.patch_embed, self.embed_to_rec = nn.ModuleDict(), nn.ModuleDict()
        for m, s in mods.items():
            if s.embed_name not in self.patch_embed:
                self.patch_embed[s.embed_name] = Patchify(self.bands[m], ce, s.patch_size)
                self.embed_to_rec[s.embed_name] = Pixelify(self.bands[m], cd, s.patch_size, s.grid_size)
        self.encoder = nn.ModuleDict({k: blocks(ce, c.depth - c.inter_depth, c.heads, c.dim_head, ce * c.mlp_ratio)
                                      for k in keys})
        self.encoder_inter = (blocks(ce, c.inter_depth, c.heads, c.dim_head, ce * c.mlp_ratio)
                              if c.inter_depth else None)
        self.enc_to_dec = nn.ModuleDict({k: nn.Linear(ce, cd) if ce != cd else nn.Identity() for k in keys})
        self.decoder = nn.ModuleDict({k: blocks(cd, c.decoder_depth, c.decoder_heads, c.decoder_dim_head,
                                                ce * c.decoder_mlp_ratio) for k in keys})
        self.mask_token = nn.ParameterDict({m: nn.Parameter(torch.randn(1, len(self.bands[m]), 1, 1, cd))
                                            for m in mods})
        self.heads = nn.ModuleDict()
        for t in manifest.targets.values():
            if t.type == "multilabel":
                self.heads[t.name] = MultilabelHead(ce, t.num_classes, c.head)
            else:
                grid = mods[manifest.ref_input].grid_size
                self.heads[t.name] = SegmentationHead(ce, t.num_classes, grid, t.image_size // grid, c.head)
        fine = enc.fine_grid_size(manifest.grid_pos_enc, [s.grid_size for s in mods.values()], c.pos_grid)
        for m, s in mods.items():
            self.register_buffer(f"enc_pos_{m}", enc.spatial_encoding(fine, s.grid_size, ce), persistent=False)
            self.register_buffer(f"dec_pos_{m}", enc.spatial_encoding(fine, s.grid_size, cd), persistent=False)
        self.recon_specs = {m: ReconSpec(s.patch_size, self.bands[m], s.norm_groups,
                                         float(self.layouts[m].pseudo_dates * self.layouts[m].tokens))
                            for m, s in mods.items()}

    # ----------------------------------------------------------------------------------------------- inputs
    def prepare(self, batch: dict) -> dict[str, torch.Tensor]:
        """Model inputs as float32: deferred normalisation of integer inputs (``device.normalise_tensor``, the
        loader's own), every date resized to ``model_image_size`` when it differs from the data (``interpolate``
        mode), then the FLAIR elevation rescale (channel 1 := 30 * (ch0 - ch1)); the result is also the
        reconstruction target (model-spec §0, official ``resize_and_rescale``)."""
        out = {}
        for m, s in self.manifest.modalities.items():
            x = torch.as_tensor(batch[m])
            if not x.is_floating_point():
                x = normalise_tensor(x, s.log_scale, s.norm_factor)
            out[m] = resize_and_rescale(x, s.model_size, self.config.interpolate, s.rescale_elev)
        return out

    def _dates(self, batch: dict, m: str, ref: torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
        """Temporal encoding of modality ``m`` -> ``[B, G*D, 1, dim]`` (x 0 without date encodings, as officially)."""
        date = enc.date_encoding(torch.as_tensor(batch[f"{m}_dates"]).to(device), ref.to(device), dim)
        if not self.config.date_encoding:
            date = date * 0.0
        return date.repeat(1, self.layouts[m].bands, 1)[:, :, None]

    def _finite(self, name: str, x: torch.Tensor) -> None:
        if self.config.debug_checks and not bool(torch.isfinite(x).all()):
            raise ModelError(f"{self.manifest.name}: non-finite values in {name}")

    def tokenize(self, x: dict[str, torch.Tensor], batch: dict) -> dict:
        """Per modality: patch embedding + spatial + temporal encoding -> ``[B, G*D, L, C_e]``."""
        ref = torch.as_tensor(batch["ref_date"])
        out = {}
        mods = self.manifest.modalities
        for m, e in ((m, self.patch_embed[mods[m].embed_name](v)) for m, v in x.items()):
            pos = getattr(self, f"enc_pos_{m}")
            date = self._dates(batch, m, ref, self.config.embed_dim, e.device)
            out[m] = e + pos + date
            self._finite(f"embedded tokens of {m}", out[m])
            if self.tapping:
                self.tap({f"embed_{m}": e, f"enc_pos_{m}": pos, f"enc_date_{m}": date.expand_as(e),
                          f"tokens_{m}": out[m]})
        return out

    # ----------------------------------------------------------------------------------------------- encoder
    def _module(self, modules: nn.ModuleDict, key: str) -> nn.Module:
        return modules[key] if key in modules else modules["shared"]

    def encode_rows(self, rows: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Sequence rows -> (group-encoder outputs, final outputs after the shared inter-group blocks if any)."""
        group_out = {k: self._module(self.encoder, k)(v) for k, v in rows.items()}
        if self.encoder_inter is None:
            return group_out, group_out
        names = list(group_out)
        joint = self.encoder_inter(torch.cat([group_out[k] for k in names], dim=1))
        return group_out, dict(zip(names, joint.split([group_out[k].shape[1] for k in names], dim=1), strict=True))

    def _ungroup(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for s in self.sequences:
            out.update(from_rows(rows[s.name], s, self.layouts))
        return {m: out[m] for m in self.manifest.modalities}

    def encode(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All tokens through the encoders (no masking) -> per modality ``[B, G*D, L, C_e]``."""
        group_out, final = self.encode_rows({s.name: to_rows(tokens, s) for s in self.sequences})
        feats = self._ungroup(final)
        if self.tapping:
            if self.encoder_inter is not None:
                self.tap({f"enc_group_out_{m}": v for m, v in self._ungroup(group_out).items()})
            self.tap({f"enc_out_{m}": v for m, v in feats.items()})
        for m, v in feats.items():
            self._finite(f"encoder output of {m}", v)
        return feats

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict, phase: str, *, mask: dict[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None):
        """``pretrain`` -> :class:`PretrainOutput`; ``probe`` (features detached) / ``finetune`` -> target -> logits
        (multilabel ``[B, K]``, segmentation ``[B, K, H_t, W_t]``). ``mask``: a fixed final token mask per modality
        (``[B, G*D, L]`` bool, same count in every sequence) instead of sampling one with ``generator``, which
        pre-training without ``mask`` requires (masks never come from torch's global RNG). Intermediate tensors are
        offered under the oracle's names to tap hooks (``taps.recording``)."""
        if phase not in PHASES:
            raise ModelError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if phase == "pretrain" and mask is None and not isinstance(generator, torch.Generator):
            raise ModelError(f"{self.manifest.name}: pre-training samples its masks from an explicit generator: "
                             "pass generator=torch.Generator(device).manual_seed(seed) (or a fixed mask=...), "
                             f"got generator={generator!r}")
        size = check_batch(self.manifest, batch, values=self.config.debug_checks)
        x = self.prepare(batch)
        tokens = self.tokenize(x, batch)
        if phase == "pretrain":
            return self._pretrain(x, tokens, batch, size, mask, generator)
        feats = self.encode(tokens)
        if phase == "probe":
            feats = {m: f.detach() for m, f in feats.items()}
        return {t: head(feats) for t, head in self.heads.items()}

    def _check_mask(self, mask: dict[str, torch.Tensor], size: int,
                    device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """A caller's fixed mask, validated (a host sync: fixed masks are for tests and the oracle) -> (masks on
        ``device``, visible tokens per sequence)."""
        out, visible = {}, {}
        for m, lay in self.layouts.items():
            want = (size, lay.pseudo_dates, lay.tokens)
            v = mask.get(m)
            if v is None or tuple(v.shape) != want or v.dtype != torch.bool:
                got = None if v is None else (tuple(v.shape), v.dtype)
                raise BatchError(f"{self.manifest.name}: mask[{m!r}] must be bool {list(want)}, got {got}")
            out[m] = v.to(device)
        for s in self.sequences:
            counts = to_rows(out, s).sum(dim=1).tolist()
            if len(set(counts)) > 1:
                raise BatchError(f"{self.manifest.name}: mask of sequence {s.name!r} masks {counts} tokens "
                                 "per row; every row must mask the same number")
            visible[s.name] = s.length(self.layouts) - counts[0]
        return out, visible

    def _pretrain(self, x: dict, tokens: dict, batch: dict, size: int, mask: dict | None,
                  generator: torch.Generator | None) -> PretrainOutput:
        """Masked autoencoding of one batch: ``mask`` if given, else masks drawn from ``generator`` (checked by
        ``forward``)."""
        device = next(iter(tokens.values())).device
        if mask is None:
            masks, _ = sample_masks(self.sequences, self.layouts, self.config.mask, size, generator, device)
            # every sampled row masks exactly round(r * L): the visible count is known without looking at the data
            n_visible = {s.name: s.length(self.layouts) - num_masked(s, self.layouts, self.config.mask)
                         for s in self.sequences}
        else:
            masks, n_visible = self._check_mask(mask, size, device)
        mask_rows = {s.name: to_rows(masks, s) for s in self.sequences}
        # static shapes throughout (gather/scatter of a fixed count): no host sync, runs on the meta device
        keep_idx, visible = {}, {}
        for s in self.sequences:
            rows = to_rows(tokens, s)
            keep_idx[s.name] = visible_index(mask_rows[s.name], n_visible[s.name])[..., None]
            visible[s.name] = rows.gather(1, keep_idx[s.name].expand(-1, -1, rows.shape[-1]))
        group_out, enc_out = self.encode_rows(visible)
        cd = self.config.decoder_dim
        mt = {m: self.mask_token[m].expand(size, -1, lay.dates, lay.tokens, -1)
              .reshape(size, lay.pseudo_dates, lay.tokens, cd) for m, lay in self.layouts.items()}
        dec_in = {}
        for s in self.sequences:
            vis = self._module(self.enc_to_dec, s.name)(enc_out[s.name])
            # every masked slot keeps its own modality's (and band group's) mask token
            dec_in[s.name] = to_rows(mt, s).scatter(1, keep_idx[s.name].expand(-1, -1, cd), vis)
            if self.tapping:
                self.tap({f"mask_group_{s.name}": mask_rows[s.name], f"enc_in_visible_{s.name}": visible[s.name],
                          f"enc_group_out_visible_{s.name}": group_out[s.name],
                          f"enc_out_visible_{s.name}": enc_out[s.name], f"enc_to_dec_{s.name}": vis,
                          f"dec_in_{s.name}": dec_in[s.name]})
        ref = torch.as_tensor(batch["ref_date"]).to(device)
        per_mod = self._ungroup(dec_in)
        for m, v in per_mod.items():
            date = self._dates(batch, m, ref, cd, device)
            per_mod[m] = v + getattr(self, f"dec_pos_{m}") + date
            if self.tapping:
                self.tap({f"dec_date_{m}": date.expand_as(v)})
        dec_rows = {s.name: to_rows(per_mod, s) for s in self.sequences}
        dec_out = self._ungroup({k: self._module(self.decoder, k)(v) for k, v in dec_rows.items()})
        mods = self.manifest.modalities
        pixels = {m: self.embed_to_rec[mods[m].embed_name](v) for m, v in dec_out.items()}
        for m, v in pixels.items():
            self._finite(f"reconstruction of {m}", v)
        loss, losses = reconstruction_loss(x, pixels, masks, self.recon_specs, loss=self.config.loss,
                                           norm=self.config.norm, weighting=self.config.loss_weighting)
        if self.tapping:
            self.tap({f"dec_in_with_enc_{k}": v for k, v in dec_rows.items()})
            self.tap({f"dec_out_{m}": v for m, v in dec_out.items()})
            self.tap({f"pixels_rec_{m}": v for m, v in pixels.items()})
            self.tap({f"mask_tokens_{m}": v for m, v in masks.items()})
        self._finite("reconstruction loss", loss)
        return PretrainOutput(loss=loss, losses=losses, pixels=pixels, mask=masks)

    def config_dict(self) -> dict:
        """The model configuration as plain data (stored in our checkpoints)."""
        return dataclasses.asdict(self.config)
