"""``maestro-data``: build, inspect and generate datasets. Thin: every command calls one library function."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from maestro_data.errors import MaestroError
from maestro_data.manifest import builtin_manifests, load_manifest

DATASETS = builtin_manifests()


class _CleanErrors(click.Group):
    """Print library errors as one line without a traceback and exit non-zero."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MaestroError as exc:
            raise click.ClickException(str(exc)) from None


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    warnings.simplefilter("default")
    warnings.showwarning = lambda message, category, *_a, **_k: click.echo(f"warning: {message}", err=True)


@click.group(cls=_CleanErrors)
@click.version_option(package_name="maestro")
def main() -> None:
    """Prepare MAESTRO datasets: raw layout -> zarr tile store -> subsets -> WebDataset shards."""


@main.command()
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--src", required=True, type=click.Path(file_okay=False, path_type=Path), help="Raw dataset root.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A manifest file to use instead of the built-in one (e.g. a copy with D=4 for S2).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Parallel processes.")
@click.option("--limit", type=click.IntRange(1), help="Convert only the first N tiles (quick trials).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="skip: drop bad tiles and list them in the build report.")
@click.option("--resume", is_flag=True, help="Finish an interrupted build in OUT.")
@click.option("--overwrite", is_flag=True, help="Replace an existing build in OUT.")
@click.option("--split-set", type=click.IntRange(1, 5), help="FLAIR-HUB split set (GLOBAL_ALL_MTD_SPLIT split_<k>).")
@click.option("--fold", type=click.IntRange(1, 5), default=1, show_default=True, help="PASTIS-HD fold (I..V).")
@click.option("--block-tiles", type=click.IntRange(1), default=32, show_default=True,
              help="Tiles per zarr shard (one process writes one block).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(dataset: str, src: Path, out: Path, manifest_path: Path | None, workers: int, limit: int | None,
          on_error: str, resume: bool, overwrite: bool, split_set: int | None, fold: int, block_tiles: int,
          quiet: bool) -> None:
    """Convert the raw DATASET at SRC into a zarr tile store in OUT."""
    from maestro_data.build import BuildOptions, build_store
    from maestro_data.sources import SourceOptions

    _setup_logging(quiet)
    manifest = load_manifest(manifest_path or dataset)
    if manifest.name != dataset:
        raise click.ClickException(f"{manifest_path}: manifest is for {manifest.name!r}, not {dataset!r}")
    options = BuildOptions(workers=workers, limit=limit, on_error=on_error, resume=resume, overwrite=overwrite,
                           quiet=quiet, block_tiles=block_tiles,
                           source=SourceOptions(split_set=split_set, fold=fold))
    report = build_store(manifest, src, out, options)
    ratio = report["bytes_out"] / max(1, report["bytes_in"])
    click.echo(f"built {report['tiles_written']} tiles of {dataset} in {report['seconds']:.1f} s "
               f"({report['tiles_skipped']} skipped); {report['bytes_in'] / 1e6:.1f} MB in -> "
               f"{report['bytes_out'] / 1e6:.1f} MB store ({ratio:.2f}x)")
    nans = {m: n for m, n in report["nan_values"].items() if n}
    if nans:
        click.echo(f"NaN values kept (real data): {nans}")
    for s in report["skipped"][:10]:
        click.echo(f"skipped {s['tile_id']}: {s['reason']}", err=True)
    click.echo(f"store: {report['store']}\nreport: {out / 'report.json'}")


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: Path, as_json: bool) -> None:
    """Summarise a tile store: tiles per split, modalities, dtypes, date counts, bytes."""
    from maestro_data.store import TileStore

    summary = TileStore(path).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['dataset']} tile store at {summary['path']} ({summary['bytes'] / 1e6:.1f} MB)")
    click.echo(f"tiles: {summary['tiles']} ({summary['skipped']} skipped)  splits: "
               + ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))
    for name, m in summary["modalities"].items():
        click.echo(f"  {name:8s} {m['dtype']:8s} step {tuple(m['step_shape'])}  dates min/median/max "
                   f"{m['dates_min']}/{m['dates_median']:g}/{m['dates_max']}" + ("  + cloud mask" if m["cloud_mask"]
                                                                                  else ""))
    click.echo(f"targets: {', '.join(summary['targets'])}")


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
