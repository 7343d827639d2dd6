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
function of the store and the seed (fixed tar header fields).

Which tiles go to which shard is planned first (``shard_plan.py``), so every shard is one task of an executor
(a local pool or a Dask cluster) and the set is the same bytes however many workers write it. ``DIR`` is a local
folder or any fsspec url: a local shard is written to a temporary name and renamed, a remote one is uploaded when
finished; a done marker per shard (``DIR/_build/``) lets ``resume`` keep what a killed run finished, and the
markers are removed once ``index.json`` is written.

Beside each shard, ``<split>/<tier>-<nnnnn>.samples.json`` (its sidecar) lists the shard's sample keys, tile
ids and member layout; ``index.json`` holds per shard only url, samples, bytes, sha256 and the sidecar's size and
sha256 (``stream/index_format.py`` describes both). Every sample of a shard has the same members in the same
order (one manifest), so the layout is one integer row per sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from maestro_data import __version__
from maestro_data.build.executors import Executor, LocalExecutor, new_token, worker_cache
from maestro_data.build.shard_plan import ShardTask, plan_shards, sample_meta
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import ShardError, StoreError
from maestro_data.location import Location
from maestro_data.stream.index_format import (
    COLUMNS,
    INDEX_FORMAT,
    INDEX_NAME,
    INDEX_SCHEMA,
    encode_sidecar,
    index_bytes,
    sample_key,
    sidecar_url,
)
from maestro_data.tile import Tile

DEFAULT_SHARD_BYTES = 1 << 30
PROGRESS_DIR = "_build"  # per-shard done markers while a shard set is being written (removed once indexed)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_members(tile: Tile, dataset: str) -> list[tuple[str, bytes]]:
    """The (name, bytes) members of one tile's sample, in a fixed order (``shard_plan`` sizes them ahead)."""
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
    members.append((f"{key}.json", sample_meta(tile.tile_id, tile.split, tile.fold, tile.lon, tile.lat,
                                               tile.ref_date, counts, dataset, tile.grids)))
    return members


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info


class _HashingFile:
    """A binary file that hashes what is written, so a finished shard is never read back to be checksummed."""

    def __init__(self, path: Path, durable: bool = True):
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.durable = durable

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())
        self._file.close()


class _ShardWriter:
    """Writes one shard and its sidecar; returns the shard's index row. A local shard is written under a temporary
    name beside its place and renamed; a remote one is spooled to a local temporary file and uploaded when
    finished (multipart when large), so the bucket never holds part of a shard."""

    def __init__(self, out: Location, rel: str):
        self.out, self._rel = out, rel
        if out.is_local:
            self._path = out.path / rel
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self._path.with_name(self._path.name + ".tmp")
        else:
            fd, name = tempfile.mkstemp(prefix="maestro-shard-", suffix=".tar")
            os.close(fd)
            self._tmp = Path(name)
        self._file = _HashingFile(self._tmp, durable=out.is_local)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._keys: list[str] = []
        self._ids: list[str] = []
        self._fields: list[str] | None = None
        self._layout: list[int] = []

    def add(self, tile_id: str, members: list[tuple[str, bytes]]) -> None:
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
            raise ShardError(f"{self.out.join(self._rel)}: tile {tile_id!r} has members {fields}, the shard's first "
                             f"sample {self._fields}: one shard holds samples of one layout")
        self._layout += layout
        self._keys.append(key)
        self._ids.append(tile_id)

    def finish(self) -> tuple:
        try:
            self._tar.close()
            self._file.close()
            self.out.put_file(self._tmp, self._rel)
        finally:
            if not self.out.is_local:
                self._tmp.unlink(missing_ok=True)
        sha256 = self._file.sha256.hexdigest()
        sidecar = encode_sidecar(sha256, self._keys, self._ids, self._fields or [], self._layout)
        self.out.write_bytes(sidecar_url(self._rel), sidecar, durable=True)
        return (self._rel, len(self._keys), self._file.size, sha256, len(sidecar), hashlib.sha256(sidecar).hexdigest())

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardOptions:
    shard_bytes: int = DEFAULT_SHARD_BYTES
    seed: int = 0
    quiet: bool = False
    resume: bool = False  # keep the shards a killed run finished (same store, seed and size), write the rest
    workers: int = 1  # local processes when no executor is given


@dataclass(frozen=True)
class _Job:
    """What every shard task needs; reaches each worker once (``executors.py``)."""

    store: Location
    out: Location
    identity: str  # the store's build and the writer's settings: a done marker of another run never matches
    token: str = field(default_factory=new_token)


def _marker(task: ShardTask) -> str:
    return f"{PROGRESS_DIR}/{task.url.removesuffix('.tar')}.json"


def _digest(job: _Job, task: ShardTask) -> str:
    return hashlib.sha256(json.dumps([job.identity, task.url, task.indices]).encode()).hexdigest()


def _write_shard(job: _Job, task: ShardTask) -> tuple:
    """Task: read the shard's tiles from the store, write the shard and its sidecar, then its done marker."""
    store = worker_cache(job.token, lambda: TileStore(job.store))
    writer = _ShardWriter(job.out, task.url)
    try:
        for i in task.indices:
            tile = store.read_tile(i)
            writer.add(tile.tile_id, sample_members(tile, store.manifest.name))
    except BaseException:
        writer.discard()
        raise
    row = writer.finish()
    job.out.write_bytes(_marker(task), json.dumps({"digest": _digest(job, task), "row": list(row)}).encode())
    return row


def _finished(job: _Job, tasks: list[ShardTask]) -> dict[int, tuple]:
    """Shards of ``tasks`` that a killed run of the same job completed: marker of this job, shard and sidecar of
    the recorded sizes (one listing and concurrent marker reads on an object store)."""
    sizes = job.out.sizes()
    wanted = {k: _marker(t) for k, t in enumerate(tasks) if _marker(t) in sizes}
    raw = job.out.read_many(list(wanted.values()))
    done = {}
    for k, rel in wanted.items():
        try:
            marker = json.loads(raw[rel] or b"")
            row = tuple(marker["row"])
        except (ValueError, KeyError, TypeError):
            continue
        task = tasks[k]
        if marker.get("digest") == _digest(job, task) and sizes.get(task.url) == row[2] \
                and sizes.get(sidecar_url(task.url)) == row[4]:
            done[k] = row
    return done


def write_shards(store_path: str | Path | Location, out: str | Path | Location, options: ShardOptions | None = None,
                 executor: Executor | None = None) -> dict:
    """Write every valid tile of ``store_path`` as shards under ``out`` (a folder or any fsspec url), one task per
    shard on ``executor``; returns the index (also index.json, written last)."""
    options = options or ShardOptions()
    if executor is None:
        with LocalExecutor(options.workers) as local:
            return write_shards(store_path, out, options, local)
    store = TileStore(store_path)
    damage = store.verify()
    if damage:
        raise StoreError(f"refusing to write shards from a damaged tile store: {damage[0]}"
                         + (f" (and {len(damage) - 1} more)" if len(damage) > 1 else "")
                         + "; rebuild the damaged blocks with `maestro-data build ... --resume`")
    out = Location.of(out)
    out.makedirs()
    out.delete(INDEX_NAME)  # the index is the commit marker: it must not outlive a rewrite
    if out.is_local:
        for stale in out.path.rglob("*.tmp"):  # left by a killed local writer (a remote one leaves no object)
            stale.unlink()
    if not options.resume:
        out.remove_tree(PROGRESS_DIR)
    provenance = store.attrs.get("provenance") or {}
    identity = json.dumps([provenance.get("build_id") or provenance.get("created"), store.attrs.get("plan_sha256"),
                           __version__, options.seed, options.shard_bytes])
    job = _Job(store.location, out, identity)
    tasks = plan_shards(store, options.seed, options.shard_bytes, sample_key)
    rows = _finished(job, tasks) if options.resume else {}
    todo = [t for k, t in enumerate(tasks) if k not in rows]
    with tqdm(total=int(store.valid.sum()), desc=f"shards {store.manifest.name}", unit="tile",
              disable=options.quiet) as bar:
        bar.update(sum(r[1] for r in rows.values()))
        written = executor.run(_write_shard, job, todo, label="shard", on_done=lambda _, row: bar.update(row[1]))
    by_url = {r[0]: r for r in (*rows.values(), *written)}
    index = _index(store, tasks, by_url, options.seed)
    out.write_bytes(INDEX_NAME, index_bytes(index), durable=True)
    out.remove_tree(PROGRESS_DIR)
    return index


def _index(store: TileStore, tasks: list[ShardTask], rows: dict[str, tuple], seed: int) -> dict:
    """The index of the planned shards (in plan order, which is the order one sequential writer would use)."""
    by_tier: dict[tuple[str, str], list[tuple]] = {}
    for task in tasks:
        by_tier.setdefault((task.split, task.tier), []).append(rows[task.url])
    splits = {}
    for split in store.manifest.splits.names:
        tiers = {}
        for tier, _ in store.tiers(split):
            shard_rows = by_tier.get((split, tier), [])
            tiers[tier] = {name: [row[c] for row in shard_rows] for c, name in enumerate(COLUMNS)}
        _, counts = store.subsets(split)
        splits[split] = {"tiers": tiers, "subsets": {str(p): c for p, c in counts.items()},
                         "samples": sum(sum(t["samples"]) for t in tiers.values())}
    return {
        "format": INDEX_FORMAT, "schema": INDEX_SCHEMA, "toolkit_version": __version__, "seed": seed,
        "manifest": {"name": store.manifest.name, "sha256": store.manifest.sha256, "text": store.manifest.text},
        "splits": splits, "split_origin": store.split_origin(), "labelled": store.labelled,
    }
