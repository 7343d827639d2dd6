"""The zarr v3 tile store: one store per built dataset, lossless, ragged in time, written by whole shards.

Layout (``<out>/store.zarr``)::

    zarr.json                 attrs: format, schema, manifest (name, sha256, text), plan, provenance, complete
    tiles/{id,split,fold}     (N,)  written by the planner
    tiles/{lon,lat}           (N,)  float64        } written by the worker that owns the tile's block
    tiles/ref_date            (N,3) int16          }
    tiles/valid               (N,)  bool           } False where the tile was skipped (--on-error skip)
    tiles/grids               (N,)  str            } JSON: CRS, transform and size of every grid (georef.py)
    <mod>/offsets, <mod>/count  (N+1,), (N,)  start and length of each tile on the flat time axis
    <mod>/data                (S, C, H, W) stored dtype      flat time axis, chunks of k steps
    <mod>/dates               (S, 3) int16 (year, day of year, hour)
    <mod>/mask                (S, C_mask, H, W) snow/cloud probabilities, where the manifest has a cloud mask
    targets/<name>            (N, K) fractions or (N, H, W) class rasters (absent from an unlabelled store:
                              attrs ``labelled`` false, built with ``--no-targets`` for prediction only)

Tiles are grouped in blocks of ``block_tiles`` consecutive tiles. Block ``b`` owns shard ``b`` of every array: its
time steps start at ``b * shard_steps`` and each tile starts on a chunk boundary, so a shard is only ever written by
the one worker process that converts its block, in one write (concurrent partial-shard writes lose data,
zarr-python #3682), and one tile of one modality is a few chunk reads. That write covers the block's tiles only: the
shard's tail past its last tile is never stored, so the alignment costs no bytes on disk. A chunk holds at most
``MAX_CHUNK_STEPS`` time steps, so a small-pixel series (S2 10x10 px: 2 kB a step) pads each tile to ~128 steps
rather than to a megabyte of zeros that every build would copy and compress.

The store may live at any fsspec url (``location.Location``). Its metadata is consolidated into the root
``zarr.json`` once the planner has created every array and again after the subsets are written, so that opening
the store and its arrays is one request instead of two per array on an object store: a writer that adds arrays or
groups must call ``consolidate`` afterwards (readers would not see them otherwise).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore

from maestro_data import georef, integrity
from maestro_data import split_origin as origins
from maestro_data.errors import StoreError
from maestro_data.location import Location, resolve_store
from maestro_data.manifest import Manifest, ModalitySpec, parse_manifest
from maestro_data.shard_write import write_pieces
from maestro_data.tile import Series, Tile
from maestro_data.unlabelled import without_targets

STORE_FORMAT = "maestro-tile-store"
STORE_SCHEMA = 3  # 2: every written chunk recorded with its size and sha256 (maestro_data.integrity); 3: grids
_SCHEMA_HINTS = {1: " (built before chunk integrity was recorded)", 2: " (built before tiles kept their georeference)"}
CHUNK_TARGET_BYTES = 1 << 20  # ~1 MiB raw per chunk: big enough to compress well, small enough to read one tile
MAX_CHUNK_STEPS = 128  # ~ a year of Sentinel-1/2 acquisitions: one chunk per tile for most series


def codec(dtype: np.dtype) -> BloscCodec:
    """Blosc-lz4 with (bit)shuffle, chosen by benchmarks/build_throughput.py on FLAIR-HUB-shaped tiles: ~4.5x
    faster to encode than blosc-zstd-3 for 0.52x instead of 0.41x of the raw bytes; encoding was the largest
    cost of a build, and decoding lz4 is also the cheapest for the shard writer."""
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle" if dtype.itemsize > 1 else "bitshuffle",
                      typesize=dtype.itemsize)


def steps_per_chunk(spec: ModalitySpec) -> int:
    """Time steps per chunk: ~CHUNK_TARGET_BYTES, but at most MAX_CHUNK_STEPS."""
    step_bytes = spec.stored_channels * spec.tile_size**2 * np.dtype(spec.dtype).itemsize
    return max(1, min(MAX_CHUNK_STEPS, CHUNK_TARGET_BYTES // step_bytes))


@dataclass(frozen=True)
class ModalityPlan:
    chunk_steps: int
    shard_steps: int
    offsets: np.ndarray  # (N + 1,) int64; offsets[N] = total extent of the flat axis
    counts: np.ndarray  # (N,) int32


@dataclass(frozen=True)
class StorePlan:
    """Where every tile goes: a pure function of the tile list, the time-step counts and the block size."""

    tile_ids: list[str]
    splits: list[str]
    folds: list[int]
    block_tiles: int
    modalities: dict[str, ModalityPlan]

    @property
    def num_tiles(self) -> int:
        return len(self.tile_ids)

    @property
    def num_blocks(self) -> int:
        return max(1, math.ceil(self.num_tiles / self.block_tiles))

    def block_range(self, block: int) -> range:
        return range(block * self.block_tiles, min(self.num_tiles, (block + 1) * self.block_tiles))

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256()
        h.update(json.dumps([self.tile_ids, self.splits, self.folds, self.block_tiles]).encode())
        for name, mp in self.modalities.items():
            h.update(name.encode() + mp.offsets.tobytes() + mp.counts.tobytes())
        return h.hexdigest()


def make_plan(manifest: Manifest, tile_ids: list[str], splits: list[str], folds: list[int],
              counts: dict[str, list[int]], block_tiles: int) -> StorePlan:
    """Chunk-aligned offsets per tile, each block padded to a common shard length."""
    n = len(tile_ids)
    nblocks = max(1, math.ceil(n / block_tiles))
    mods = {}
    for name, spec in manifest.modalities.items():
        k = steps_per_chunk(spec)
        cnt = np.asarray(counts[name], dtype=np.int32)
        padded = -(-cnt // k) * k  # each tile starts on a chunk boundary
        block_len = [int(padded[b * block_tiles:(b + 1) * block_tiles].sum()) for b in range(nblocks)]
        shard = max(k, max(block_len) if block_len else k)
        offsets = np.zeros(n + 1, dtype=np.int64)
        for b in range(nblocks):
            lo, hi = b * block_tiles, min(n, (b + 1) * block_tiles)
            starts = b * shard + np.concatenate([[0], np.cumsum(padded[lo:hi])[:-1]]).astype(np.int64)
            offsets[lo:hi] = starts
        offsets[n] = nblocks * shard
        mods[name] = ModalityPlan(chunk_steps=k, shard_steps=shard, offsets=offsets, counts=cnt)
    return StorePlan(list(tile_ids), list(splits), list(folds), block_tiles, mods)


def _create(group: zarr.Group, name: str, shape: tuple, dtype, chunks: tuple, shards: tuple | None = None,
            fill_value=0) -> zarr.Array:
    dt = np.dtype(dtype)
    return group.create_array(name, shape=shape, dtype=dt, chunks=chunks, shards=shards, compressors=codec(dt),
                              fill_value=fill_value, config={"write_empty_chunks": False}, overwrite=True)


def create_store(path: Path | Location, manifest: Manifest, plan: StorePlan, provenance: dict,
                 labelled: bool = True) -> zarr.Group:
    """Create every array and write the planner's part (tile table, offsets). The plan digest is written last.

    ``path`` is a local folder or a Location (any fsspec url). The store is first made in memory and then written
    as a whole: on an object store one concurrent upload instead of ~10 sequential requests per array.
    ``labelled`` False: ``manifest`` has its targets removed (``without_targets``) and the store says so."""
    loc = Location.of(path)
    objects: dict = {}
    staging = integrity.RecordingStore(MemoryStore(objects))  # it records the planner's chunks for their record
    root = zarr.open_group(store=staging, mode="w", zarr_format=3)
    n, bt = plan.num_tiles, plan.block_tiles
    npad = plan.num_blocks * bt
    tiles = root.create_group("tiles")
    for name, values in (("id", plan.tile_ids), ("split", plan.splits)):
        arr = tiles.create_array(name, shape=(n,), dtype=str, chunks=(max(1, n),), overwrite=True)
        if n:
            arr[:] = np.asarray(values, dtype=str)
    _create(tiles, "fold", (n,), "int16", (max(1, n),))[:] = np.asarray(plan.folds, dtype=np.int16)
    for name, dtype in (("lon", "float64"), ("lat", "float64"), ("valid", "bool")):
        _create(tiles, name, (npad,), dtype, (bt,), fill_value=False if dtype == "bool" else 0)
    _create(tiles, "ref_date", (npad, 3), "int16", (bt, 3))
    tiles.create_array("grids", shape=(npad,), dtype=str, chunks=(bt,), fill_value="", overwrite=True)
    for name, spec in manifest.modalities.items():
        mp = plan.modalities[name]
        g = root.create_group(name)
        _create(g, "offsets", (n + 1,), "int64", (n + 1,))[:] = mp.offsets
        _create(g, "count", (n,), "int32", (max(1, n),))[:] = mp.counts
        total, k, s = int(mp.offsets[-1]), mp.chunk_steps, mp.shard_steps
        px = (spec.tile_size, spec.tile_size)
        _create(g, "data", (total, spec.stored_channels, *px), spec.dtype, (k, spec.stored_channels, *px),
                (s, spec.stored_channels, *px))
        _create(g, "dates", (total, 3), "int16", (s, 3))
        if spec.cloud_mask is not None:
            cm = len(spec.cloud_mask.bands)
            _create(g, "mask", (total, cm, *px), spec.cloud_mask.dtype, (k, cm, *px), (s, cm, *px))
        _create(g, "nan_count", (npad,), "int64", (bt,))
    tg = root.create_group("targets")
    for name, t in manifest.targets.items():
        if t.type == "multilabel":
            _create(tg, name, (npad, len(t.classes)), t.dtype, (bt, len(t.classes)))
        else:
            px = (t.tile_size, t.tile_size)
            _create(tg, name, (npad, *px), t.dtype, (1, *px), (bt, *px))
    root.attrs.update({
        "format": STORE_FORMAT, "schema": STORE_SCHEMA, "complete": False, "labelled": labelled,
        "manifest": {"name": manifest.name, "sha256": manifest.sha256, "text": manifest.text},
        "block_tiles": bt, "provenance": provenance,
    })
    root.attrs["plan_sha256"] = plan.digest()
    consolidate(staging)
    loc.remove_tree("")
    loc.write_many({k: v.to_bytes() for k, v in objects.items() if k != "zarr.json"})
    integrity.record_plan(loc, manifest, staging.written)
    loc.write_bytes("zarr.json", objects["zarr.json"].to_bytes())  # last: its plan digest marks the planner done
    return zarr.open_group(store=loc.zarr_store(), mode="r+", zarr_format=3)


def consolidate(store: Location | zarr.abc.store.Store) -> None:
    """Every node's metadata into the root ``zarr.json`` (one request to open the store and all its arrays)."""
    if isinstance(store, Location):
        store = store.zarr_store()
    with warnings.catch_warnings():  # zarr says consolidation is not yet in the v3 spec: zarr-python reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        # the integrity records are plain JSON objects inside an (empty) group: not zarr nodes, rightly skipped
        warnings.filterwarnings("ignore", message=".* is not recognized as a component of a Zarr hierarchy")
        zarr.consolidate_metadata(store, zarr_format=3)


def _block_extent(mp: ModalityPlan, rng: range, s0: int) -> int:
    """Steps of block shard from its start to the end of its last tile's last chunk; the rest stays unwritten."""
    if not len(rng):
        return 0
    last = rng[-1]
    k = mp.chunk_steps
    return int(mp.offsets[last]) - s0 + -(-int(mp.counts[last]) // k) * k


def write_block(root: zarr.Group, manifest: Manifest, plan: StorePlan, block: int,
                tiles: dict[int, Tile]) -> dict[str, int]:
    """Write one block (its own shards, one write each) from its tiles, keyed by tile index; missing tiles stay
    invalid (their chunks hold zeros).

    Returns NaN counts per modality for the report."""
    rng = plan.block_range(block)
    bt = plan.block_tiles
    lo = block * bt
    sl = slice(lo, lo + bt)
    lon = np.zeros(bt)
    lat = np.zeros(bt)
    valid = np.zeros(bt, bool)
    ref = np.zeros((bt, 3), np.int16)
    grids = np.full(bt, "", dtype=object)
    for i, tile in tiles.items():
        j = i - lo
        lon[j], lat[j], valid[j], ref[j] = tile.lon, tile.lat, True, tile.ref_date
        grids[j] = georef.encode_grids(tile.grids)
    # arrays are opened by path: opening their group first would read and parse one more zarr.json each time
    for name, values in (("lon", lon), ("lat", lat), ("valid", valid), ("ref_date", ref),
                         ("grids", grids.astype(str))):
        root[f"tiles/{name}"][sl] = values
    nans: dict[str, int] = {}
    for name, spec in manifest.modalities.items():
        mp = plan.modalities[name]
        s0 = block * mp.shard_steps
        # Only the block's tiles are written, chunk-aligned, and every chunk written holds a tile (or a skipped
        # tile's zeros): zarr's scan of each chunk for "all fill value" (a full compare per chunk and per shard)
        # would find nothing to drop, and the shard's tail past the last tile is simply never written.
        used = _block_extent(mp, rng, s0)
        floats = np.dtype(spec.dtype).kind == "f"
        data: list[tuple[int, np.ndarray]] = []  # (offset, series): placed in the shard by write_pieces
        dates = np.zeros((used, 3), np.int16)
        mask: list[tuple[int, np.ndarray]] | None = None if spec.cloud_mask is None else []
        nan_count = np.zeros(bt, np.int64)
        for i in rng:
            if i not in tiles:
                continue
            series = tiles[i].series[name]
            a, c = int(mp.offsets[i]) - s0, int(mp.counts[i])
            if series.data.shape[0] != c:
                raise StoreError(f"tile {plan.tile_ids[i]!r}: {name} has {series.data.shape[0]} time steps but the "
                                 f"plan expected {c} (source changed between probe and read?)")
            data.append((a, series.data))
            dates[a:a + c] = series.dates
            if mask is not None:
                mask.append((a, series.mask))
            if floats:
                nan_count[i - lo] = np.count_nonzero(np.isnan(series.data))
        if used:
            write_pieces(root[f"{name}/data"], s0, used, data)
            root[f"{name}/dates"][s0:s0 + used] = dates
            if mask is not None:
                write_pieces(root[f"{name}/mask"], s0, used, mask)
        if floats:  # integer rasters hold no NaN: their counts stay the fill value 0
            root[f"{name}/nan_count"][sl] = nan_count
        nans[name] = int(nan_count.sum())
    for name in manifest.targets:
        arr = root[f"targets/{name}"]
        pieces = [(i - lo, tiles[i].targets[name][None]) for i in sorted(tiles)]
        if len(rng):
            write_pieces(arr, lo, len(rng), pieces)
    return nans


def write_subsets(path: str | Path | Location, orders: dict[str, np.ndarray], counts: dict[str, dict[int, int]],
                  method: str) -> None:
    """Store per-split nested subsets: ``order`` lists tile indices so that subset p is ``order[:counts[p]]``."""
    loc = resolve_store(path)
    # the store as it is, not its consolidated metadata: nodes are added here, then consolidated again
    root = zarr.open_group(store=integrity.RecordingStore(loc.zarr_store()), mode="r+", zarr_format=3,
                           use_consolidated=False)
    group = root.require_group("subsets")
    for split, order in orders.items():
        g = group.require_group(split)
        arr = _create(g, "order", (len(order),), "int64", (max(1, len(order)),))
        if len(order):
            arr[:] = np.asarray(order, dtype=np.int64)
        g.attrs.update({"counts": {str(p): int(c) for p, c in counts[split].items()}, "method": method})
    integrity.record_subsets(loc, list(orders), root.store.written)
    consolidate(loc)


def tree_bytes(path: Path) -> int:
    """Bytes of every file below ``path`` (a file removed during the walk is not counted)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # a file removed while we walk is simply not counted
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def is_store(path: str | Path | Location) -> bool:
    """A tile store (``<out>`` or ``<out>/store.zarr``, local or at a url), as opposed to a shard index."""
    return resolve_store(path).size("zarr.json") is not None


class TileStore:
    """Read access to a complete store: the tile table, the manifest it was built with, and one tile at a time."""

    def __init__(self, path: str | Path | Location):
        given = Location.of(path)
        if given.is_local and not given.path.exists():
            raise StoreError(f"{path}: does not exist")
        if given.is_local and not given.path.is_dir():
            raise StoreError(f"{path}: is a file, not a tile store folder")
        self.location = resolve_store(given)
        # a local store keeps a Path (messages and callers join it); a remote one is named by its url
        self.path: Path | str = self.location.path if self.location.is_local else self.location.url
        if self.location.size("zarr.json") is None:
            raise StoreError(f"{self.path}: not a tile store (no zarr.json); build one with `maestro-data build`")
        self.root = zarr.open_group(store=self.location.zarr_store(read_only=True), mode="r", zarr_format=3)
        attrs = dict(self.root.attrs)
        if attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.path}: not a maestro tile store (format {attrs.get('format')!r})")
        if attrs.get("schema") != STORE_SCHEMA:
            hint = _SCHEMA_HINTS.get(attrs.get("schema"), "")
            raise StoreError(f"{self.path}: store schema {attrs.get('schema')}{hint}; this toolkit reads schema "
                             f"{STORE_SCHEMA}: rebuild it with `maestro-data build ... --overwrite`")
        if not attrs.get("complete"):
            raise StoreError(f"{self.path}: the build did not finish; rerun `maestro-data build ... --resume`")
        self.attrs = attrs
        self.block_tiles = int(attrs["block_tiles"])
        self._checked_blocks: set[int] = set()
        self._arrays: dict[str, zarr.Array] = {}
        self._raise_damage(integrity.check(self.location, "plan"))
        self.manifest = parse_manifest(attrs["manifest"]["text"], origin=f"{self.path} (stored manifest)")
        self.labelled = bool(attrs.get("labelled", True))
        if not self.labelled:
            self.manifest = without_targets(self.manifest)
        t = self.root["tiles"]
        self.tile_ids: list[str] = [str(x) for x in t["id"][:]]
        n = len(self.tile_ids)
        self.splits: list[str] = [str(x) for x in t["split"][:]]
        self.folds = t["fold"][:]
        self.lon, self.lat = t["lon"][:n], t["lat"][:n]
        self.valid = t["valid"][:n]
        self.ref_dates = t["ref_date"][:n]
        self._index = {tid: i for i, tid in enumerate(self.tile_ids)}
        self._offsets = {m: (self.root[m]["offsets"][:], self.root[m]["count"][:]) for m in self.manifest.modalities}

    def __len__(self) -> int:
        return len(self.tile_ids)

    def index(self, tile_id: str) -> int:
        try:
            return self._index[tile_id]
        except KeyError:
            raise StoreError(f"{self.path}: no tile {tile_id!r}") from None

    def counts(self, modality: str) -> np.ndarray:
        return self._offsets[modality][1]

    def _block_tiles_of(self, block: int) -> list[str]:
        return self.tile_ids[block * self.block_tiles:(block + 1) * self.block_tiles]

    def _describe(self, damage: list[integrity.Damage]) -> list[str]:
        """One line per damaged file: the file, what is wrong, and the tiles whose data it holds."""
        lines = []
        for d in damage:
            tiles = ""
            if d.part.startswith("block-"):
                ids = self._block_tiles_of(int(d.part.split("-")[1]))
                tiles = f" (tiles {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''})"
            elif d.part == "plan":
                tiles = " (the tile table: every tile)"
            lines.append(d.describe(self.location) + tiles)
        return lines

    def _raise_damage(self, damage: list[integrity.Damage]) -> None:
        if damage:
            lines = self._describe(damage)
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            raise StoreError(f"damaged tile store: {lines[0]}{more}; rebuild the damaged blocks from the source "
                             "with `maestro-data build ... --resume`")

    def _check_block(self, i: int) -> None:
        block = i // self.block_tiles
        if block not in self._checked_blocks:
            self._raise_damage(integrity.check(self.location, f"block-{block}"))
            self._checked_blocks.add(block)

    def verify(self, full: bool = False) -> list[str]:
        """Every recorded file present with its size (``full``: and its sha256): one line per damaged file."""
        blocks = -(-len(self.tile_ids) // self.block_tiles) or 1
        parts = integrity.parts(blocks, "subsets" in self.root)
        found = integrity.check_parts(self.location, parts, full=full)
        damage = [d for part in parts for d in found[part]]
        return self._describe(damage)

    def _read(self, arr: zarr.Array, a: int, b: int, i: int) -> np.ndarray:
        try:
            return arr[a:b]
        except (ValueError, RuntimeError, OSError) as exc:  # zarr/numcodecs: checksum or decompression failures
            raise StoreError(f"{self.path}/{arr.path}: chunk of tile {self.tile_ids[i]!r} cannot be decoded "
                             f"({str(exc).splitlines()[0]}); run `maestro-data verify {self.path} --full`") from None

    def read_series(self, i: int, modality: str) -> Series:
        self._check_block(i)
        off, cnt = self._offsets[modality]
        a, b = int(off[i]), int(off[i]) + int(cnt[i])
        mask = self._array(f"{modality}/mask") if self.manifest.modalities[modality].cloud_mask is not None else None
        return Series(data=self._read(self._array(f"{modality}/data"), a, b, i),
                      dates=self._read(self._array(f"{modality}/dates"), a, b, i),
                      mask=None if mask is None else self._read(mask, a, b, i))

    def _array(self, path: str) -> zarr.Array:
        """An array opened once: opening reads its metadata, one request per array and tile on a remote store."""
        if path not in self._arrays:
            self._arrays[path] = self.root[path]
        return self._arrays[path]

    def read_target(self, i: int, name: str) -> np.ndarray:
        self._check_block(i)
        return self._read(self._array(f"targets/{name}"), i, i + 1, i)[0]

    def read_tile(self, key: int | str) -> Tile:
        i = self.index(key) if isinstance(key, str) else int(key)
        if not self.valid[i]:
            raise StoreError(f"{self.path}: tile {self.tile_ids[i]!r} was skipped during the build")
        series = {m: self.read_series(i, m) for m in self.manifest.modalities}
        targets = {name: self.read_target(i, name) for name in self.manifest.targets}
        grids = georef.decode_grids(str(self._read(self._array("tiles/grids"), i, i + 1, i)[0]),
                                    f"{self.path}: tile {self.tile_ids[i]!r}")
        return Tile(tile_id=self.tile_ids[i], split=self.splits[i], fold=int(self.folds[i]),
                    lon=float(self.lon[i]), lat=float(self.lat[i]), ref_date=self.ref_dates[i],
                    series=series, targets=targets, grids=grids)

    def split_indices(self, split: str) -> np.ndarray:
        """Valid tiles of ``split`` in store order."""
        return np.asarray([i for i, (s, v) in enumerate(zip(self.splits, self.valid, strict=True)) if v and s == split],
                          dtype=np.int64)

    def subsets(self, split: str) -> tuple[np.ndarray, dict[int, int]]:
        """(nested order of tile indices, {percent: count}) of ``split``; empty when no subsets were computed."""
        if "subsets" not in self.root or split not in self.root["subsets"]:
            return np.zeros(0, np.int64), {}
        g = self.root["subsets"][split]
        return g["order"][:], {int(p): int(c) for p, c in g.attrs["counts"].items()}

    def tiers(self, split: str) -> list[tuple[str, np.ndarray]]:
        """The split cut into nested tiers: ("5", first 5 %), ("20", next up to 20 %), ("100", the rest).

        A subset of p % is the union of the tiers named <= p; without subsets the whole split is tier "100"."""
        order, counts = self.subsets(split)
        everything = self.split_indices(split)
        tiers, start = [], 0
        for p in sorted(counts):
            tiers.append((str(p), order[start:counts[p]]))
            start = counts[p]
        taken = set(order[:start].tolist())
        tiers.append(("100", np.asarray([i for i in everything if i not in taken], dtype=np.int64)))
        return tiers

    def summary(self) -> dict:
        """Tiles per split, modalities with dtypes/shapes/date counts, bytes on disk (for `maestro-data info`)."""
        splits: dict[str, int] = {}
        for s, v in zip(self.splits, self.valid, strict=True):
            if v:
                splits[s] = splits.get(s, 0) + 1
        mods = {}
        for name, spec in self.manifest.modalities.items():
            cnt = self.counts(name)[self.valid]
            mods[name] = {
                "dtype": spec.dtype, "step_shape": [spec.stored_channels, spec.tile_size, spec.tile_size],
                "dates_min": int(cnt.min()) if cnt.size else 0,
                "dates_median": float(np.median(cnt)) if cnt.size else 0,
                "dates_max": int(cnt.max()) if cnt.size else 0, "steps_total": int(cnt.sum()),
                "cloud_mask": spec.cloud_mask is not None,
            }
        size = self.location.tree_bytes()
        origin = self.split_origin()
        return {"path": str(self.path), "dataset": self.manifest.name, "manifest_sha256": self.manifest.sha256,
                "tiles": int(self.valid.sum()), "skipped": int((~self.valid).sum()), "splits": splits,
                "split_origin": origin, "splits_from": origins.describe(origin),
                "old_split_default": origins.is_old_default(origin),
                "modalities": mods, "targets": list(self.manifest.targets), "labelled": self.labelled,
                "bytes": size,
                "subsets": self.subset_summary()}

    def subset_summary(self) -> dict[str, dict[str, object]]:
        """Per split: tiles per subset percentage, and why a subset is empty when it is."""
        out: dict[str, dict[str, object]] = {}
        for split in self.manifest.splits.names:
            _, counts = self.subsets(split)
            size = len(self.split_indices(split))
            empty = {str(p): f"{p} % of {size} tiles rounds to 0" for p, c in counts.items() if c == 0}
            out[split] = {"tiles": size, "counts": {str(p): c for p, c in counts.items()}, "empty": empty}
        return out

    def split_origin(self) -> dict | None:
        """Which files decided the splits (``maestro_data.split_origin``); a ``legacy`` record for a fold-split
        store built before records existed."""
        return origins.stored_origin(self.attrs.get("provenance") or {},
                                    by_folds=self.manifest.splits.source == "folds")
