"""Write whole chunks of one zarr v3 shard as one encoded object, byte for byte what zarr-python writes.

A block's write of a tile store array covers whole chunks of the one shard the block owns (``store.write_block``).
zarr-python spends ~1 ms of machinery per chunk on such a write (a partial-shard read-merge, a fill-value buffer
per chunk, a thread hop per codec call), more than blosc takes to compress the chunk. Here the chunks are encoded
with the array's own codec settings (bytes -> blosc, index bytes -> crc32c at the end, as ``store._create`` makes
every sharded array) and the shard is set through the array's store in one call, so a RecordingStore still
records it. An array of any other layout, or a write that is not whole chunks of one shard, is left to zarr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
_EMPTY = np.iinfo(np.uint64).max  # zarr's index entry of an absent chunk


def _layout(arr: zarr.Array) -> tuple[ShardingCodec, BloscCodec] | None:
    """The sharding and blosc codecs of an array laid out as the tile store makes them; None otherwise."""
    codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    shard = codecs[0]
    inner, index = tuple(shard.codecs), tuple(shard.index_codecs)
    little = ("little", None)
    if (len(inner) != 2 or not isinstance(inner[0], BytesCodec) or not isinstance(inner[1], BloscCodec)
            or getattr(inner[0].endian, "value", inner[0].endian) not in little
            or len(index) != 2 or not isinstance(index[0], BytesCodec) or not isinstance(index[1], Crc32cCodec)
            or getattr(index[0].endian, "value", index[0].endian) not in little
            or shard.index_location != ShardingCodecIndexLocation.end):
        return None
    if any(c != s for c, s in zip(shard.chunk_shape[1:], arr.shards[1:], strict=True)):
        return None  # several chunks across a non-time axis: zarr's Morton order, not a plain sequence
    return shard, inner[1]


@contextlib.contextmanager
def _one_blosc_thread() -> Iterator[None]:
    """Blosc's contextual single-threaded compressor, as zarr uses it from its worker threads: a worker process
    is one core's worth of work (several threads on 1 MiB chunks only add hand-offs)."""
    before = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False
    try:
        yield
    finally:
        numcodecs.blosc.use_threads = before


def write_chunks(arr: zarr.Array, start: int, values: np.ndarray) -> None:
    """``arr[start:start + len(values)] = values`` with every chunk of the range written (none skipped as fill),
    the range being whole chunks of one shard, from its start."""
    write_pieces(arr, start, len(values), [(0, values)])


def write_pieces(arr: zarr.Array, start: int, length: int, pieces: list[tuple[int, np.ndarray]]) -> None:
    """``write_chunks`` of ``length`` steps of zeros with each ``(offset, values)`` placed at ``offset`` steps
    from ``start`` (sorted, not overlapping): a chunk that is one piece's own rows is compressed from it as is,
    without the copy into a block-sized buffer (a few MB per FLAIR-HUB tile, page faults included)."""
    layout = _layout(arr)
    k, s = arr.chunks[0], arr.shards[0] if arr.shards else 0
    plain = (layout is not None and sys.byteorder == "little" and arr.dtype.byteorder in "=|<"
             and start % s == 0 and length % k == 0 and 0 < length <= s and start + length <= arr.shape[0])
    if not plain:
        arr.with_config({"write_empty_chunks": True})[start:start + length] = _assemble(arr, 0, length, pieces)
        return
    _, blosc = layout
    codec = Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=_SHUFFLE[blosc.shuffle.value],
                  blocksize=blosc.blocksize, typesize=blosc.typesize)
    index = np.full((s // k, 2), _EMPTY, dtype="<u8")
    parts, offset = [], 0
    with _one_blosc_thread():
        for j in range(length // k):
            chunk = _own_rows(arr, j * k, k, pieces)
            if chunk is None:
                chunk = _assemble(arr, j * k, k, pieces)
            part = codec.encode(chunk.reshape(-1).view(np.uint8))
            parts.append(part)
            index[j] = offset, len(part)
            offset += len(part)
    raw_index = index.tobytes()
    parts += [raw_index, google_crc32c.value(raw_index).to_bytes(4, "little")]
    key = arr.metadata.encode_chunk_key((start // s,) + (0,) * (arr.ndim - 1))
    buf = default_buffer_prototype().buffer.from_bytes(b"".join(parts))
    sync((arr.store_path / key).set(buf))


def _own_rows(arr: zarr.Array, a: int, n: int, pieces: list[tuple[int, np.ndarray]]) -> np.ndarray | None:
    """Rows ``a:a + n`` when one piece holds them all, contiguous, in the array's dtype and step shape."""
    for off, values in pieces:
        if off <= a and a + n <= off + len(values):
            rows = values[a - off:a - off + n]
            plain = rows.dtype == arr.dtype and rows.shape[1:] == arr.shape[1:] and rows.flags.c_contiguous
            return rows if plain else None
    return None


def _assemble(arr: zarr.Array, a: int, n: int, pieces: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Rows ``a:a + n`` of the zero-filled range with the pieces in place (cast as numpy assignment casts)."""
    out = np.zeros((n, *arr.shape[1:]), arr.dtype)
    for off, values in pieces:
        lo, hi = max(a, off), min(a + n, off + len(values))
        if lo < hi:
            out[lo - a:hi - a] = values[lo - off:hi - off]
    return out
