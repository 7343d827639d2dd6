"""What a source reader hands to the tile store: one tile, every modality in its native dtype, every date."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Series:
    """One modality of one tile: ``data`` (T, C, H, W) in the manifest dtype, ``dates`` (T, 3) int16
    (year, day of year, hour), optional ``mask`` (T, C_mask, H, W) snow/cloud probabilities."""

    data: np.ndarray
    dates: np.ndarray
    mask: np.ndarray | None = None


@dataclass
class TileRef:
    """A tile as listed by a source before its rasters are read: id, split, fold, and reader-private keys."""

    tile_id: str
    split: str
    fold: int = 0
    keys: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # time steps per modality, filled by Source.probe


@dataclass(frozen=True)
class Grid:
    """Where a raster's pixels lie: ``crs`` (``EPSG:<code>`` where one matches, else WKT; None when the file has
    none), ``transform`` (a, b, c, d, e, f as in rasterio/GDAL: x = a*col + b*row + c, y = d*col + e*row + f),
    ``width`` and ``height`` in pixels. Issue #12 stores these per tile so maps can be written on the label grid."""

    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int


@dataclass
class Tile:
    tile_id: str
    split: str
    fold: int
    lon: float
    lat: float
    ref_date: np.ndarray  # (3,) int16
    series: dict[str, Series]
    targets: dict[str, np.ndarray]  # multilabel: (K,) float32 fractions; segmentation: (H, W) class raster
    # every modality grid and every raster target grid, as read (not stored yet: issue #12)
    grids: dict[str, Grid] = field(default_factory=dict)
