"""Pure bookkeeping of prediction: which tiles a rank owns, and the per-tile sum of crop logits on the target grid.

A tile's crops (PASTIS-HD: 64 per tile, others 1) and, with ``--tta d4``, the 8 D4 elements of each crop all add
their (inverse-transformed) logits into one sum per target with a per-pixel count: the mean is the overlap- and
TTA-average in logit space, taken once the tile's every contribution has arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def rank_tiles(num_tiles: int, rank: int, world: int) -> list[int]:
    """Tile i belongs to rank i % world: every tile exactly once, whatever the world size."""
    return list(range(rank, num_tiles, world))


@dataclass
class TileSum:
    """Running sums of one tile: per target, logits (K, H, W) or (K,) and a count of contributions."""

    key: str
    meta: dict
    expected: int  # contributions (rows) the tile will receive
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # training labels, for metrics
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    received: int = 0

    def add(self, target: str, logits: torch.Tensor, window: tuple[int, int, int] | None, size: int | None) -> None:
        """Add one row's logits: classification (K,), or segmentation (K, h, w) placed at ``window`` = (row, col,
        size) of a ``size`` x ``size`` target raster (resized bilinearly first when the head's grid differs)."""
        logits = logits.float()
        if window is None:
            if target not in self.sums:
                self.sums[target] = torch.zeros_like(logits)
                self.counts[target] = torch.zeros((), dtype=torch.float32, device=logits.device)
            self.sums[target] += logits
            self.counts[target] += 1
            return
        r, c, s = window
        if logits.shape[-1] != s or logits.shape[-2] != s:
            logits = F.interpolate(logits[None], size=(s, s), mode="bilinear", align_corners=False)[0]
        if target not in self.sums:
            self.sums[target] = torch.zeros((logits.shape[0], size, size), dtype=torch.float32, device=logits.device)
            self.counts[target] = torch.zeros((size, size), dtype=torch.float32, device=logits.device)
        self.sums[target][:, r:r + s, c:c + s] += logits
        self.counts[target][r:r + s, c:c + s] += 1

    def mean(self, target: str) -> torch.Tensor:
        """Mean logits; pixels no crop covered stay 0 (every class equally likely)."""
        return self.sums[target] / self.counts[target].clamp(min=1)

    @property
    def done(self) -> bool:
        return self.received >= self.expected
