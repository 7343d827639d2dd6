"""Geolocation shared by the readers: tile centres in the source CRS -> WGS84 lon/lat for subset sampling."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from pyproj import CRS, Transformer


@lru_cache(maxsize=32)
def _transformer(crs: str) -> Transformer:
    return Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True)


def to_lonlat(x: float, y: float, crs: str) -> tuple[float, float]:
    """A point in ``crs`` (EPSG code, WKT or anything pyproj accepts) -> (lon, lat) in degrees."""
    lon, lat = _transformer(crs).transform(x, y)
    return float(lon), float(lat)


def bounds_centre_lonlat(bounds: Any, crs: str) -> tuple[float, float]:
    """Centre of raster bounds (left, bottom, right, top) in ``crs`` -> (lon, lat)."""
    left, bottom, right, top = bounds
    return to_lonlat((left + right) / 2, (bottom + top) / 2, crs)


def geojson_crs(member: Any) -> str | None:
    """The pre-RFC-7946 GeoJSON ``crs`` member as a pyproj input (None when absent); ValueError when unreadable."""
    if member is None:
        return None
    props = member.get("properties") if isinstance(member, dict) else None
    if isinstance(props, dict) and isinstance(props.get("name"), str):
        return props["name"]
    raise ValueError(f"unrecognised 'crs' member {member!r}: expected {{'type': 'name', 'properties': "
                     "{'name': 'urn:ogc:def:crs:EPSG::2154'}}")


def polygon_points(geometry: Any) -> np.ndarray:
    """(N, 2) float64 positions of every ring of a GeoJSON Polygon/MultiPolygon; ValueError when malformed."""
    if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
        kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
        raise ValueError(f"expected a Polygon or MultiPolygon geometry, got {kind!r}")
    polygons = [geometry.get("coordinates")] if geometry["type"] == "Polygon" else geometry.get("coordinates")
    try:
        points = np.concatenate([np.asarray(ring, dtype=np.float64)[:, :2] for poly in polygons for ring in poly])
    except (TypeError, ValueError, IndexError):
        raise ValueError("coordinates are not lists of [x, y] positions") from None
    if not len(points) or not np.isfinite(points).all():
        raise ValueError("polygon has no finite positions")
    return points


def polygon_centroid(geometry: Any) -> tuple[float, float]:
    """Area centroid (shoelace formula) of a GeoJSON Polygon/MultiPolygon, holes subtracted, in its own CRS.

    Coordinates are shifted to the first vertex first so Lambert-93 magnitudes (~1e6 m) lose no precision.
    Raises ValueError for other geometry types or a zero-area polygon.
    """
    if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
        kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
        raise ValueError(f"expected a Polygon or MultiPolygon geometry, got {kind!r}")
    coords = geometry.get("coordinates")
    polygons = [coords] if geometry["type"] == "Polygon" else coords
    try:
        rings = [(np.asarray(ring, dtype=np.float64)[:, :2], r == 0) for poly in polygons
                 for r, ring in enumerate(poly)]
    except (TypeError, ValueError, IndexError):
        raise ValueError("coordinates are not lists of [x, y] positions") from None
    if not rings or any(ring.ndim != 2 or len(ring) < 3 for ring, _ in rings):
        raise ValueError("a polygon ring has fewer than 3 positions")
    x0, y0 = rings[0][0][0]
    area = cx = cy = 0.0
    for ring, exterior in rings:
        x, y = ring[:, 0] - x0, ring[:, 1] - y0
        xn, yn = np.roll(x, -1), np.roll(y, -1)
        cross = x * yn - xn * y
        a = cross.sum() / 2
        sign = 1.0 if exterior else -1.0  # ring orientation is not reliable in the wild: use |area|
        w = sign * abs(a)
        if a != 0:
            cx += w * ((x + xn) * cross).sum() / (6 * a)
            cy += w * ((y + yn) * cross).sum() / (6 * a)
        area += w
    if not area > 0 or not math.isfinite(area):
        raise ValueError("polygon has zero area")
    return x0 + cx / area, y0 + cy / area
