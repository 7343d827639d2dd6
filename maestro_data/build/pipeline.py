"""``maestro-data build``: raw layout -> zarr tile store, in parallel, resumable after a crash at any moment.

Stages: list tiles -> probe time-step counts -> plan (offsets, blocks) -> convert blocks -> commit. Probing and
converting are tasks of an executor (``executors.py``: a local process pool or a Dask cluster). A block is
converted by one task, which writes whole zarr shards, their integrity record, and then an atomic marker
(``<out>/_build/blocks/<b>.json``). ``--resume`` re-plans, checks the plan is the one already in the store, and
converts only the blocks without a marker, so a killed build (or a lost cluster) ends with exactly the store an
uninterrupted build writes. ``<out>`` is a local folder or any fsspec url (``maestro_data/location.py``): the
markers live with the store, so a resume needs nothing but what the output holds. The store's ``complete`` attribute and
``report.json`` are written last.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
import zarr
from tqdm import tqdm

from maestro_data import __version__
from maestro_data.build import integrity
from maestro_data.build.executors import Executor, LocalExecutor, new_token, worker_cache
from maestro_data.build.store import StorePlan, create_store, make_plan, write_block
from maestro_data.build.tile_store import tree_bytes
from maestro_data.errors import SourceError, StoreError, describe_os_error
from maestro_data.location import STORE_NAME, Location
from maestro_data.manifest import Manifest
from maestro_data.sources import Source, SourceOptions, open_source
from maestro_data.sources.base import GDAL_READ_OPTIONS
from maestro_data.split_origin import describe as describe_split_origin
from maestro_data.tile import TileRef
from maestro_data.unlabelled import without_targets

log = logging.getLogger(__name__)
BUILD_DIR = "_build"
MARKERS = f"{BUILD_DIR}/blocks"


@dataclass
class BuildOptions:
    workers: int = 1
    limit: int | None = None
    on_error: str = "fail"  # "fail" | "skip"
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    block_tiles: int = 32
    labelled: bool = True  # False (--no-targets): new imagery without label files, for prediction only
    source: SourceOptions = field(default_factory=SourceOptions)

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.workers < 1 or self.block_tiles < 1:
            raise ValueError("workers and block_tiles must be >= 1")


def _json(payload: dict) -> bytes:
    return json.dumps(payload, indent=2, sort_keys=True).encode()


# --- worker side: tasks of an executor -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stage:
    """What every task of one stage needs; reaches each worker once (``executors.py``)."""

    source: Source
    on_error: str
    out: Location
    plan: StorePlan | None = None  # None while probing: the store does not exist yet
    token: str = field(default_factory=new_token)

    @property
    def store(self) -> Location:
        return self.out.child(STORE_NAME)


def _probe_batch(stage: _Stage, refs: list[TileRef]) -> list[tuple[TileRef | None, str | None]]:
    out: list[tuple[TileRef | None, str | None]] = []
    for ref in refs:
        try:
            out.append((stage.source.probe(ref), None))
        except SourceError as exc:
            if stage.on_error == "fail":
                raise
            out.append((None, str(exc)))
    return out


def _convert_block(stage: _Stage, item: tuple[int, list[TileRef]]) -> dict:
    """Read the block's tiles, write its shards, record them, then mark the block done (in that order)."""
    block, refs = item
    plan = stage.plan
    # the group writes through a RecordingStore: the block's record needs no read-back of what it wrote
    root = worker_cache(stage.token, lambda: zarr.open_group(
        store=integrity.RecordingStore(stage.store.zarr_store()), mode="r+", zarr_format=3))
    first = plan.block_range(block).start
    tiles, skipped = {}, []
    with rasterio.Env(**GDAL_READ_OPTIONS):  # the readers' GDAL settings for every raster of the block
        for i in plan.block_range(block):
            try:
                tiles[i] = stage.source.read(refs[i - first])
            except SourceError as exc:
                if stage.on_error == "fail":
                    raise
                skipped.append({"tile_id": refs[i - first].tile_id, "stage": "read", "reason": str(exc)})
    nans = write_block(root, stage.source.manifest, plan, block, tiles)
    written = root.store.take(integrity.block_keys(stage.source.manifest, block))
    integrity.record_block(stage.store, stage.source.manifest, block, written)  # before the marker
    marker = {"block": block, "tiles": len(tiles), "skipped": skipped, "nan_values": nans}
    stage.out.write_bytes(f"{MARKERS}/{block:07d}.json", _json(marker))
    return marker


# --- orchestration -----------------------------------------------------------------------------------------------
def _prepare_output(out: Location, options: BuildOptions) -> None:
    if out.exists(STORE_NAME) or out.exists(BUILD_DIR):
        if options.overwrite:
            out.remove_tree(STORE_NAME)
            out.remove_tree(BUILD_DIR)
            out.delete("report.json")
        elif not options.resume:
            raise StoreError(f"{out}: output already exists; pass --resume to finish an interrupted build or "
                             "--overwrite to replace it")
    out.makedirs()


def _existing_plan_matches(store: Location, manifest: Manifest, plan: StorePlan) -> bool:
    if store.size("zarr.json") is None:
        return False
    attrs = dict(zarr.open_group(store=store.zarr_store(read_only=True), mode="r", zarr_format=3).attrs)
    if "plan_sha256" not in attrs:
        return False  # killed while the planner was creating arrays: start the store again
    if attrs.get("manifest", {}).get("sha256") != manifest.sha256 or attrs["plan_sha256"] != plan.digest():
        raise StoreError(f"{store}: was planned from another source, manifest or --limit/--block-tiles; "
                         "rerun with the same arguments or use --overwrite")
    return True


def _intact_blocks(out: Location, quiet: bool) -> set[int]:
    """Blocks with a marker whose recorded files are all present, of their size (and locally of their checksum);
    the others lose their marker and are converted again from the source (a resume never trusts damaged data)."""
    markers = {int(name.removesuffix(".json")): name for name in out.list(MARKERS, ".json")}
    store = out.child(STORE_NAME)
    # Locally a file can be torn by a crash or a full disk mid-write: checksum it. An object store has no torn
    # objects (a put is whole or absent), so sizes suffice there and a resume does not download the whole store.
    with tqdm(total=len(markers), desc="check converted blocks", unit="block", disable=quiet or not markers) as bar:
        found = integrity.check_parts(store, [f"block-{b}" for b in markers], full=store.is_local,
                                      on_part=lambda: bar.update(1))
    done = set()
    for block, name in sorted(markers.items()):
        damage = found[f"block-{block}"]
        if damage:
            log.warning("block %d is damaged (%s): converting it again", block, damage[0].describe(store))
            out.delete(f"{MARKERS}/{name}")
        else:
            done.add(block)
    return done


def _probe(source: Source, refs: list[TileRef], options: BuildOptions, executor: Executor, out: Location,
           ) -> tuple[list[TileRef], list[dict]]:
    """Time-step counts of every tile, in batches of a block's size (one task each)."""
    stage = _Stage(source, options.on_error, out)
    size = options.block_tiles
    batches = [refs[k:k + size] for k in range(0, len(refs), size)]
    results = executor.run(_probe_batch, stage, batches, label="probe")
    probed, skipped = [], []
    for ref, (res, err) in zip(refs, (r for batch in results for r in batch), strict=True):
        if res is None:
            skipped.append({"tile_id": ref.tile_id, "stage": "probe", "reason": err})
        else:
            probed.append(res)
    return probed, skipped


def build_store(manifest: Manifest, src: str | Path, out: str | Path | Location, options: BuildOptions | None = None,
                executor: Executor | None = None) -> dict:
    """Convert the raw dataset at ``src`` into ``<out>/store.zarr``; returns the build report (also report.json).

    ``out`` is a folder or any fsspec url (a Location carries storage options); ``executor`` runs the tasks
    (default: a local pool of ``options.workers`` processes)."""
    options = options or BuildOptions()
    if executor is None:
        with LocalExecutor(options.workers) as local:
            return build_store(manifest, src, out, options, local)
    src, out = Path(src), Location.of(out)
    if not options.labelled:  # the readers then read no label file, and the store holds no label array
        manifest = without_targets(manifest)
    t0 = time.perf_counter()
    if not src.is_dir():
        raise SourceError(f"source folder {src} does not exist")
    _prepare_output(out, options)
    store = out.child(STORE_NAME)
    # the readers need --on-error too: a split file the layout promises may be missing only under "skip"
    source = open_source(manifest, src, replace(options.source, on_error=options.on_error))
    source.check_layout()
    refs = source.list_tiles()
    if options.limit is not None:
        refs = refs[:options.limit]
    if not refs:
        raise SourceError(f"{src}: no tiles found for {manifest.name}")
    try:
        probed, skipped = _probe(source, refs, options, executor, out)
        if not probed:
            raise SourceError(f"{src}: every tile was skipped; first reason: {skipped[0]['reason']}")
        counts = {m: [r.counts[m] for r in probed] for m in manifest.modalities}
        plan = make_plan(manifest, [r.tile_id for r in probed], [r.split for r in probed],
                         [r.fold for r in probed], counts, options.block_tiles)
        resumable = options.resume and _existing_plan_matches(store, manifest, plan) \
            and not integrity.check(store, "plan", full=True)  # a damaged tile table: plan the store again
        if not resumable:
            out.remove_tree(MARKERS)
            provenance = {"source": str(src.resolve()), "toolkit_version": __version__,
                          "manifest_sha256": manifest.sha256, "build_id": uuid.uuid4().hex,
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "source_options": {"split_set": options.source.split_set, "fold": options.source.fold},
                          "splits": source.split_origin,
                          "on_error": options.on_error, "limit": options.limit}
            out.write_bytes(f"{BUILD_DIR}/probe.json", _json({"skipped": skipped}))
            create_store(store, manifest, plan, provenance, labelled=options.labelled)
        else:
            skipped = json.loads(out.read_bytes(f"{BUILD_DIR}/probe.json"))["skipped"]
        done = _intact_blocks(out, options.quiet)
        todo = [(b, probed[plan.block_range(b).start:plan.block_range(b).stop])
                for b in range(plan.num_blocks) if b not in done]
        log.info("converting %d of %d blocks on %s", len(todo), plan.num_blocks, executor.describe())
        with tqdm(total=plan.num_tiles, desc=f"build {manifest.name}", unit="tile", disable=options.quiet) as bar:
            bar.update(sum(len(plan.block_range(b)) for b in done))
            executor.run(_convert_block, _Stage(source, options.on_error, out, plan), todo, label="convert",
                         on_done=lambda _, marker: bar.update(len(plan.block_range(marker["block"]))))
    except OSError as exc:  # disk full, permissions: the store's writes name no file; say where we were writing
        raise StoreError(describe_os_error(exc, where=out)) from None
    return _commit(out, src, manifest, plan, skipped, time.perf_counter() - t0,
                   count_source=options.limit is None, split_origin=source.split_origin,
                   layout_notes=source.layout_notes)


def _commit(out: Location, src: Path, manifest: Manifest, plan: StorePlan, skipped: list[dict],
            seconds: float, count_source: bool, split_origin: dict | None,
            layout_notes: list[dict] | None = None) -> dict:
    names = out.list(MARKERS, ".json")
    raw = out.read_many([f"{MARKERS}/{n}" for n in names])
    markers = [json.loads(v) for v in raw.values() if v is not None]
    store = out.child(STORE_NAME)
    if len(markers) != plan.num_blocks:
        raise StoreError(f"{store}: {len(markers)} of {plan.num_blocks} blocks converted; rerun with --resume")
    nan_values = {m: sum(mk["nan_values"].get(m, 0) for mk in markers) for m in manifest.modalities}
    skipped = skipped + [s for mk in markers for s in mk["skipped"]]
    written = sum(mk["tiles"] for mk in markers)
    store_bytes = store.tree_bytes()
    src_bytes = tree_bytes(src) if count_source else None  # a --limit trial reads a fraction of the tree
    report = {
        "dataset": manifest.name, "manifest_sha256": manifest.sha256, "toolkit_version": __version__,
        "source": str(src), "store": str(store), "tiles_written": written, "tiles_skipped": len(skipped),
        "skipped": skipped, "nan_values": nan_values, "bytes_in": src_bytes, "bytes_out": store_bytes,
        "seconds": round(seconds, 3), "blocks": plan.num_blocks,
        "splits": split_origin, "splits_from": describe_split_origin(split_origin),
        # what the layout promised but lacked (e.g. a split file skipped under --on-error skip)
        "layout_notes": list(layout_notes or []),
    }
    root = zarr.open_group(store=store.zarr_store(), mode="r+", zarr_format=3)
    root.attrs["complete"] = True
    out.write_bytes("report.json", _json(report))
    return report


def compute_subsets(store_path: str | Path | Location, percents: tuple[int, ...] = (5, 20),
                    splits_from: str | Path | None = None) -> dict[str, dict[int, int]]:
    """Nested subsets per split (FPS on the tile positions, or MAESTRO's CSVs from ``splits_from``) into the store.

    Per split, not per phase: pretraining on p % reads the p % tiers of train and val, as MAESTRO's
    ``train_filtered_p.csv`` + ``val_filtered_p.csv``; this keeps one copy of every tile in the shards.
    Percentages are whole numbers in (0, 100): they name the shard tiers, and the rest of a split is tier 100."""
    from maestro_data.build.store import write_subsets
    from maestro_data.build.subsets import fps_subsets, read_split_csvs
    from maestro_data.build.tile_store import TileStore

    bad = [p for p in percents if isinstance(p, bool) or not isinstance(p, int | np.integer) or not 0 < p < 100]
    if bad or len(set(percents)) != len(percents):
        raise StoreError(f"subset percentages must be distinct whole numbers between 0 and 100 (exclusive), "
                         f"got {list(percents)}")
    store = TileStore(store_path)
    ids = np.asarray(store.tile_ids, dtype=object)
    splits = store.manifest.splits.names
    if splits_from is not None:
        tiles = {t: s for t, s, v in zip(store.tile_ids, store.splits, store.valid, strict=True) if v}
        # fold-based datasets (PASTIS-HD) name subsets as their splits: {stage}_filtered_{p}_fold_{k}.csv for the
        # built --fold k, {stage}_filtered_{p}.csv without one (the official read_csv)
        by_fold = store.manifest.splits.source == "folds"
        fold = store.attrs["provenance"]["source_options"]["fold"] if by_fold else None
        chosen = read_split_csvs(splits_from, store.manifest, percents, tiles=tiles, fold=fold)
        method = f"imported from {splits_from}"
    else:
        chosen = {}
        for split in splits:
            idx = store.split_indices(split)
            chosen[split] = fps_subsets(ids[idx].tolist(), store.lon[idx], store.lat[idx], percents)
        method = "furthest point sampling (WGS84 geocentric chord distance)"
    orders, counts = {}, {}
    for split in splits:
        order: list[int] = []
        counts[split] = {}
        for p in sorted(percents):
            members = chosen[split][p]
            missing = set(order) - {store.index(t) for t in members}
            if missing:
                raise StoreError(f"{split}: the {p} % subset does not contain the smaller subsets "
                                 f"({len(missing)} tiles missing): subsets must be nested")
            taken = set(order)
            order += [i for i in (store.index(t) for t in members) if i not in taken]
            counts[split][int(p)] = len(order)
        orders[split] = np.asarray(order, dtype=np.int64)
        size = len(store.split_indices(split))
        for p, c in counts[split].items():
            if c == 0 and size:
                warnings.warn(f"the {p} % subset of split {split!r} is empty: {p} % of its {size} tiles rounds "
                              "to 0 (its shards hold no tier of that size)", stacklevel=2)
    write_subsets(store_path, orders, counts, method)
    return counts
