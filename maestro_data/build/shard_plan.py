"""Which tiles go to which shard, decided before any shard is written: a pure function of the store's tile table,
its array shapes, the seed and the target shard size.

A sequential writer closes a shard after the sample that takes its tar past ``shard_bytes``. Knowing every
sample's tar size in advance (tar headers and npy headers are functions of member names, shapes and dtypes; the
metadata JSON of the tile table) gives the same cuts without reading any data, so each shard can be written by
its own task, in parallel, and the shard set is byte for byte the one a single writer makes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from maestro_data import georef
from maestro_data.build.tile_store import TileStore
from maestro_data.randomness import permutation
from maestro_data.tile import Grid

PLAIN_NAME = 100  # ustar name field: longer (or non-ASCII) names get a PAX header
PLAIN_SIZE = 8**11  # ustar size field: 11 octal digits


@dataclass(frozen=True)
class ShardTask:
    """One output shard: ``<split>/<tier>-<number>.tar`` holding the store's tiles ``indices`` in this order."""

    split: str
    tier: str
    number: int
    indices: tuple[int, ...]

    @property
    def url(self) -> str:
        return f"{self.split}/{self.tier}-{self.number:05d}.tar"


def sample_meta(tile_id: str, split: str, fold: int, lon: float, lat: float, ref_date, counts: dict[str, int],
                dataset: str, grids: Mapping[str, Grid]) -> bytes:
    """The metadata member of a sample (the same function for the writer and for planning)."""
    meta = {"tile_id": tile_id, "split": split, "fold": fold, "lon": lon, "lat": lat,
            "ref_date": [int(v) for v in ref_date], "dates": counts, "dataset": dataset,
            "grids": georef.grids_record(grids)}
    return json.dumps(meta, sort_keys=True).encode()


@lru_cache(maxsize=4096)
def npy_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Size of ``np.save`` of a C-ordered array (version 1.0 header, as ``write_array`` picks for these)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.tell() + math.prod(shape) * np.dtype(dtype).itemsize


def member_tar_bytes(name: str, size: int) -> int:
    """Header(s) plus block-padded data of one member, as ``tarfile`` (PAX format) writes it."""
    padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if len(name) <= PLAIN_NAME and name.isascii() and size < PLAIN_SIZE:
        return tarfile.BLOCKSIZE + padded  # the common case, without building a header
    info = tarfile.TarInfo(name)
    info.size = size
    return len(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")) + padded


class SampleSizes:
    """Tar bytes of each tile's sample, from the tile table and the array shapes (no chunk is read)."""

    def __init__(self, store: TileStore):
        self.store = store
        root = store.root
        self.series = []  # (modality, [(suffix, shape after T, dtype)])
        for m in store.manifest.modalities:
            g = root[m]
            parts = [("", g["data"].shape[1:], g["data"].dtype.str), ("_dates", g["dates"].shape[1:],
                                                                      g["dates"].dtype.str)]
            if "mask" in g:
                parts.append(("_mask", g["mask"].shape[1:], g["mask"].dtype.str))
            self.series.append((m, parts))
        self.targets = [(t, root["targets"][t].shape[1:], root["targets"][t].dtype.str)
                        for t in store.manifest.targets]
        self.grids = root["tiles/grids"][:]  # one read of the column: the metadata member carries each tile's grids

    def members(self, i: int, key: str) -> list[tuple[str, int]]:
        s = self.store
        counts = {m: int(s.counts(m)[i]) for m, _ in self.series}
        out = [(f"{key}.{m}{suffix}.npy", npy_bytes((counts[m], *shape), dtype))
               for m, parts in self.series for suffix, shape, dtype in parts]
        out += [(f"{key}.{t}.npy", npy_bytes(tuple(shape), dtype)) for t, shape, dtype in self.targets]
        meta = sample_meta(s.tile_ids[i], s.splits[i], int(s.folds[i]), float(s.lon[i]), float(s.lat[i]),
                           s.ref_dates[i], counts, s.manifest.name,
                           georef.decode_grids(str(self.grids[i]), f"{s.path}: tile {s.tile_ids[i]!r}"))
        out.append((f"{key}.json", len(meta)))
        return out

    def tar_bytes(self, i: int, key: str) -> int:
        return sum(member_tar_bytes(name, size) for name, size in self.members(i, key))


def cut(sizes: list[int], shard_bytes: int) -> list[range]:
    """Consecutive samples per shard: a shard closes after the sample that brings it to ``shard_bytes``."""
    out, start, total = [], 0, 0
    for k, size in enumerate(sizes):
        total += size
        if total >= shard_bytes:
            out.append(range(start, k + 1))
            start, total = k + 1, 0
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def plan_shards(store: TileStore, seed: int, shard_bytes: int, key_of) -> list[ShardTask]:
    """Every shard of every split and tier, in index order; tiles in a seeded random order within a tier."""
    sizes = SampleSizes(store)
    tasks = []
    for split in store.manifest.splits.names:
        for tier, indices in store.tiers(split):
            order = indices[permutation(len(indices), seed, 0, f"shards/{split}/{tier}")]
            per_sample = [sizes.tar_bytes(int(i), key_of(store.tile_ids[int(i)])) for i in order]
            for number, rng in enumerate(cut(per_sample, shard_bytes)):
                tasks.append(ShardTask(split, tier, number, tuple(int(order[k]) for k in rng)))
    return tasks
