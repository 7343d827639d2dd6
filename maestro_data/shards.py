"""WebDataset shards from a tile store: plain POSIX tar, one sample per tile, nested subset tiers, index last.

Layout of ``DIR``::

    index.json                      written last: the commit marker (schema, manifest, per split/tier shards)
    <split>/<tier>-<nnnnn>.tar      tier "5" = the 5 % FPS subset, "20" = 20 % minus 5 %, "100" = the rest

A subset of p % is the union of the tiers named <= p, so no byte is stored twice. Each sample holds, for a tile
with key ``K`` (the tile id percent-encoded so that it has no ``.`` or ``/``, which webdataset would split on):
``K.<mod>.npy`` (T, C, H, W) stored dtype, full time series; ``K.<mod>_dates.npy`` (T, 3) int16;
``K.<mod>_mask.npy`` where the modality has a cloud mask; ``K.<target>.npy``; ``K.json`` (tile id, split, fold,
lon, lat, reference date, ``grids``: CRS, transform and size of every grid, ``maestro_data/georef.py``).
Tiles are written in a seeded random order so every shard is a random sample of its tier; bytes are a pure
function of the store and the seed (fixed tar header fields), and each shard is written to a temporary name and
renamed.

Beside each shard, ``<split>/<tier>-<nnnnn>.samples.json`` (its sidecar) lists the shard's sample keys, tile
ids and member layout; ``index.json`` holds per shard only url, samples, bytes, sha256 and the sidecar's size and
sha256 (``maestro_data/index_format.py`` describes both). Every sample of a shard has the same members in the same
order (one manifest), so the layout is one integer row per sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
from tqdm import tqdm

from maestro_data import __version__, georef
from maestro_data.errors import ShardError, StoreError
from maestro_data.index_format import (
    COLUMNS,
    INDEX_FORMAT,
    INDEX_NAME,
    INDEX_SCHEMA,
    encode_sidecar,
    index_bytes,
    sidecar_url,
)
from maestro_data.randomness import permutation
from maestro_data.store import TileStore
from maestro_data.tile import Tile

DEFAULT_SHARD_BYTES = 1 << 30


def sample_key(tile_id: str) -> str:
    """Reversible, tar- and webdataset-safe key: every character outside [A-Za-z0-9_-] is percent-encoded."""
    return quote(tile_id, safe="").replace(".", "%2E").replace("~", "%7E")


def tile_id_of(key: str) -> str:
    return unquote(key)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_members(tile: Tile, dataset: str) -> list[tuple[str, bytes]]:
    """The (name, bytes) members of one tile's sample, in a fixed order."""
    key = sample_key(tile.tile_id)
    members = []
    counts = {}
    for name, series in tile.series.items():
        members.append((f"{key}.{name}.npy", _npy_bytes(series.data)))
        members.append((f"{key}.{name}_dates.npy", _npy_bytes(series.dates)))
        if series.mask is not None:
            members.append((f"{key}.{name}_mask.npy", _npy_bytes(series.mask)))
        counts[name] = int(series.data.shape[0])
    for name, target in tile.targets.items():
        members.append((f"{key}.{name}.npy", _npy_bytes(target)))
    meta = {"tile_id": tile.tile_id, "split": tile.split, "fold": tile.fold, "lon": tile.lon, "lat": tile.lat,
            "ref_date": [int(v) for v in tile.ref_date], "dates": counts, "dataset": dataset,
            "grids": georef.grids_record(tile.grids)}
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info


class _HashingFile:
    """A binary file that hashes what is written, so a finished shard is never read back to be checksummed."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path`` through a temporary name and a rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Writes consecutive shards of one tier and their sidecars, rolling over at ``max_bytes``; returns the index
    columns of the tier."""

    def __init__(self, out: Path, split: str, tier: str, max_bytes: int):
        self.out, self.split, self.tier, self.max_bytes = out, split, tier, max_bytes
        self.columns: dict[str, list] = {name: [] for name in COLUMNS}
        self._tar = None

    def _open(self) -> None:
        self._rel = f"{self.split}/{self.tier}-{len(self.columns['url']):05d}.tar"
        self._path = self.out / self._rel
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path.with_name(self._path.name + ".tmp")
        self._file = _HashingFile(self._tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._keys: list[str] = []
        self._ids: list[str] = []
        self._fields: list[str] | None = None
        self._layout: list[int] = []

    def add(self, tile_id: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._open()
        key = sample_key(tile_id)
        start = self._tar.offset
        layout, fields = [start], []
        for name, data in members:
            self._tar.addfile(_tar_member(name, len(data)), io.BytesIO(data))
            # the data ends the member, padded to whole 512-byte blocks (tarfile's layout)
            blocks = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            layout += [self._tar.offset - blocks - start, len(data)]
            fields.append(name[len(key) + 1:].removesuffix(".npy"))
        if self._fields is None:
            self._fields = fields
        elif fields != self._fields:
            raise ShardError(f"{self._path}: tile {tile_id!r} has members {fields}, the shard's first sample "
                             f"{self._fields}: one shard holds samples of one layout")
        self._layout += layout
        self._keys.append(key)
        self._ids.append(tile_id)
        if self._file.tell() >= self.max_bytes:
            self._close()

    def _close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self._path)
        sha256 = self._file.sha256.hexdigest()
        sidecar = encode_sidecar(sha256, self._keys, self._ids, self._fields or [], self._layout)
        write_atomic(self.out / sidecar_url(self._rel), sidecar)
        row = (self._rel, len(self._keys), self._file.size, sha256, len(sidecar), hashlib.sha256(sidecar).hexdigest())
        for name, value in zip(COLUMNS, row, strict=True):
            self.columns[name].append(value)
        self._tar = None

    def finish(self) -> dict[str, list]:
        if self._tar is not None:
            self._close()
        return self.columns


@dataclass(frozen=True)
class ShardOptions:
    shard_bytes: int = DEFAULT_SHARD_BYTES
    seed: int = 0
    quiet: bool = False


def write_shards(store_path: str | Path, out: str | Path, options: ShardOptions | None = None) -> dict:
    """Write every valid tile of ``store_path`` as shards under ``out``; returns the index (also index.json)."""
    options = options or ShardOptions()
    store = TileStore(store_path)
    damage = store.verify()
    if damage:
        raise StoreError(f"refusing to write shards from a damaged tile store: {damage[0]}"
                         + (f" (and {len(damage) - 1} more)" if len(damage) > 1 else "")
                         + "; rebuild the damaged blocks with `maestro-data build ... --resume`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_NAME
    index_path.unlink(missing_ok=True)  # the index is the commit marker: it must not outlive a rewrite
    for stale in (*out.rglob("*.tar.tmp"), *out.rglob("*.json.tmp")):
        stale.unlink()
    splits = {}
    total = int(store.valid.sum())
    bar = tqdm(total=total, desc=f"shards {store.manifest.name}", unit="tile", disable=options.quiet)
    for split in store.manifest.splits.names:
        tiers = {}
        for tier, indices in store.tiers(split):
            order = indices[permutation(len(indices), options.seed, 0, f"shards/{split}/{tier}")]
            writer = _ShardWriter(out, split, tier, options.shard_bytes)
            for i in order:
                tile = store.read_tile(int(i))
                writer.add(tile.tile_id, sample_members(tile, store.manifest.name))
                bar.update(1)
            tiers[tier] = writer.finish()
        _, counts = store.subsets(split)
        splits[split] = {"tiers": tiers, "subsets": {str(p): c for p, c in counts.items()},
                         "samples": sum(sum(t["samples"]) for t in tiers.values())}
    bar.close()
    index = {
        "format": INDEX_FORMAT, "schema": INDEX_SCHEMA, "toolkit_version": __version__, "seed": options.seed,
        "manifest": {"name": store.manifest.name, "sha256": store.manifest.sha256, "text": store.manifest.text},
        "splits": splits, "split_origin": store.split_origin(), "labelled": store.labelled,
    }
    write_atomic(index_path, index_bytes(index))
    return index
