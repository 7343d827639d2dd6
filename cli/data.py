"""``maestro-data``: build, inspect and generate datasets. Thin: every command calls one library function."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from maestro_cli.common import CleanErrors
from maestro_data.inspect.proposal import GROUP_DISTANCE
from maestro_data.manifest import builtin_manifests, load_manifest

DATASETS = builtin_manifests(variants=False)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    warnings.simplefilter("default")
    warnings.showwarning = lambda message, category, *_a, **_k: click.echo(f"warning: {message}", err=True)


@click.group(cls=CleanErrors)
@click.version_option(package_name="maestro-eo")
def main() -> None:
    """Prepare MAESTRO datasets: raw layout -> zarr tile store -> subsets -> WebDataset shards."""


@main.command()
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--src", required=True, type=click.Path(file_okay=False, path_type=Path), help="Raw dataset root.")
@click.option("--out", required=True,
              help="Output folder, or an fsspec url such as s3://bucket/prefix (credentials from the environment).")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A manifest file to use instead of the built-in one (e.g. a copy with D=4 for S2).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Parallel processes (with --executor dask and no --scheduler: the LocalCluster's workers).")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="Run the blocks and shards on a local process pool or on a Dask cluster.")
@click.option("--scheduler", metavar="ADDRESS",
              help="Dask scheduler address (tcp://host:8786) or scheduler file; default: a LocalCluster.")
@click.option("--limit", type=click.IntRange(1), help="Convert only the first N tiles (quick trials).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="skip: drop bad tiles and list them in the build report.")
@click.option("--resume", is_flag=True, help="Finish an interrupted build in OUT.")
@click.option("--overwrite", is_flag=True, help="Replace an existing build in OUT.")
@click.option("--split-set", type=click.IntRange(1, 5), help="FLAIR-HUB split set (GLOBAL_ALL_MTD_SPLIT split_<k>).")
@click.option("--fold", type=click.IntRange(1, 5),
              help="PASTIS-HD fold k: {stage}_fold_{k}.csv when present, else the Fold rule rotated by k-1. "
                   "Without it, as the official reader: train.csv/val.csv/test.csv when present, else fold I "
                   "(train 1-3, val 4, test 5).")
@click.option("--block-tiles", type=click.IntRange(1), default=32, show_default=True,
              help="Tiles per zarr shard (one process writes one block).")
@click.option("--splits-from", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Import MAESTRO's published subset CSVs (train_filtered_5.csv, ...) instead of running FPS.")
@click.option("--percents", default="5,20", show_default=True, callback=lambda c, p, v: _percents(v),
              help="Nested subset sizes in percent.")
@click.option("--shard-size", default="1GB", show_default=True, callback=lambda c, p, v: _size(v),
              help="Target shard size (e.g. 256MB, 1GB).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the tile order inside shards.")
@click.option("--no-shards", is_flag=True, help="Stop after the tile store and its subsets.")
@click.option("--no-targets", is_flag=True,
              help="New imagery without label files: read no label, mark the store unlabelled (predict only).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(dataset: str, src: Path, out: str, manifest_path: Path | None, workers: int, executor: str,
          scheduler: str | None, limit: int | None, on_error: str, resume: bool, overwrite: bool,
          split_set: int | None, fold: int | None, block_tiles: int, splits_from: Path | None,
          percents: tuple[int, ...], shard_size: int, seed: int, no_shards: bool, no_targets: bool,
          quiet: bool) -> None:
    """Convert the raw DATASET at SRC into OUT: zarr tile store -> nested subsets -> WebDataset shards."""
    from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
    from maestro_data.build.shards import ShardOptions, write_shards
    from maestro_data.location import Location
    from maestro_data.sources import SourceOptions

    _setup_logging(quiet)
    manifest = load_manifest(manifest_path or dataset)
    if manifest.name != dataset:
        raise click.ClickException(f"{manifest_path}: manifest is for {manifest.name!r}, not {dataset!r}")
    options = BuildOptions(workers=workers, limit=limit, on_error=on_error, resume=resume, overwrite=overwrite,
                           quiet=quiet, block_tiles=block_tiles, labelled=not no_targets,
                           source=SourceOptions(split_set=split_set, fold=fold))
    target = Location.of(out)
    with _executor(executor, workers, scheduler) as engine:
        report = build_store(manifest, src, target, options, executor=engine)
        _echo_report(report, dataset)
        counts = compute_subsets(target, percents, splits_from)
        click.echo("subsets: " + "; ".join(f"{k}: " + ", ".join(f"{p}%={n}" for p, n in v.items())
                                           for k, v in counts.items()))
        click.echo(f"store: {report['store']}\nreport: {target.join('report.json')}")
        if not no_shards:
            shards = target.child("shards")
            index = write_shards(target, shards, ShardOptions(shard_bytes=shard_size, seed=seed, quiet=quiet,
                                                              resume=resume), executor=engine)
            _echo_index(index, shards)


def _executor(kind: str, workers: int, scheduler: str | None):
    import contextlib

    from maestro_data.build.executors import make_executor

    if scheduler is not None and kind != "dask":
        raise click.BadParameter("--scheduler needs --executor dask", param_hint="--scheduler")
    if kind == "dask":
        with contextlib.suppress(ImportError):  # a missing extra is said by make_executor
            import distributed  # noqa: F401 - its import sets its loggers' levels: ours must come after

            # Dask's INFO lines (cluster start, every connection) would bury the progress bars
            logging.getLogger("distributed").setLevel(logging.WARNING)
    return make_executor(kind, workers, scheduler)


def _echo_report(report: dict, dataset: str) -> None:
    sizes = f"{report['bytes_out'] / 1e6:.1f} MB store"
    if report["bytes_in"] is not None:
        sizes = f"{report['bytes_in'] / 1e6:.1f} MB in -> {sizes} ({report['bytes_out'] / report['bytes_in']:.2f}x)"
    click.echo(f"built {report['tiles_written']} tiles of {dataset} in {report['seconds']:.1f} s "
               f"({report['tiles_skipped']} skipped); {sizes}")
    if report["splits_from"]:
        click.echo(f"splits from: {report['splits_from']}")
    nans = {m: n for m, n in report["nan_values"].items() if n}
    if nans:
        click.echo(f"NaN values kept (real data): {nans}")
    for s in report["skipped"][:10]:
        click.echo(f"skipped {s['tile_id']}: {s['reason']}", err=True)
    for note in report["layout_notes"]:
        click.echo(f"layout: {note.get('file', '')}: {note.get('reason', note)}", err=True)


def _percents(text: str) -> tuple[int, ...]:
    """Checked when the command line is parsed, before any tile is read: distinct whole numbers in (0, 100)."""
    values = [v.strip() for v in text.split(",")]
    if not text.strip() or not all(v.isdigit() for v in values):
        raise click.BadParameter(f"{text!r} is not a comma-separated list of whole percentages such as 5,20")
    out = tuple(int(v) for v in values)
    bad = [p for p in out if not 0 < p < 100]
    if bad or len(set(out)) != len(out):
        raise click.BadParameter(f"{text!r}: percentages must be distinct whole numbers between 0 and 100 "
                                 "(exclusive); the rest of a split is always there as tier 100")
    return out


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)]) * units[unit]
            except ValueError:
                break
            if not value >= 1024:  # also refuses nan
                raise click.BadParameter(f"{text!r}: a shard must hold at least 1 KiB")
            return int(value)
    raise click.BadParameter(f"{text!r} is not a size such as 512MB or 1GB")


def _echo_index(index: dict, where: Path | str) -> None:
    shards = sum(len(c["url"]) for s in index["splits"].values() for c in s["tiers"].values())
    size = sum(sum(c["bytes"]) for s in index["splits"].values() for c in s["tiers"].values())
    click.echo(f"shards: {shards} files, {size / 1e6:.1f} MB, index {where}")


@main.command()
@click.argument("store")
@click.option("--percents", default="5,20", show_default=True, callback=lambda c, p, v: _percents(v),
              help="Nested subset sizes in percent.")
@click.option("--splits-from", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Import MAESTRO's published subset CSVs instead of running FPS.")
def subsets(store: str, percents: tuple[int, ...], splits_from: Path | None) -> None:
    """(Re)compute the nested subsets of a tile STORE."""
    from maestro_data.build.pipeline import compute_subsets

    for split, counts in compute_subsets(store, percents, splits_from).items():
        click.echo(f"{split}: " + ", ".join(f"{p}% = {n} tiles" for p, n in counts.items()))


@main.command()
@click.argument("store")
@click.option("--out", required=True, help="Output folder or fsspec url (e.g. s3://bucket/prefix/shards).")
@click.option("--shard-size", default="1GB", show_default=True, callback=lambda c, p, v: _size(v),
              help="Target shard size (e.g. 256MB, 1GB).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the tile order inside shards.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Parallel processes (with --executor dask and no --scheduler: the LocalCluster's workers).")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="Write the shards on a local process pool or on a Dask cluster (one task per shard).")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler address or scheduler file.")
@click.option("--resume", is_flag=True, help="Keep the shards an interrupted run finished in OUT.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def shard(store: str, out: str, shard_size: int, seed: int, workers: int, executor: str, scheduler: str | None,
          resume: bool, quiet: bool) -> None:
    """Write WebDataset shards (and index.json, last) from a tile STORE (folder or url)."""
    from maestro_data.build.shards import ShardOptions, write_shards

    options = ShardOptions(shard_bytes=shard_size, seed=seed, quiet=quiet, resume=resume)
    with _executor(executor, workers, scheduler) as engine:
        _echo_index(write_shards(store, out, options, executor=engine), out)


@main.command()
@click.argument("location")
@click.option("--full", is_flag=True, help="Also decode every sample and check it against the manifest.")
@click.option("--dataset", help="Fail unless the shards were built from this manifest (name or path).")
def verify(location: str, full: bool, dataset: str | None) -> None:
    """Check every shard of an index (folder, index.json path or URL): presence, size, sha256; or every chunk
    of a tile store (presence and size; --full: sha256); a build's output (folder or URL): both."""
    from maestro_data.build.tile_store import is_store
    from maestro_data.location import Location

    if is_store(location):
        _verify_store(location, full)
        shards = Location.of(location).child("shards")
        if shards.size("index.json") is not None:
            _verify_shards(shards.url, full, dataset)
        return
    _verify_shards(location, full, dataset)


def _verify_shards(location: str, full: bool, dataset: str | None) -> None:
    from maestro_data.stream.verify import verify as verify_shards

    problems = verify_shards(location, full=full, manifest=load_manifest(dataset) if dataset else None)
    for line in problems:
        click.echo(f"BAD {line}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} bad shard(s) in {location}")
    click.echo(f"ok: every shard of {location} is present and intact" + (" and decodes" if full else ""))


def _verify_store(location: str, full: bool) -> None:
    from maestro_data.build.tile_store import TileStore

    problems = TileStore(location).verify(full=full)
    for line in problems:
        click.echo(f"BAD {line}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} damaged file(s) in the tile store {location}; "
                                   "`maestro-data build ... --resume` converts the damaged blocks again")
    click.echo(f"ok: every chunk of {location} is present" + (" and intact (sha256)" if full else " (sizes match)"))


@main.command()
@click.argument("location")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def reindex(location: str, quiet: bool) -> None:
    """Rewrite the index of the shard set at LOCATION (folder, index.json path or URL) as schema 2, with one
    sidecar per shard built from the shard's tar headers: no rebuild, the shards are not changed."""
    from maestro_data.stream.reindex import reindex as reindex_shards

    _echo_index(reindex_shards(location, quiet=quiet), location)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: str, as_json: bool) -> None:
    """Summarise a tile store (tiles per split, modalities, dtypes, date counts, bytes) or a shard index."""
    from maestro_data.build.tile_store import TileStore, is_store

    if path.endswith(".json") or ("://" in path and not is_store(path)) or (Path(path) / "index.json").is_file():
        _index_info(path, as_json)
        return
    summary = TileStore(path).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['dataset']} tile store at {summary['path']} ({summary['bytes'] / 1e6:.1f} MB)")
    click.echo(f"tiles: {summary['tiles']} ({summary['skipped']} skipped)  splits: "
               + ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))
    _echo_split_origin(summary["splits_from"], summary["old_split_default"])
    for name, m in summary["modalities"].items():
        click.echo(f"  {name:8s} {m['dtype']:8s} step {tuple(m['step_shape'])}  dates min/median/max "
                   f"{m['dates_min']}/{m['dates_median']:g}/{m['dates_max']}" + ("  + cloud mask" if m["cloud_mask"]
                                                                                  else ""))
    click.echo(f"targets: {', '.join(summary['targets'])}")
    for split, sub in summary["subsets"].items():
        if sub["counts"]:
            click.echo(f"subsets of {split}: " + ", ".join(f"{p}% = {c}" for p, c in sub["counts"].items())
                       + "".join(f"  (empty {p}%: {why})" for p, why in sub["empty"].items()))


def _echo_split_origin(text: str | None, old_default: bool) -> None:
    if text:
        click.echo(f"splits from: {text}")
    if old_default:
        click.echo("warning: built with the old split default (see 'splits from')", err=True)


def _index_info(location: str, as_json: bool) -> None:
    from maestro_data import split_origin
    from maestro_data.stream.shard_read import open_index, stored_manifest

    index, loc = open_index(location)
    manifest = stored_manifest(index, loc)
    # shards written before the index recorded it: nothing known beyond the dataset's kind of splits
    origin = index["split_origin"] if "split_origin" in index else \
        split_origin.stored_origin({}, by_folds=manifest.splits.source == "folds")
    rows = {split: {tier: {"shards": len(c["url"]), "samples": sum(c["samples"]), "bytes": sum(c["bytes"])}
                    for tier, c in info["tiers"].items()}
            for split, info in index["splits"].items()}
    if as_json:
        click.echo(json.dumps({"index": loc, "dataset": manifest.name, "splits": rows, "split_origin": origin,
                               "splits_from": split_origin.describe(origin),
                               "old_split_default": split_origin.is_old_default(origin)}, indent=2))
        return
    click.echo(f"{manifest.name} shards at {loc} (toolkit {index['toolkit_version']}, manifest "
               f"{manifest.sha256[:12]})")
    _echo_split_origin(split_origin.describe(origin), split_origin.is_old_default(origin))
    for split, tiers in rows.items():
        for tier, r in sorted(tiers.items(), key=lambda kv: int(kv[0])):
            click.echo(f"  {split:6s} tier {tier:>3s}%: {r['samples']:6d} tiles in {r['shards']} shard(s), "
                       f"{r['bytes'] / 1e6:.1f} MB")
    click.echo("modalities: " + ", ".join(f"{m} ({s.dtype})" for m, s in manifest.modalities.items()))


@main.command()
@click.argument("location")
@click.argument("tile_id")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--sample", is_flag=True,
              help="Show what the model receives for this tile: the loader's temporal selection, crop and D4 for "
                   "(--seed, --epoch), normalised.")
@click.option("--mode", type=click.Choice(["train", "eval"]), default="train", show_default=True,
              help="With --sample: train (random crop, random valid step, D4) or eval (the crop grid, MAD step).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="With --sample: loader seed.")
@click.option("--epoch", default=0, show_default=True, type=click.IntRange(0), help="With --sample: epoch.")
@click.option("--crop", default=0, show_default=True, type=click.IntRange(0),
              help="Crop index of the tile (PASTIS-HD: 0..63): the element shown with --sample, and the crop whose "
                   "official time-step selection is marked otherwise.")
@click.option("--manifest", "manifest_path", help="Look through this manifest (name or file; same stored data) "
                                                  "instead of the one the tile was built with.")
def show(location: str, tile_id: str, out: Path, sample: bool, mode: str, seed: int, epoch: int, crop: int,
         manifest_path: str | None) -> None:
    """One figure of tile TILE_ID of a tile store or shard index LOCATION: every modality and date, the cloud
    mask, the steps the official rule selects, the labels in the manifest's class colours."""
    from maestro_data.inspect.commands import SampleOptions, show_tile

    options = SampleOptions(mode=mode, seed=seed, epoch=epoch, crop=crop) if sample else None
    click.echo(str(show_tile(location, tile_id, out, options, crop, manifest_path)))


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for stats.json and the figures.")
@click.option("--split", help="Only this split (default: every split).")
@click.option("--subset", type=click.IntRange(1, 100), help="Only the nested subset of this percentage.")
@click.option("--group-distance", default=GROUP_DISTANCE, show_default=True, type=click.FloatRange(0, 1),
              help="Cut of the band clustering: bands group when their average 1 - |r| is below it.")
@click.option("--write-manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a copy of the store's manifest with the proposed norm factors and groups.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def stats(store: Path, out: Path, split: str | None, subset: int | None, group_distance: float,
          write_manifest: Path | None, quiet: bool) -> None:
    """Band statistics of a tile STORE (cloud-masked, NaN-aware, streamed), class frequencies, cloud cover, the band
    correlations and the band groups and norm factors they suggest."""
    from maestro_data.inspect.commands import group_table, run_stats

    result = run_stats(store, out, split, subset, group_distance, write_manifest, quiet)
    click.echo(f"{result['tiles']} tiles of {result['dataset']} ({result['split']} split"
               f"{'s' if result['split'] == 'all' else ''}, {result['subset']} %): {out / 'stats.json'}")
    for line in group_table(result):
        click.echo(line)
    for name, m in result["modalities"].items():
        if m["cloud"] is not None and m["pixels"]:
            months = m["cloud"]["per_month"]
            clearest = min(months, key=lambda k: months[k]["cloud_share"]) if months else "-"
            click.echo(f"{name}: {m['cloudy_pixels'] / m['pixels']:.0%} of pixels cloud-masked; clearest month "
                       f"{clearest}")
    if write_manifest is not None:
        click.echo(f"manifest with the proposal: {write_manifest}")


@main.command("demo-data")
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tiles", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
def demo_data(dataset: str, out: Path, tiles: int, seed: int) -> None:
    """Write a small synthetic DATASET in its real published layout (for trials, tests and the demo)."""
    from maestro_data.synthetic import generate

    root = generate(dataset, out, tiles=tiles, seed=seed)
    click.echo(str(root))


if __name__ == "__main__":
    sys.exit(main())
