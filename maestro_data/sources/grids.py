"""The georeference of every grid a tile holds, and the one co-registration rule all readers apply.

Two grids of a tile are co-registered when their CRSs are equal once normalised (the EPSG code where one matches:
the TreeSatAI-TS GeoTIFFs carry an unnamed WKT that is EPSG:25832) and their bounds agree to within half a pixel of
the coarser grid: a smaller offset is resampling residue, a larger one lays a pixel of one modality over ground
another modality does not see. A footprint polygon (PASTIS-HD ``metadata.geojson``, TreeSatAI-TS
``bb_60m.GeoJSON``) is a vector, not a grid: it is reprojected into the grid's CRS when its file declares another.
Offsets are in the grid CRS's units: metres for every dataset here. Pure functions; readers raise the SourceError.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pyproj import CRS, Transformer

from maestro_data.errors import SourceError
from maestro_data.tile import Grid

Bounds = tuple[float, float, float, float]  # left, bottom, right, top
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@lru_cache(maxsize=256)  # a dataset has one or two CRSs: identify each once per process (~0.1 s cold)
def normalise_crs(crs: str) -> str:
    """``EPSG:<code>`` when the CRS matches one (70 % confidence, as rasterio's ``to_epsg``), else its WKT.

    Raises pyproj's CRSError for text that is no CRS."""
    parsed = CRS.from_user_input(crs)
    code = parsed.to_epsg(min_confidence=70)
    return f"EPSG:{code}" if code is not None else parsed.to_wkt()


@lru_cache(maxsize=256)
def same_crs(a: str, b: str) -> bool:
    """CRS equality of two normalised CRSs (pyproj's, not the strings': a WKT can equal an EPSG code)."""
    return a == b or CRS.from_user_input(a) == CRS.from_user_input(b)


def crs_label(crs: str | None) -> str:
    if crs is None:
        return "no CRS"
    return crs if crs.startswith("EPSG:") else f"{CRS.from_user_input(crs).name!r} (WKT)"


def grid_of(dataset: Any, wkt: str | None = None) -> Grid:
    """The grid of an open rasterio dataset (its CRS normalised); ``wkt``: its CRS's WKT when already exported."""
    wkt = wkt or (dataset.crs.to_wkt() if dataset.crs else None)
    crs = normalise_crs(wkt) if wkt else None
    return Grid(crs, tuple(float(v) for v in tuple(dataset.transform)[:6]), int(dataset.width), int(dataset.height))


def bounds_grid(bounds: Bounds, crs: str | None, width: int, height: int) -> Grid:
    """The north-up grid of ``width`` x ``height`` pixels exactly covering ``bounds``."""
    left, bottom, right, top = bounds
    return Grid(crs, ((right - left) / width, 0.0, left, 0.0, -(top - bottom) / height, top), width, height)


def window_grid(grid: Grid, col: int, row: int, width: int, height: int) -> Grid:
    """The grid of a pixel window of ``grid`` (e.g. the TreeSatAI-TS 300 px centre crop)."""
    a, b, c, d, e, f = grid.transform
    return Grid(grid.crs, (a, b, c + a * col + b * row, d, e, f + d * col + e * row), width, height)


def grid_bounds(grid: Grid) -> Bounds:
    a, b, c, d, e, f = grid.transform
    corners = [(c + a * x + b * y, f + d * x + e * y) for x in (0, grid.width) for y in (0, grid.height)]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    return min(xs), min(ys), max(xs), max(ys)


def pixel_size(grid: Grid) -> float:
    a, b, _, d, e, _ = grid.transform
    return max(math.hypot(a, d), math.hypot(b, e))


def bounds_offset(a: Bounds, b: Bounds) -> float:
    """The largest distance between corresponding edges of two bounds."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def is_georeferenced(grid: Grid) -> bool:
    return grid.crs is not None and grid.transform != _IDENTITY


def _offset_reason(offset: float, tolerance: float) -> str | None:
    if offset <= tolerance:  # NaN bounds fail here too
        return None
    return f"bounds {offset:.2f} m apart (tolerance {tolerance:.2f} m: half a pixel of the coarser grid)"


def misregistration(ref: Grid, other: Grid) -> str | None:
    """Why ``other`` does not cover the footprint of ``ref`` (both georeferenced), or None."""
    if not is_georeferenced(other):
        return f"not georeferenced ({crs_label(other.crs)}, transform {other.transform})"
    if not same_crs(ref.crs, other.crs):
        return f"CRS {crs_label(other.crs)} differs from {crs_label(ref.crs)}"
    tolerance = 0.5 * max(pixel_size(ref), pixel_size(other))
    return _offset_reason(bounds_offset(grid_bounds(ref), grid_bounds(other)), tolerance)


@lru_cache(maxsize=64)
def _transformer(src: str, dst: str) -> Transformer:
    return Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(dst), always_xy=True)


def footprint_bounds(points: np.ndarray, crs: str, to_crs: str) -> Bounds:
    """Bounds in ``to_crs`` of a footprint polygon's (N, 2) positions given in ``crs``.

    The vertices are reprojected, not the envelope: a square's envelope reprojected twice grows by metres.
    Raises pyproj's CRSError when the CRSs cannot be related."""
    if not same_crs(crs, to_crs):
        xs, ys = _transformer(crs, to_crs).transform(points[:, 0], points[:, 1], errcheck=True)
        points = np.column_stack([xs, ys])
    (left, bottom), (right, top) = points.min(axis=0), points.max(axis=0)
    return float(left), float(bottom), float(right), float(top)


def footprint_misregistration(grid: Grid, footprint: Bounds, tolerance: float) -> str | None:
    """Why ``grid`` does not cover a footprint polygon of ``footprint`` bounds (in the grid's CRS), or None."""
    if not is_georeferenced(grid):
        return f"not georeferenced ({crs_label(grid.crs)}, transform {grid.transform})"
    return _offset_reason(bounds_offset(grid_bounds(grid), footprint), tolerance)


def check_coregistered(ref: Grid, ref_path: str | Path, ref_what: str, grid: Grid, path: str | Path, what: str,
                       tile_id: str) -> None:
    """SourceError naming both files and the offset when ``grid`` (of ``path``) is not on ``ref``'s footprint."""
    if not is_georeferenced(ref):
        raise SourceError(f"{ref_what} is not georeferenced ({crs_label(ref.crs)}, transform {ref.transform}), so "
                          "the tile cannot be located nor its grids checked", tile_id=tile_id, path=str(ref_path))
    reason = misregistration(ref, grid)
    if reason is not None:
        raise SourceError(f"{what} is not co-registered with {ref_what} ({ref_path}): {reason}", tile_id=tile_id,
                          path=str(path))
