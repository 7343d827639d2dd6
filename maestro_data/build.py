"""``maestro-data build``: raw layout -> zarr tile store, in parallel, resumable after a crash at any moment.

Stages: list tiles -> probe time-step counts -> plan (offsets, blocks) -> convert blocks -> commit. A block is
converted by one process, which writes whole zarr shards and then an atomic marker file
(``<out>/_build/blocks/<b>.json``). ``--resume`` re-plans, checks the plan is the one already in the store, and
converts only the blocks without a marker, so a killed build ends with exactly the store an uninterrupted build
writes. The store's ``complete`` attribute and ``report.json`` are written last.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
import zarr
from tqdm import tqdm

from maestro_data import __version__, integrity
from maestro_data.errors import SourceError, StoreError, describe_os_error
from maestro_data.manifest import Manifest
from maestro_data.sources import Source, SourceOptions, open_source
from maestro_data.sources.base import GDAL_READ_OPTIONS
from maestro_data.split_origin import describe as describe_split_origin
from maestro_data.store import StorePlan, create_store, make_plan, tree_bytes, write_block
from maestro_data.tile import TileRef
from maestro_data.unlabelled import without_targets

log = logging.getLogger(__name__)
STORE_NAME = "store.zarr"
BUILD_DIR = "_build"


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


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


# --- worker side: globals set once per process by the pool initializer -------------------------------------------
_W: dict = {}


def _init_worker(source: Source, plan: StorePlan | None, store_path: str, on_error: str) -> None:
    _W.update(source=source, plan=plan, on_error=on_error, store=Path(store_path))
    if plan is not None:  # the probe pool runs before the store exists
        _W["root"] = zarr.open_group(store_path, mode="r+")


def _probe_one(ref: TileRef) -> tuple[TileRef | None, str | None]:
    try:
        return _W["source"].probe(ref), None
    except SourceError as exc:
        if _W["on_error"] == "fail":
            raise
        return None, str(exc)


def _convert_block(block: int, refs: list[TileRef], marker_dir: str) -> dict:
    source: Source = _W["source"]
    plan: StorePlan = _W["plan"]
    tiles, skipped = {}, []
    with rasterio.Env(**GDAL_READ_OPTIONS):  # the readers' GDAL settings for every raster of the block
        for i in plan.block_range(block):
            try:
                tiles[i] = source.read(refs[i])
            except SourceError as exc:
                if _W["on_error"] == "fail":
                    raise
                skipped.append({"tile_id": refs[i].tile_id, "stage": "read", "reason": str(exc)})
    nans = write_block(_W["root"], source.manifest, plan, block, tiles)
    integrity.record_block(_W["store"], source.manifest, block)  # before the marker: a marked block is recorded
    marker = {"block": block, "tiles": len(tiles), "skipped": skipped, "nan_values": nans}
    _atomic_json(Path(marker_dir) / f"{block:07d}.json", marker)
    return marker


# --- orchestration -----------------------------------------------------------------------------------------------
def _prepare_output(out: Path, options: BuildOptions) -> Path:
    store = out / STORE_NAME
    if store.exists() or (out / BUILD_DIR).exists():
        if options.overwrite:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(out / BUILD_DIR, ignore_errors=True)
            (out / "report.json").unlink(missing_ok=True)
        elif not options.resume:
            raise StoreError(f"{out}: output already exists; pass --resume to finish an interrupted build or "
                             "--overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_DIR / "blocks").mkdir(parents=True, exist_ok=True)
    return store


def _existing_plan_matches(store: Path, manifest: Manifest, plan: StorePlan) -> bool:
    if not (store / "zarr.json").is_file():
        return False
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    if "plan_sha256" not in attrs:
        return False  # killed while the planner was creating arrays: start the store again
    if attrs.get("manifest", {}).get("sha256") != manifest.sha256 or attrs["plan_sha256"] != plan.digest():
        raise StoreError(f"{store}: was planned from another source, manifest or --limit/--block-tiles; "
                         "rerun with the same arguments or use --overwrite")
    return True


def _intact_blocks(store: Path, marker_dir: Path, quiet: bool) -> set[int]:
    """Blocks with a marker whose recorded files are all present, of their size and checksum; the others lose
    their marker and are converted again from the source (a resume never trusts damaged data)."""
    done = set()
    markers = sorted(marker_dir.glob("*.json"))
    for p in tqdm(markers, desc="check converted blocks", unit="block", disable=quiet or not markers):
        damage = integrity.check(store, f"block-{int(p.stem)}", full=True)
        if damage:
            log.warning("block %d is damaged (%s): converting it again", int(p.stem), damage[0].describe(store))
            p.unlink()
        else:
            done.add(int(p.stem))
    return done


def build_store(manifest: Manifest, src: str | Path, out: str | Path, options: BuildOptions | None = None) -> dict:
    """Convert the raw dataset at ``src`` into ``<out>/store.zarr``; returns the build report (also report.json)."""
    options = options or BuildOptions()
    src, out = Path(src), Path(out)
    if not options.labelled:  # the readers then read no label file, and the store holds no label array
        manifest = without_targets(manifest)
    t0 = time.perf_counter()
    if not src.is_dir():
        raise SourceError(f"source folder {src} does not exist")
    store = _prepare_output(out, options)
    # the readers need --on-error too: a split file the layout promises may be missing only under "skip"
    source = open_source(manifest, src, replace(options.source, on_error=options.on_error))
    source.check_layout()
    refs = source.list_tiles()
    if options.limit is not None:
        refs = refs[:options.limit]
    if not refs:
        raise SourceError(f"{src}: no tiles found for {manifest.name}")
    skipped: list[dict] = []
    ctx = multiprocessing.get_context("spawn")  # zarr runs an event-loop thread: forking it is unsafe
    pool = (ProcessPoolExecutor(options.workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(source, None, str(store), options.on_error))
            if options.workers > 1 else None)
    try:
        _W.update(source=source, on_error=options.on_error)
        mapper = pool.map if pool else map
        probed = []
        for ref, (res, err) in zip(refs, mapper(_probe_one, refs), strict=True):
            if res is None:
                skipped.append({"tile_id": ref.tile_id, "stage": "probe", "reason": err})
            else:
                probed.append(res)
        if not probed:
            raise SourceError(f"{src}: every tile was skipped; first reason: {skipped[0]['reason']}")
        counts = {m: [r.counts[m] for r in probed] for m in manifest.modalities}
        plan = make_plan(manifest, [r.tile_id for r in probed], [r.split for r in probed],
                         [r.fold for r in probed], counts, options.block_tiles)
        marker_dir = out / BUILD_DIR / "blocks"
        resumable = options.resume and _existing_plan_matches(store, manifest, plan) \
            and not integrity.check(store, "plan", full=True)  # a damaged tile table: plan the store again
        if not resumable:
            for stale in marker_dir.glob("*.json"):
                stale.unlink()
            provenance = {"source": str(src.resolve()), "toolkit_version": __version__,
                          "manifest_sha256": manifest.sha256,
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "source_options": {"split_set": options.source.split_set, "fold": options.source.fold},
                          "splits": source.split_origin,
                          "on_error": options.on_error, "limit": options.limit}
            _atomic_json(out / BUILD_DIR / "probe.json", {"skipped": skipped})
            create_store(store, manifest, plan, provenance, labelled=options.labelled)
        else:
            skipped = json.loads((out / BUILD_DIR / "probe.json").read_text())["skipped"]
        done = _intact_blocks(store, marker_dir, options.quiet)
        todo = [b for b in range(plan.num_blocks) if b not in done]
        bar = tqdm(total=plan.num_tiles, desc=f"build {manifest.name}", unit="tile", disable=options.quiet)
        bar.update(sum(len(plan.block_range(b)) for b in done))
        if pool:
            pool.shutdown()
            pool = ProcessPoolExecutor(options.workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(source, plan, str(store), options.on_error))
            futures = [pool.submit(_convert_block, b, probed, str(marker_dir)) for b in todo]
            for fut in futures:
                marker = fut.result()
                bar.update(len(plan.block_range(marker["block"])))
        else:
            _init_worker(source, plan, str(store), options.on_error)
            for b in todo:
                _convert_block(b, probed, str(marker_dir))
                bar.update(len(plan.block_range(b)))
        bar.close()
    except OSError as exc:  # disk full, permissions: the store's writes name no file; say where we were writing
        raise StoreError(describe_os_error(exc, where=out)) from None
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        _W.clear()  # the serial path ran the worker code in this process: drop its open store and source
    return _commit(store, out, src, manifest, plan, skipped, time.perf_counter() - t0,
                   count_source=options.limit is None, split_origin=source.split_origin,
                   layout_notes=source.layout_notes)


def _commit(store: Path, out: Path, src: Path, manifest: Manifest, plan: StorePlan, skipped: list[dict],
            seconds: float, count_source: bool, split_origin: dict | None,
            layout_notes: list[dict] | None = None) -> dict:
    markers = [json.loads(p.read_text()) for p in sorted((out / BUILD_DIR / "blocks").glob("*.json"))]
    if len(markers) != plan.num_blocks:
        raise StoreError(f"{store}: {len(markers)} of {plan.num_blocks} blocks converted; rerun with --resume")
    nan_values = {m: sum(mk["nan_values"].get(m, 0) for mk in markers) for m in manifest.modalities}
    skipped = skipped + [s for mk in markers for s in mk["skipped"]]
    written = sum(mk["tiles"] for mk in markers)
    store_bytes = tree_bytes(store)
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
    root = zarr.open_group(str(store), mode="r+")
    root.attrs["complete"] = True
    _atomic_json(out / "report.json", report)
    return report


def compute_subsets(store_path: str | Path, percents: tuple[int, ...] = (5, 20),
                    splits_from: str | Path | None = None) -> dict[str, dict[int, int]]:
    """Nested subsets per split (FPS on the tile positions, or MAESTRO's CSVs from ``splits_from``) into the store.

    Per split, not per phase: pretraining on p % reads the p % tiers of train and val, as MAESTRO's
    ``train_filtered_p.csv`` + ``val_filtered_p.csv``; this keeps one copy of every tile in the shards.
    Percentages are whole numbers in (0, 100): they name the shard tiers, and the rest of a split is tier 100."""
    from maestro_data.store import TileStore, write_subsets
    from maestro_data.subsets import fps_subsets, read_split_csvs

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
