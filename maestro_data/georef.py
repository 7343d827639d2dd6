"""A tile's georeference as stored: every grid (CRS, affine transform, size) as one JSON text per tile.

The same text goes into the tile store (``tiles/grids``) and into each shard sample's metadata (``grids``), so a
prediction can be written exactly on the source label raster's grid. JSON rather than numeric arrays: a CRS may be
WKT, and the set of grids differs between datasets (and between labelled and unlabelled builds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from maestro_data.errors import StoreError
from maestro_data.tile import Grid


def grid_record(grid: Grid) -> dict:
    return {"crs": grid.crs, "transform": [float(v) for v in grid.transform], "width": int(grid.width),
            "height": int(grid.height)}


def grids_record(grids: Mapping[str, Grid]) -> dict[str, dict]:
    """JSON-ready ``{name: {crs, transform, width, height}}`` in name order (deterministic bytes)."""
    return {name: grid_record(grids[name]) for name in sorted(grids)}


def encode_grids(grids: Mapping[str, Grid]) -> str:
    return json.dumps(grids_record(grids), sort_keys=True, separators=(",", ":"))


def grids_from_record(record: Mapping[str, Mapping], where: str = "tile metadata") -> dict[str, Grid]:
    """The grids of a stored record; a StoreError naming ``where`` when a field is missing or malformed."""
    out = {}
    for name, g in record.items():
        try:
            transform = tuple(float(v) for v in g["transform"])
            if len(transform) != 6:
                raise ValueError(f"{len(transform)} transform values, expected 6")
            crs = g["crs"]
            if crs is not None and not isinstance(crs, str):
                raise ValueError(f"crs {crs!r} is not a string")
            out[name] = Grid(crs, transform, int(g["width"]), int(g["height"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where}: grid {name!r} is malformed ({exc})") from None
    return out


def decode_grids(text: str, where: str = "tile store") -> dict[str, Grid]:
    """Inverse of :func:`encode_grids`; an empty text (a skipped tile) is no grid."""
    if not text:
        return {}
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{where}: grids are not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise StoreError(f"{where}: grids are not a JSON object")
    return grids_from_record(record, where)
