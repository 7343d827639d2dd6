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

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore

from maestro_data import georef
from maestro_data.build import integrity
from maestro_data.build.zarr_shards import write_pieces
from maestro_data.errors import StoreError
from maestro_data.location import Location, resolve_store
from maestro_data.manifest import Manifest, ModalitySpec
from maestro_data.tile import Tile

STORE_FORMAT = "maestro-tile-store"
STORE_SCHEMA = 3  # 2: every written chunk recorded with its size and sha256 (maestro_data.build.integrity); 3: grids
SCHEMA_HINTS = {1: " (built before chunk integrity was recorded)", 2: " (built before tiles kept their georeference)"}
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
