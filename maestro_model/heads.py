"""Downstream heads (model-spec §7): attentive pooling, multilabel/classification head, segmentation head.

Key names follow the official module (``reduce.query``, ``reduce.norm``, ``reduce.to_kv``, ``reduce.norm_fc``,
``linear``, ``conv``) so official checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maestro_model.taps import Tapped

POOL_HEADS = 8


class AttentiveReduce(nn.Module):
    """Pool ``[N, T, C]`` -> ``[N, C]``: LayerNorm, bias-free key/value, one learned raw query, 8 heads, output LN."""

    def __init__(self, dim: int, heads: int = POOL_HEADS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attentive pooling: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.query = nn.Parameter(torch.randn(dim))
        self.norm_fc = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        kv = self.to_kv(self.norm(x)).reshape(n, t, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q = self.query.reshape(1, self.heads, 1, c // self.heads).expand(n, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.norm_fc(out.reshape(n, c))


class MeanReduce(nn.Module):
    """Pool ``[N, T, C]`` -> ``[N, C]`` by a plain mean over tokens (official ``type_head="linear"``, no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def make_reduce(kind: str, dim: int) -> nn.Module:
    """The pooling of a head: ``attentive`` (default) or ``linear`` (mean)."""
    return AttentiveReduce(dim) if kind == "attentive" else MeanReduce()


class MultilabelHead(Tapped, nn.Module):
    """Attentive pooling (or a mean) over every encoder token of every modality, then Linear(C_e, K)."""

    def __init__(self, dim: int, num_classes: int, pool: str = "attentive"):
        super().__init__()
        self.reduce = make_reduce(pool, dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``feats``: modality -> ``[B, G*D, L, C]`` in modality order -> logits ``[B, K]``."""
        tokens = torch.cat([f.flatten(1, 2) for f in feats.values()], dim=1)
        pooled = self.reduce(tokens)
        if self.tapping:
            self.tap({"head_pooled": pooled})
        return self.linear(pooled)


class SegmentationHead(Tapped, nn.Module):
    """Features resized bilinearly to the reference token grid, pooled per position over all modalities and dates,
    then a 1x1 conv C_e -> K*p^2 read as (p1, p2, K) and pixel-shuffled to ``[B, K, g*p, g*p]``."""

    def __init__(self, dim: int, num_classes: int, ref_grid: int, patch: int, pool: str = "attentive"):
        super().__init__()
        self.ref_grid, self.patch, self.num_classes = ref_grid, patch, num_classes
        self.reduce = make_reduce(pool, dim)
        self.conv = nn.Conv2d(dim, num_classes * patch * patch, kernel_size=1)

    def align(self, f: torch.Tensor) -> torch.Tensor:
        """``[B, T, L, C]`` -> ``[B, T, L_ref, C]`` (identity on the reference grid)."""
        b, t, n, c = f.shape
        g, r = round(n**0.5), self.ref_grid
        if g == r:
            return f
        x = f.reshape(b * t, g, g, c).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1).reshape(b, t, r * r, c)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        aligned = {m: self.align(f) for m, f in feats.items()}
        if self.tapping:
            self.tap({f"seg_aligned_{m}": a for m, a in aligned.items()})
        x = torch.cat(list(aligned.values()), dim=1)
        b, t, n, c = x.shape
        pooled = self.reduce(x.transpose(1, 2).reshape(b * n, t, c))
        if self.tapping:
            self.tap({"head_pooled": pooled})
        g, p, k = self.ref_grid, self.patch, self.num_classes
        y = self.conv(pooled.reshape(b, g, g, c).permute(0, 3, 1, 2))
        y = y.reshape(b, p, p, k, g, g).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(b, k, g * p, g * p)
