"""What a build wrote, file by file, so that lost or damaged store data is never read back as fill values.

zarr returns an array's fill value for a chunk file that does not exist, so a store whose chunk was deleted would
serve zeros without a word. Each writer therefore records, right after its write and before its commit marker,
every chunk or shard file it produced with its byte size and sha256 (``<store>/_integrity/<part>.json``; parts:
``plan`` for the planner's arrays, ``block-<b>`` per block of tiles, ``subsets``). A file that was legitimately
not written (a chunk holding only fill values) is simply absent from the record. Readers check presence and size
before trusting a block (cheap: one stat per file); ``verify --full`` and ``build --resume`` also checksum.
The store may be local or any fsspec url (``location.Location``): sizes and checksums go through its filesystem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zarr.storage import WrapperStore

from maestro_data.location import Location
from maestro_data.manifest import Manifest

INTEGRITY_DIR = "_integrity"


def chunk_key(array: str, first: int, ndim: int) -> str:
    """Storage key of the chunk (or shard) of ``array`` whose first grid coordinate is ``first`` (others 0)."""
    return f"{array}/c/{first}" + "/0" * (ndim - 1)


def planner_arrays(manifest: Manifest) -> list[tuple[str, int]]:
    """(array path, ndim) of the arrays the planner writes in one chunk each."""
    out = [("tiles/id", 1), ("tiles/split", 1), ("tiles/fold", 1)]
    for m in manifest.modalities:
        out += [(f"{m}/offsets", 1), (f"{m}/count", 1)]
    return out


def block_arrays(manifest: Manifest) -> list[tuple[str, int]]:
    """(array path, ndim) of the arrays whose chunk or shard number ``b`` belongs to block ``b`` alone."""
    out = [("tiles/lon", 1), ("tiles/lat", 1), ("tiles/valid", 1), ("tiles/ref_date", 2), ("tiles/grids", 1)]
    for name, spec in manifest.modalities.items():
        out += [(f"{name}/data", 4), (f"{name}/dates", 2), (f"{name}/nan_count", 1)]
        if spec.cloud_mask is not None:
            out.append((f"{name}/mask", 4))
    for name, t in manifest.targets.items():
        out.append((f"targets/{name}", 2 if t.type == "multilabel" else 3))
    return out


def _part_key(part: str) -> str:
    return f"{INTEGRITY_DIR}/{part}.json"


_GROUPS_MADE: set[str] = set()  # per process: stores whose record folder is known to exist


def _ensure_group(store: Location, new_store: bool) -> None:
    """The record folder is an (empty) zarr group, so that zarr's hierarchy walks accept it. A new store (the
    planner's record, its first) always gets it: the url may name a store this process saw before an --overwrite."""
    key = f"{INTEGRITY_DIR}/zarr.json"
    if store.url in _GROUPS_MADE and not new_store:
        return
    if new_store or store.size(key) is None:
        store.write_bytes(key, json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
            "about": "chunk integrity records (maestro_data.build.integrity)"}}).encode())
    _GROUPS_MADE.add(store.url)


class RecordingStore(WrapperStore):
    """A zarr store that remembers the size and sha256 of every object written through it, so that a writer
    records its chunks without reading them back (from an object store that would be a second transfer of every
    byte). An object zarr deletes (a chunk of fill values only) is forgotten."""

    def __init__(self, store, written: dict[str, list] | None = None):
        super().__init__(store)
        self.written: dict[str, list] = {} if written is None else written

    def _with_store(self, store):
        return type(self)(store, self.written)

    async def set(self, key: str, value) -> None:
        data = value.as_numpy_array()  # hashed in place: a copy of every shard costs as much as a third of its hash
        await self._store.set(key, value)
        self.written[key] = [int(data.nbytes), hashlib.sha256(data).hexdigest()]

    async def _set_many(self, values) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        self.written.pop(key, None)

    def take(self, keys: list[str]) -> dict[str, list]:
        """What was written to ``keys`` (removed from memory: a block is recorded once)."""
        return {k: self.written.pop(k) for k in keys if k in self.written}


def record(store: Location | Path, part: str, keys: list[str], written: dict[str, list] | None = None,
           ) -> dict[str, list]:
    """Size and sha256 of every file of ``keys`` that exists, written atomically as the record of ``part``.

    ``written`` holds what a RecordingStore saw the writer write: the keys it did not see were not written (a
    part's keys are its writer's alone). Without it every key is read back through the store's filesystem (a local
    file, or an object of the bucket)."""
    store = Location.of(store)
    files = {}
    for key in keys:
        if written is not None:
            if key in written:
                files[key] = written[key]
            continue
        size = store.size(key)
        if size is not None:
            files[key] = [size, store.sha256(key)]
    _ensure_group(store, new_store=part == "plan")
    store.write_bytes(_part_key(part), json.dumps({"files": files}, sort_keys=True).encode())
    return files


def record_plan(store: Location | Path, manifest: Manifest, written: dict[str, list] | None = None) -> None:
    record(store, "plan", [chunk_key(a, 0, n) for a, n in planner_arrays(manifest)], written)


def block_keys(manifest: Manifest, block: int) -> list[str]:
    return [chunk_key(a, block, n) for a, n in block_arrays(manifest)]


def record_block(store: Location | Path, manifest: Manifest, block: int,
                 written: dict[str, list] | None = None) -> None:
    record(store, f"block-{block}", block_keys(manifest, block), written)


def record_subsets(store: Location | Path, splits: list[str], written: dict[str, list] | None = None) -> None:
    record(store, "subsets", [chunk_key(f"subsets/{s}/order", 0, 1) for s in splits], written)


@dataclass(frozen=True)
class Damage:
    """One file of a record that is missing, of another size, or (checksummed) of other contents."""

    part: str
    key: str
    what: str

    def describe(self, store: Location | Path) -> str:
        return f"{Location.of(store).join(self.key)}: {self.what}"


def check(store: Location | Path, part: str, *, full: bool = False, sizes: dict[str, int] | None = None,
          raw: bytes | None = None) -> list[Damage]:
    """Damage of one recorded part; a part without a record is damage too (the writer never finished it).

    ``sizes`` (every file of the store with its size, from one listing) and ``raw`` (the record's bytes, already
    fetched) spare a remote store one request per file (see ``check_parts``)."""
    store = Location.of(store)
    key = _part_key(part)
    try:
        files = json.loads(raw if raw is not None else store.read_bytes(key))["files"]
    except FileNotFoundError:
        return [Damage(part, key, "no integrity record (written before this toolkit recorded integrity, or the "
                                  "write was interrupted)")]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [Damage(part, key, f"unreadable integrity record ({exc})")]
    if sizes is None and not store.is_local:
        sizes = store.sizes_of(list(files))  # concurrent requests rather than one round trip per file
    out = []
    for name, (size, digest) in files.items():
        actual = sizes.get(name) if sizes is not None else store.size(name)
        if actual is None:
            out.append(Damage(part, name, f"missing (written by the build, {size} bytes)"))
        elif actual != size:
            out.append(Damage(part, name, f"{actual} bytes, the build wrote {size}"))
        elif full and store.sha256(name) != digest:
            out.append(Damage(part, name, "sha256 differs from what the build wrote"))
    return out


def check_parts(store: Location | Path, parts: list[str], *, full: bool = False,
                on_part: Callable[[], None] | None = None) -> dict[str, list[Damage]]:
    """``check`` of many parts (``on_part`` after each). Locally one stat per file; remotely one listing of the
    store and the records fetched concurrently, so a store of 10^5 blocks is not 10^6 sequential requests."""
    store = Location.of(store)
    sizes = None if store.is_local else store.sizes()
    records = {} if store.is_local else store.read_many([_part_key(p) for p in parts])
    out = {}
    for part in parts:
        # a record not fetched (None, or local) is read by check, which names why it cannot be
        out[part] = check(store, part, full=full, sizes=sizes, raw=records.get(_part_key(part)))
        if on_part:
            on_part()
    return out


def parts(num_blocks: int, with_subsets: bool) -> list[str]:
    return ["plan", *(f"block-{b}" for b in range(num_blocks)), *(["subsets"] if with_subsets else [])]
