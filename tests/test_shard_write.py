"""store.write_block's shard writer writes byte for byte what zarr-python writes, and leaves other layouts to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.storage import MemoryStore

from maestro_data.build import integrity
from maestro_data.build.store import _create
from maestro_data.build.zarr_shards import write_chunks, write_pieces


def _pair(shape, dtype, chunks, shards):
    stores = [integrity.RecordingStore(MemoryStore({})) for _ in range(2)]
    arrays = [_create(zarr.open_group(store=s, mode="w", zarr_format=3), "a", shape, dtype, chunks, shards)
              for s in stores]
    return stores, arrays


@pytest.mark.parametrize("dtype,shape,chunks,shards,start,length", [
    ("uint8", (12, 4, 8, 8), (1, 4, 8, 8), (4, 4, 8, 8), 4, 3),       # aerial-like: one step per chunk
    ("float32", (40, 2, 3, 3), (5, 2, 3, 3), (20, 2, 3, 3), 20, 15),   # series: several steps per chunk
    ("uint16", (40, 2, 3, 3), (5, 2, 3, 3), (20, 2, 3, 3), 0, 20),     # a whole shard
    ("uint8", (6, 16, 16), (1, 16, 16), (3, 16, 16), 3, 2),             # label rasters
])
def test_same_bytes_as_zarr(dtype, shape, chunks, shards, start, length):
    rng = np.random.default_rng(0)
    values = (rng.random((length, *shape[1:])) * 100).astype(dtype)
    values[0] = 0  # a chunk of fill values is written all the same
    if values.dtype.kind == "f":
        values[-1, 0, 0, 0] = np.nan
    (zs, ms), (za, ma) = _pair(shape, dtype, chunks, shards)
    za.with_config({"write_empty_chunks": True})[start:start + length] = values
    write_chunks(ma, start, values)
    assert zs.written == ms.written  # the same keys, sizes and sha256
    np.testing.assert_array_equal(ma[start:start + length], values)
    assert {k: v.to_bytes() for k, v in zs._store._store_dict.items()} == \
        {k: v.to_bytes() for k, v in ms._store._store_dict.items()}


def test_other_writes_fall_back_to_zarr():
    (_, _), (_, arr) = _pair((12, 2, 4, 4), "uint16", (2, 2, 4, 4), (4, 2, 4, 4))
    values = np.arange(3 * 32, dtype=np.uint16).reshape(3, 2, 4, 4)
    write_chunks(arr, 2, values)  # neither shard-aligned nor whole chunks
    np.testing.assert_array_equal(arr[2:5], values)


def test_pieces_with_gaps_and_casts_match_an_assembled_write():
    """Pieces the size of whole chunks are compressed as they are; gaps stay zeros; other dtypes are cast."""
    (zs, ms), (za, ma) = _pair((24, 2, 3, 3), "uint16", (4, 2, 3, 3), (12, 2, 3, 3))
    rng = np.random.default_rng(1)
    pieces = [(0, rng.integers(0, 900, (4, 2, 3, 3)).astype(np.uint16)),   # one whole chunk, as is
              (4, rng.integers(0, 200, (3, 2, 3, 3)).astype(np.uint8)),    # part of a chunk, cast
              (8, rng.integers(0, 900, (4, 2, 3, 3)).astype(np.uint16))]
    values = np.zeros((12, 2, 3, 3), np.uint16)
    for off, p in pieces:
        values[off:off + len(p)] = p
    za.with_config({"write_empty_chunks": True})[12:24] = values
    write_pieces(ma, 12, 12, pieces)
    assert zs.written == ms.written
    np.testing.assert_array_equal(ma[12:24], values)
