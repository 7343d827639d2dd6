"""PASTIS-HD file access (the reader's I/O edge): npy headers and arrays, SPOT GeoTIFFs, each failure a SourceError
naming the tile and the file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from maestro_data.errors import SourceError
from maestro_data.manifest import ModalitySpec, TargetSpec
from maestro_data.sources.base import check_file
from maestro_data.sources.geotiff import Header, read_geotiff
from maestro_data.tile import Grid


def check_target_shape(spec: TargetSpec, shape: tuple[int, ...], tile_id: str, path: Path) -> None:
    size = (spec.tile_size, spec.tile_size)
    if len(shape) not in (2, 3) or tuple(shape[-2:]) != size or 0 in shape:
        raise SourceError(f"{spec.name}: array of shape {tuple(shape)}, expected (C, {size[0]}, {size[1]}) with "
                          "the semantic classes in channel 0", tile_id=tile_id, path=str(path))


def npy_shape(path: Path, tile_id: str) -> tuple[int, ...]:
    """Shape from the npy header alone, checking the file is long enough to hold the array."""
    check_file(path, "npy", tile_id=tile_id, missing="missing file")
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported npy format version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
            needed, size = fh.tell() + math.prod(shape) * dtype.itemsize, path.stat().st_size
    except FileNotFoundError:  # removed since check_file
        raise SourceError("missing file", tile_id=tile_id, path=str(path)) from None
    except (OSError, ValueError, EOFError) as exc:
        raise SourceError(f"corrupt npy header: {exc}", tile_id=tile_id, path=str(path)) from None
    if dtype.kind not in "biuf":
        raise SourceError(f"npy of dtype {dtype}, expected a numeric array", tile_id=tile_id, path=str(path))
    if size < needed:
        raise SourceError(f"truncated npy: {size} bytes, {needed} needed for {shape} {dtype}", tile_id=tile_id,
                          path=str(path))
    return tuple(int(n) for n in shape)


def load_npy(path: Path, tile_id: str) -> np.ndarray:
    npy_shape(path, tile_id)  # clear messages for missing, corrupt and truncated files
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SourceError(f"corrupt npy: {exc}", tile_id=tile_id, path=str(path)) from None


def read_tif(path: Path, tile_id: str, spec: ModalitySpec, header_only: bool = False) -> tuple[Any, Grid]:
    """((T, C, H, W) array, band index = t*C + c as the official reader, or T alone with ``header_only``; grid)."""
    c, s = spec.stored_channels, spec.tile_size

    def check(h: Header) -> str | None:
        if h.count % c or (h.height, h.width) != (s, s):
            return f"{h.count} bands of {h.height}x{h.width} px, expected a multiple of {c} bands of {s}x{s} px"
        return None

    data, header = read_geotiff(path, spec.name, tile_id, missing="missing file", check=check,
                                pixels=not header_only)
    return (header.count // c if data is None else data.reshape(header.count // c, c, s, s)), header.grid
