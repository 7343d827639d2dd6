"""Losses (model-spec §6 and §7.5): masked reconstruction with patch(-group)-wise target normalisation, and the
downstream multilabel / segmentation losses that skip the manifest's missing value. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DISTANCES = ("l1", "l2")
NORMS = ("patch-group", "patch", "none")
WEIGHTINGS = ("official", "paper")
NORM_EPS = 1e-6


@dataclass(frozen=True)
class ReconSpec:
    """What the reconstruction loss needs to know about one modality."""

    patch: int
    bands: tuple[int, ...]        # token band groups (channel counts); one entry for joint-token fusion
    norm_groups: tuple[int, ...]  # channel chunks normalised together (patch-group-wise)
    weight: float                 # official modality weight = token count


def parse_loss(name: str, norm: str | None = None) -> tuple[str, str]:
    """``l1_norm``/``l2_norm``/``l1``/``l2`` -> (distance, normalisation). The ``_norm`` suffix means patch-group-wise
    normalisation (the official meaning); an explicit ``norm`` overrides what the name implies."""
    distance, _, suffix = name.partition("_")
    if distance not in DISTANCES or suffix not in ("", "norm"):
        raise ValueError(f"loss must be one of l1_norm, l2_norm, l1, l2, got {name!r}")
    chosen = norm if norm is not None else ("patch-group" if suffix else "none")
    if chosen not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {chosen!r}")
    return distance, chosen


def to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixels ``[B, D, C, I, I]`` -> ``[B, D, L, P*P, C]`` (row-major tokens)."""
    b, d, c, h, w = x.shape
    g, gw = h // patch, w // patch
    x = x.reshape(b, d, c, g, patch, gw, patch).permute(0, 1, 3, 5, 4, 6, 2)
    return x.reshape(b, d, g * gw, patch * patch, c)


def normalize_patches(x: torch.Tensor, groups: tuple[int, ...], eps: float = NORM_EPS) -> torch.Tensor:
    """Normalise ``[..., P*P, C]`` per patch and channel chunk: (x - mean) / sqrt(unbiased var + eps)."""
    out = []
    for chunk in x.split(list(groups), dim=-1):
        mean = chunk.mean(dim=(-2, -1), keepdim=True)
        var = chunk.var(dim=(-2, -1), keepdim=True)
        out.append((chunk - mean) / (var + eps) ** 0.5)
    return torch.cat(out, dim=-1)


def channel_mask(token_mask: torch.Tensor, bands: tuple[int, ...]) -> torch.Tensor:
    """Token mask ``[B, G*D, L]`` -> ``[B, D, L, 1, C]`` (each channel follows its token band group)."""
    b, gd, n = token_mask.shape
    g = len(bands)
    per_group = token_mask.reshape(b, g, gd // g, n)
    # repeat each group's mask over its channels with static shapes (no index tensor to upload, no sync)
    channels = torch.cat([per_group[:, i:i + 1].expand(-1, c, -1, -1) for i, c in enumerate(bands)], dim=1)
    return channels.permute(0, 2, 3, 1).unsqueeze(3)


def modality_error(target: torch.Tensor, pred: torch.Tensor, spec: ReconSpec, distance: str,
                   norm: str) -> torch.Tensor:
    """Elementwise error ``[B, D, L, P*P, C]`` between the (normalised) target and the raw prediction."""
    x, y = to_patches(target, spec.patch), to_patches(pred, spec.patch)
    if norm == "patch-group":
        x = normalize_patches(x, spec.norm_groups)
    elif norm == "patch":
        x = normalize_patches(x, spec.bands)
    diff = x - y
    return diff.abs() if distance == "l1" else diff.square()


def reconstruction_loss(targets: dict[str, torch.Tensor], preds: dict[str, torch.Tensor],
                        masks: dict[str, torch.Tensor], specs: dict[str, ReconSpec], *, loss: str = "l1_norm",
                        norm: str | None = None,
                        weighting: str = "official") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked reconstruction loss -> (total, per-modality term).

    official: term_m = mean error over masked elements; total = sum_m w_m term_m / sum_m w_m (w_m = token count).
    paper: every masked (token, normalisation group) counts once (its mean error), whatever its channel count and
    modality; term_m is that average within m and the total pools all modalities' entries.
    """
    distance, norm = parse_loss(loss, norm)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    terms: dict[str, torch.Tensor] = {}
    pooled_sum, pooled_count = [], []
    for m, spec in specs.items():
        e = modality_error(targets[m], preds[m], spec, distance, norm)
        mask = channel_mask(masks[m], spec.bands)
        if weighting == "official":
            # masked mean without boolean indexing (static shapes: no host sync, runs on the meta device);
            # torch.where, not a product, so that unmasked non-finite errors are ignored as before
            full = mask.expand_as(e)
            terms[m] = torch.where(full, e, 0).sum() / full.sum()
            continue
        groups = spec.norm_groups if norm == "patch-group" else spec.bands
        per_group = torch.stack([c.mean(dim=(-2, -1)) for c in e.split(list(groups), dim=-1)], dim=-1)
        group_mask = torch.stack([c[..., 0, 0] for c in mask.split(list(groups), dim=-1)], dim=-1)
        s, n = torch.where(group_mask, per_group, 0).sum(), group_mask.sum()
        terms[m] = s / n
        pooled_sum.append(s)
        pooled_count.append(n)
    if weighting == "official":
        w = {m: specs[m].weight for m in terms}
        total = sum(w[m] * terms[m] for m in terms) / sum(w.values())
    else:
        total = torch.stack(pooled_sum).sum() / torch.stack(pooled_count).sum()
    return total, terms


def multilabel_loss(logits: torch.Tensor, target: torch.Tensor, missing_value: int = -1) -> torch.Tensor:
    """Mean BCE-with-logits over the samples none of whose labels is ``missing_value`` (0 if there are none)."""
    keep = ~(target == missing_value).any(dim=1)
    if not keep.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[keep], target[keep].to(logits.dtype))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, missing_value: int) -> torch.Tensor:
    """Mean cross-entropy over pixels whose label is not ``missing_value`` (0 if there are none).

    ``logits`` ``[B, K, H, W]``, ``target`` ``[B, H, W]`` integer."""
    target = target.long()
    if not (target != missing_value).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=missing_value)
