"""Patch tokenizers and pixel heads per modality (model-spec §1 and §5), official key names.

``Patchify``: per token band group a Conv2d(kernel = stride = P) shared across dates, then GroupNorm(1, C_e) over the
whole token grid of each (sample, date). ``Pixelify``: per band group a 1x1 conv C_d -> C_g*P^2 whose channels read
as (p1, p2, c), pixel-shuffled back to the image. Joint-token fusion is the one-band-group case.
"""

from __future__ import annotations

import torch
from torch import nn


def band_slices(sizes: tuple[int, ...]) -> list[slice]:
    """Consecutive channel slices of the given sizes."""
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


class PatchifyBands(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D, C_g, I, I]`` -> ``[B, D, L, C_e]`` (row-major token order)."""
        b, d = x.shape[:2]
        t = self.norm(self.conv(x.flatten(0, 1)))
        return t.flatten(2).transpose(1, 2).reshape(b, d, -1, t.shape[1])


class Patchify(nn.Module):
    """All band groups of one modality -> ``[B, G*D, L, C_e]`` (band-group-major, then date)."""

    def __init__(self, bands: tuple[int, ...], dim: int, patch: int):
        super().__init__()
        self.slices = band_slices(bands)
        self.patchify_bands = nn.ModuleList(PatchifyBands(c, dim, patch) for c in bands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x[:, :, s]) for p, s in zip(self.patchify_bands, self.slices, strict=True)], dim=1)


class PixelifyBands(nn.Module):
    def __init__(self, dim: int, channels: int, patch: int):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.conv = nn.Conv2d(dim, channels * patch * patch, kernel_size=1)

    def forward(self, t: torch.Tensor, grid: int) -> torch.Tensor:
        """``[B, D, L, C_d]`` -> ``[B, D, C_g, g*P, g*P]``."""
        b, d, _, c = t.shape
        p = self.patch
        y = self.conv(t.reshape(b * d, grid, grid, c).permute(0, 3, 1, 2))
        y = y.reshape(b, d, p, p, self.channels, grid, grid).permute(0, 1, 4, 5, 2, 6, 3)
        return y.reshape(b, d, self.channels, grid * p, grid * p)


class Pixelify(nn.Module):
    """Decoder tokens ``[B, G*D, L, C_d]`` -> pixels ``[B, D, C, I, I]`` (band groups concatenated on channels)."""

    def __init__(self, bands: tuple[int, ...], dim: int, patch: int, grid: int):
        super().__init__()
        self.grid = grid
        self.pixelify_bands = nn.ModuleList(PixelifyBands(dim, c, patch) for c in bands)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        parts = t.chunk(len(self.pixelify_bands), dim=1)
        return torch.cat([p(x, self.grid) for p, x in zip(self.pixelify_bands, parts, strict=True)], dim=2)


def token_mask_to_pixels(mask: torch.Tensor, bands: tuple[int, ...], patch: int) -> torch.Tensor:
    """Token mask ``[B, G*D, L]`` -> pixel mask ``[B, D, C, I, I]`` (each band group's channels take its mask)."""
    b, gd, n = mask.shape
    g = len(bands)
    grid = round(n**0.5)
    m = mask.reshape(b, g, gd // g, grid, 1, grid, 1).expand(-1, -1, -1, -1, patch, -1, patch)
    m = m.reshape(b, g, gd // g, grid * patch, grid * patch)
    idx = torch.repeat_interleave(torch.arange(g, device=mask.device), torch.tensor(bands, device=mask.device))
    return m[:, idx].transpose(1, 2)
