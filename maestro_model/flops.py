"""FLOPs and parameter accounting: the paper's analytic formula (§9.1, Tables 20-21) and true counts of our model.

The formula counts multiply-accumulates (MACs) of the large linear maps only, as the paper does, and reports
FLOPs = 2 x MACs for one sample's forward pass. Every per-modality number comes from the manifest.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from maestro_data.manifest import Manifest, ModalitySpec
from maestro_model.masking import MaskConfig
from maestro_model.model import DEFAULT_INTER_DEPTH, DIM_KEYS, MULTISPECTRAL, PHASES, SIZE_ALIASES, build_model
from maestro_model.model import FUSIONS as FUSION_MODES
from maestro_model.model import SIZES as MODEL_SIZES

MASK_RATIO = MaskConfig().ratio  # the paper's M = 0.75
VARIANTS = ("paper", "official")


@dataclass(frozen=True)
class SizeSpec:
    """Widths and depths of one model size; `*_inner` = heads x head width, `*_mlp` = MLP hidden width."""

    enc_dim: int
    enc_depth: int
    enc_inner: int
    enc_mlp: int
    dec_dim: int
    dec_depth: int
    dec_inner: int
    dec_mlp: int


def size_spec(size: str = "base", **overrides: int) -> SizeSpec:
    """The SizeSpec of a model size as ``build_model`` builds it (same dimension overrides, e.g. ``depth=4``).

    The official decoder MLP hidden width is decoder_mlp_ratio x the *encoder* width (model-spec §3.5, §10.7).
    """
    name = SIZE_ALIASES.get(size, size)
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r} (expected one of {', '.join([*MODEL_SIZES, *SIZE_ALIASES])})")
    unknown = sorted(set(overrides) - set(DIM_KEYS))
    if unknown:
        raise ValueError(f"unknown model dimension {unknown[0]!r} (expected one of {', '.join(DIM_KEYS)})")
    d = {**dict(zip(DIM_KEYS, MODEL_SIZES[name], strict=True)), **overrides}
    return SizeSpec(enc_dim=d["embed_dim"], enc_depth=d["depth"], enc_inner=d["heads"] * d["dim_head"],
                    enc_mlp=d["embed_dim"] * d["mlp_ratio"], dec_dim=d["decoder_dim"], dec_depth=d["decoder_depth"],
                    dec_inner=d["decoder_heads"] * d["decoder_dim_head"],
                    dec_mlp=d["embed_dim"] * d["decoder_mlp_ratio"])


@dataclass(frozen=True)
class EncoderSequence:
    """One encoder/decoder sequence kind: `count` sequences per sample of `length` tokens each."""

    key: str
    length: int
    count: int
    modalities: tuple[str, ...]


def resolve_size(size: str | SizeSpec) -> SizeSpec:
    """A size name (tiny, small, base/medium, large) or an explicit SizeSpec."""
    return size if isinstance(size, SizeSpec) else size_spec(size)


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (expected one of {', '.join(allowed)})")


def band_groups(modality: ModalitySpec, multispectral: str) -> int:
    """Number of tokens per patch: 1 for joint-token fusion, the manifest's band groups for token-based fusion."""
    _check_choice(multispectral, MULTISPECTRAL, "multispectral fusion")
    return 1 if multispectral == "joint" else len(modality.norm_groups)


def modality_tokens(manifest: Manifest, multispectral: str = "joint") -> dict[str, int]:
    """L_m = (I_m / P_m)^2 * D_m * |G_m| tokens per sample for every modality (paper §9.1.1)."""
    return {name: m.num_tokens * band_groups(m, multispectral) for name, m in manifest.modalities.items()}


def encoder_sequences(manifest: Manifest, fusion: str = "group", multispectral: str = "joint") -> list[EncoderSequence]:
    """The sequences one sample is split into by a fusion mode (model-spec §3.1)."""
    _check_choice(fusion, FUSION_MODES, "fusion mode")
    if fusion in ("shared", "monotemp"):
        # late temporal fusion: one sequence of g^2 tokens per (date, band group, modality)
        return [EncoderSequence(name, m.grid_size**2, m.temporal_bins * band_groups(m, multispectral), (name,))
                for name, m in manifest.modalities.items()]
    tokens = modality_tokens(manifest, multispectral)
    if fusion == "mod":
        return [EncoderSequence(name, n, 1, (name,)) for name, n in tokens.items()]
    return [EncoderSequence(group, sum(tokens[m] for m in members), 1, members)
            for group, members in manifest.groups.items()]


def visible_tokens(length: int, mask_ratio: float = MASK_RATIO) -> int:
    """Tokens left visible when exactly round(ratio * L) are masked (Python rounding, as the official code)."""
    return length - round(mask_ratio * length)


def block_macs(length: int, width: int, mlp: int, inner: int | None = None) -> int:
    """MACs of one transformer block on `length` tokens: qkv + output projections, QK^T and AV, the MLP.

    `inner` (heads x head width) defaults to `width`, which makes the paper's 12 L C^2 + 2 L^2 C for mlp = 4 C.
    """
    inner = width if inner is None else inner
    return length * (4 * width * inner + 2 * width * mlp) + 2 * length * length * inner


def _inter_depth(fusion: str, inter_depth: int | None, depth: int) -> int:
    if inter_depth is None:
        return DEFAULT_INTER_DEPTH if fusion == "inter-group" else 0
    if inter_depth < 0 or inter_depth >= depth:
        raise ValueError(f"inter_depth must be in [0, {depth - 1}], got {inter_depth}")
    if inter_depth and fusion not in ("mod", "group", "inter-group"):
        raise ValueError(f"inter_depth > 0 needs fusion mod, group or inter-group, got {fusion!r}")
    return inter_depth


def _encoder_macs(seqs: list[EncoderSequence], lengths: list[int], size: SizeSpec, inter: int) -> int:
    """Per-sequence encoders of depth N_e - k, then k shared blocks over all sequences' tokens together."""
    macs = sum(s.count * block_macs(n, size.enc_dim, size.enc_mlp, size.enc_inner) * (size.enc_depth - inter)
               for s, n in zip(seqs, lengths, strict=True))
    if inter:
        joint = sum(s.count * n for s, n in zip(seqs, lengths, strict=True))
        macs += block_macs(joint, size.enc_dim, size.enc_mlp, size.enc_inner) * inter
    return macs


def formula_macs(
    manifest: Manifest,
    phase: str,
    size: str | SizeSpec = "base",
    fusion: str = "group",
    multispectral: str = "joint",
    *,
    mask_ratio: float = MASK_RATIO,
    inter_depth: int | None = None,
    variant: str = "paper",
) -> dict[str, int]:
    """Forward MACs of one sample by component. `phase` "probe" and "finetune" share the same forward pass.

    ``variant="paper"``: the paper's §9.1 formula (decoder MLP 4 x C_d, pooling 2 L C_e, heads C_e x classes
    with the ignored classes). ``variant="official"``: the same linear maps of the official architecture as
    built here (decoder MLP 4 x C_e, the pooling's key/value projection, per-position pooling of the
    segmentation head over all dates, its 1x1 conv to K x p^2 outputs).
    """
    _check_choice(phase, PHASES, "phase")
    _check_choice(variant, VARIANTS, "formula variant")
    spec = resolve_size(size)
    inter = _inter_depth(fusion, inter_depth, spec.enc_depth)
    seqs = encoder_sequences(manifest, fusion, multispectral)
    pixels = sum(m.model_size**2 * m.temporal_bins * m.channels for m in manifest.modalities.values())
    out = {"patchify": pixels * spec.enc_dim}
    if phase == "pretrain":
        visible = [visible_tokens(s.length, mask_ratio) for s in seqs]
        dec_mlp = spec.dec_mlp if variant == "official" else 4 * spec.dec_dim
        out["encoder"] = _encoder_macs(seqs, visible, spec, inter)
        enc_to_dec = 0 if spec.enc_dim == spec.dec_dim else spec.enc_dim * spec.dec_dim
        out["enc_to_dec"] = sum(s.count * v for s, v in zip(seqs, visible, strict=True)) * enc_to_dec
        out["decoder"] = sum(s.count * block_macs(s.length, spec.dec_dim, dec_mlp, spec.dec_inner) * spec.dec_depth
                             for s in seqs)
        out["unpatchify"] = pixels * spec.dec_dim
        return out
    out["encoder"] = _encoder_macs(seqs, [s.length for s in seqs], spec, inter)
    out.update(_paper_heads(manifest, spec, multispectral) if variant == "paper"
               else _official_heads(manifest, spec, multispectral))
    return out


def _paper_heads(manifest: Manifest, spec: SizeSpec, multispectral: str) -> dict[str, int]:
    total_tokens = sum(modality_tokens(manifest, multispectral).values())
    head = 0
    for target in manifest.targets.values():
        # the paper counts every class of the label set, the ignored ones included (§9.1.2)
        classes = len(target.classes)
        if target.type == "segmentation":
            head += manifest.modalities[manifest.ref_input].grid_size ** 2 * spec.enc_dim * classes
        else:
            head += spec.enc_dim * classes
    return {"attn_pool": 2 * total_tokens * spec.enc_dim, "head": head}


def _official_heads(manifest: Manifest, spec: SizeSpec, multispectral: str) -> dict[str, int]:
    c = spec.enc_dim
    pool = head = 0
    for target in manifest.targets.values():
        if target.type == "segmentation":
            # every modality's features resized to the reference grid, pooled per position over all dates
            grid = manifest.modalities[manifest.ref_input].grid_size
            dates = sum(m.temporal_bins * band_groups(m, multispectral) for m in manifest.modalities.values())
            tokens = grid**2 * dates
            head += grid**2 * c * target.num_classes * (target.image_size // grid) ** 2
        else:
            tokens = sum(modality_tokens(manifest, multispectral).values())
            head += c * target.num_classes
        pool += tokens * 2 * c * c + 2 * tokens * c  # key/value projection, then one query over the tokens
    return {"attn_pool": pool, "head": head}


def formula_flops(manifest: Manifest, phase: str, size: str | SizeSpec = "base", fusion: str = "group",
                  multispectral: str = "joint", **options: Any) -> int:
    """Forward FLOPs (= 2 x MACs) of one sample by the paper's formula; options as in :func:`formula_macs`."""
    return 2 * sum(formula_macs(manifest, phase, size, fusion, multispectral, **options).values())


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once); works on meta-device models."""
    # Module.parameters() already yields a shared parameter once
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _scalar(output: Any) -> torch.Tensor:
    """A scalar to back-propagate from a pretrain output (its loss) or a finetune output ({target: logits})."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, Mapping):
        return sum(v.float().sum() for v in output.values() if isinstance(v, torch.Tensor))
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    raise TypeError(f"cannot reduce a model output of type {type(output).__name__} to a scalar")


def measured_flops(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    phase: str,
    *,
    generator: torch.Generator | None = None,
    backward: bool = False,
) -> int:
    """FLOPs the model really executes on `batch` (matmuls, convolutions, attention) by torch's flop counter.

    Divide by the batch size for a per-sample figure. With `backward` the gradient pass is counted too.
    Pretraining draws its masks from `generator` (a CPU generator seeded 0 when omitted).
    """
    _check_choice(phase, PHASES, "phase")
    devices = {v.device.type for v in batch.values() if isinstance(v, torch.Tensor)}
    # torch's counter has no formula for the CPU flash kernel (it counts 0): use the math path there, which
    # it sees as batched matmuls; meta and CUDA kernels are counted as they are
    kernels = sdpa_kernel(SDPBackend.MATH) if "cpu" in devices else contextlib.nullcontext()
    with kernels, FlopCounterMode(display=False) as counter:
        # the count does not depend on which tokens are masked, only on how many: any seed will do
        kwargs = {"generator": generator or torch.Generator().manual_seed(0)} if phase == "pretrain" else {}
        output = model(batch, phase, **kwargs)
        if backward:
            _scalar(output).backward()
    return int(counter.get_total_flops())


def example_batch(manifest: Manifest, batch_size: int = 1, device: str | torch.device = "cpu",
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A batch with the loader's keys, shapes and dtypes: random images in [0, 1) from `generator`, dates
    spread over a year, zero targets. On the meta device the tensors carry shapes only (all a flop count needs).
    """
    from maestro_data.stream.batch import expected_shapes  # the batch contract shared with the loader

    device = torch.device(device)
    if device.type == "meta":
        return {key: v.to("meta") for key, v in example_batch(manifest, batch_size, "cpu", None).items()}
    batch: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(manifest).items():
        full = (batch_size, *shape[1:])  # shape[0] is None, the batch dimension
        if key.endswith("_dates") or key == "ref_date":
            value = torch.zeros(full, dtype=torch.int16)  # (year, day of year, hour)
            value[..., 0] = 2020
            value[..., 1] = 182 if key == "ref_date" else torch.linspace(1, 360, full[-2]).round().to(torch.int16)
        elif key in manifest.targets:
            value = torch.zeros(full, dtype=torch.long)
        elif generator is None:
            value = torch.full(full, 0.5)
        else:
            value = torch.rand(full, generator=generator)
        batch[key] = value.to(device)
    return batch


class ShapesOnly(TorchDispatchMode):
    """Replaces the result of every op the flop counter counts (matmuls, convolutions, attention) by zeros of the
    right shape, dtype and strides, so a count needs no arithmetic while data-dependent code (masking) still runs.

    Enter it before (under) a FlopCounterMode; the values are meaningless, only the shapes are right.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = set(FlopCounterMode(display=False).flop_registry)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func._overloadpacket not in self.ops:
            return func(*args, **kwargs)
        device = next(t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        meta = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta[0], **meta[1])
        return pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_(), out)


def implementation_counts(
    manifest: Manifest,
    size: str = "base",
    fusion: str = "group",
    multispectral: str = "joint",
    *,
    inter_depth: int | None = None,
    phases: tuple[str, ...] = ("pretrain", "finetune"),
    device: str = "meta",
    backward: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Parameters and per-sample FLOPs (forward, or forward + backward) of our model, batch of 1.

    ``device="meta"``: shapes only, fast even for large models (the masks are drawn on the CPU and the model
    has static shapes); a phase the meta device cannot run (an operation whose output shape depends on the data)
    falls back to the CPU under :class:`ShapesOnly`, uninitialised weights and no arithmetic. ``result["device"]``
    says where each phase was counted. ``device="cpu"``: a real forward pass of an initialised model.
    ``options`` go to ``build_model`` (e.g. width overrides).
    """
    with torch.device(device):
        model = build_model(manifest, size, fusion, multispectral=multispectral, inter_depth=inter_depth, **options)
    result: dict[str, Any] = {"parameters": count_parameters(model),
                              "parameters_by_module": {name: count_parameters(child)
                                                       for name, child in model.named_children()},
                              "flops": {}, "device": {}}
    cpu_model = None
    for phase in phases:
        where = device
        try:
            result["flops"][phase] = _count_on(model, manifest, phase, device, backward)
        except (NotImplementedError, RuntimeError):
            if device != "meta":
                raise
            where = "cpu (shapes only)"
        if where != device:
            if cpu_model is None:
                cpu_model = copy.deepcopy(model).to_empty(device="cpu")
            with ShapesOnly():
                result["flops"][phase] = _count_on(cpu_model, manifest, phase, "cpu", backward)
        result["device"][phase] = where
    return result


def _count_on(model: torch.nn.Module, manifest: Manifest, phase: str, device: str, backward: bool) -> int:
    generator = torch.Generator().manual_seed(0)
    batch = example_batch(manifest, 1, device, generator)
    with contextlib.nullcontext() if backward else torch.no_grad():
        return measured_flops(model, batch, phase, generator=generator, backward=backward)
