"""Fixed spatial and temporal encodings (model-spec §2), reproducing the official float32 arithmetic bit for bit.

Spatial encodings fill channels ``[0, C-8)`` and temporal ones the last 8 channels, so their sum with the token
embedding realises the paper's concatenation. All functions are pure and return float32 tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATE_DIM = 8
TEMPERATURE = 10000.0
DAYS_PER_YEAR = 365.25
POS_GRIDS = ("official", "lcm")


def grid_encoding(size: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine encoding of a ``size`` x ``size`` grid -> ``[size, size, dim]`` (last 8 channels zero).

    Layout per position: sin(x w), cos(x w), sin(y w), cos(y w) with x the column, y the row and
    w_i = 10000^(-i/(k-1)), k = (dim-8)/4 (official formula, note the k-1).
    """
    if (dim - DATE_DIM) % 4 or dim <= DATE_DIM + 4:
        raise ValueError(f"encoding width {dim} must be 8 + a multiple of 4 (at least 16)")
    k = (dim - DATE_DIM) // 4
    omega = 1.0 / (TEMPERATURE ** (torch.arange(k, dtype=torch.float32) / (k - 1)))
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos(), torch.zeros(size * size, DATE_DIM)], dim=1)
    return pe.reshape(size, size, dim)


def block_average(fine: torch.Tensor, grid: int) -> torch.Tensor:
    """Average a ``[S, S, C]`` fine-grid encoding onto a ``grid`` x ``grid`` token grid -> ``[grid*grid, C]``.

    When ``grid`` does not divide S the map is first resized bilinearly to grid*round(S/grid) (official §2.2).
    The block mean uses ``mean`` over the two block axes, the official summation order (avg_pool2d differs by ~1e-5).
    """
    size = fine.shape[0]
    if size % grid:
        size = grid * round(size / grid)
        fine = F.interpolate(fine.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                             align_corners=False)[0].permute(1, 2, 0)
    s = size // grid
    return fine.reshape(grid, s, grid, s, -1).mean(dim=(-2, -4)).reshape(grid * grid, -1)


def fine_grid_size(grid_pos_enc: int, grids: list[int], mode: str = "official") -> int:
    """Side of the common fine grid: the manifest's ``grid_pos_enc`` (official) or the token grids' LCM (paper)."""
    if mode == "official":
        return grid_pos_enc
    if mode == "lcm":
        return math.lcm(*grids)
    raise ValueError(f"pos_grid must be one of {', '.join(POS_GRIDS)}, got {mode!r}")


def spatial_encoding(fine_size: int, grid: int, dim: int) -> torch.Tensor:
    """Spatial encoding of one modality's token grid -> ``[1, 1, grid*grid, dim]`` (broadcast over batch and dates)."""
    return block_average(grid_encoding(fine_size, dim), grid)[None, None]


def date_encoding(dates: torch.Tensor, ref_date: torch.Tensor, dim: int) -> torch.Tensor:
    """Temporal encoding ``[B, D, dim]`` of int dates ``[B, D, 3]`` against ``ref_date`` ``[B, 1, 3]`` (§2.3).

    Last 8 channels: diff x4, sin/cos(2 pi doy/365.25), sin/cos(2 pi hour/24), diff = fractional-year difference,
    all in float32 in the official operation order (the diff is quantised at ~1.2e-4 near 2019, as officially).
    """
    d, r = dates.float(), ref_date.float()
    diff = (d[..., 0] + d[..., 1] / DAYS_PER_YEAR) - (r[..., 0] + r[..., 1] / DAYS_PER_YEAR)
    a = 2 * torch.pi * (d[..., 1] / DAYS_PER_YEAR)
    b = 2 * torch.pi * (d[..., 2] / 24)
    feats = torch.stack([diff, diff, diff, diff, a.sin(), a.cos(), b.sin(), b.cos()], dim=-1)
    return F.pad(feats, (dim - DATE_DIM, 0))
