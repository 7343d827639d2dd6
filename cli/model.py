"""`maestro-model`: FLOPs and parameter accounting and token counts of MAESTRO for a dataset manifest, and
`predict` (maps from a trained model; runs under `accelerate launch -m maestro_cli.model predict ...`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from maestro_cli.common import CleanErrors
from maestro_data.errors import MaestroError
from maestro_data.manifest import Manifest, load_manifest
from maestro_model import flops as F

SIZE_CHOICES = [*F.MODEL_SIZES, *F.SIZE_ALIASES]
FORMULA_PHASES = ("pretrain", "finetune")


def _measure(manifest: Manifest, size: str, fusion: str, multispectral: str, inter_depth: int | None,
             device: str, phases: tuple[str, ...] = FORMULA_PHASES) -> tuple[dict[str, Any] | None, str | None]:
    """Our model's true counts, or None and the reason when the model cannot be built or run."""
    try:
        return F.implementation_counts(manifest, size, fusion, multispectral, inter_depth=inter_depth,
                                       device=device, phases=phases), None
    except ImportError as exc:
        return None, f"model not available ({exc})"
    except (MaestroError, ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _common(func: Callable) -> Callable:
    """The options every subcommand shares."""
    options = [
        click.option("--dataset", help="Built-in manifest name (e.g. flair-hub) or a manifest path."),
        click.option("--size", type=click.Choice(SIZE_CHOICES), default="base", show_default=True),
        click.option("--fusion", type=click.Choice(F.FUSION_MODES), default="group", show_default=True,
                     help="Fusion mode (the paper's Tables 20-21 use group; the official default is inter-group)."),
        click.option("--multispectral", type=click.Choice(F.MULTISPECTRAL), default="joint", show_default=True,
                     help="joint-token or token-based multispectral fusion (band groups = manifest norm_groups)."),
        click.option("--inter-depth", type=int, default=None,
                     help="Shared fusion blocks after the group encoders (default 3 for inter-group, else 0)."),
        click.option("--measure/--no-measure", default=True, show_default=True,
                     help="Also build our model and count its parameters and FLOPs."),
        click.option("--device", type=click.Choice(["meta", "cpu"]), default="meta", show_default=True,
                     help="Where the model runs for the flop counter (meta: shapes only, fast)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def flops_report(manifest: Manifest, size: str, fusion: str, multispectral: str, inter_depth: int | None,
                 measure: bool, device: str) -> dict[str, Any]:
    """Paper-formula and measured GFLOPs per sample and phase, and the parameter count, as plain data."""
    try:
        paper = {ph: F.formula_flops(manifest, ph, size, fusion, multispectral, inter_depth=inter_depth)
                 for ph in FORMULA_PHASES}
        official = {ph: F.formula_flops(manifest, ph, size, fusion, multispectral, inter_depth=inter_depth,
                                        variant="official") for ph in FORMULA_PHASES}
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    report: dict[str, Any] = {
        "dataset": manifest.name, "size": size, "fusion": fusion, "multispectral": multispectral,
        "inter_depth": inter_depth, "unit": "GFLOPs per sample, forward",
        "paper_formula": {ph: v / 1e9 for ph, v in paper.items()},
        "formula_official": {ph: v / 1e9 for ph, v in official.items()},
        "measured": None, "parameters": None, "parameters_by_module": None, "measure_device": None,
        "measure_error": None,
    }
    if measure:
        counts, error = _measure(manifest, size, fusion, multispectral, inter_depth, device)
        report["measure_error"] = error
        if counts is not None:
            report["measured"] = {ph: v / 1e9 for ph, v in counts["flops"].items()}
            report["parameters"] = counts["parameters"]
            report["parameters_by_module"] = counts["parameters_by_module"]
            report["measure_device"] = counts["device"]
    return report


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.1f}{unit}"


@click.group(cls=CleanErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maestro-eo")
def main() -> None:
    """MAESTRO model accounting: FLOPs (paper formula vs our implementation), parameters, tokens."""


@main.command()
@_common
def flops(dataset: str, size: str, fusion: str, multispectral: str, inter_depth: int | None, measure: bool,
          device: str, as_json: bool) -> None:
    """Forward GFLOPs per sample: the paper's §9.1 formula next to the flop counter on our model."""
    if not dataset:
        raise click.UsageError("give --dataset")
    manifest = load_manifest(dataset)
    report = flops_report(manifest, size, fusion, multispectral, inter_depth, measure, device)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"MAESTRO-{size} on {manifest.name}: fusion {fusion}, {multispectral} multispectral fusion "
               f"({report['unit']})")
    measured = report["measured"] or {}
    rows = [("phase", "paper formula", "formula, official arch.", "measured (ours)")]
    rows += [(ph, _fmt(report["paper_formula"][ph]), _fmt(report["formula_official"][ph]),
              _fmt(measured.get(ph))) for ph in FORMULA_PHASES]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                   strict=True))))
    params = report["parameters"]
    click.echo(f"parameters: {_fmt(None if params is None else params / 1e6, ' M')}")
    if report["measure_device"]:
        click.echo("measured on: " + ", ".join(f"{ph} {dev}" for ph, dev in report["measure_device"].items()))
    if report["measure_error"]:
        click.echo(f"measured columns unavailable: {report['measure_error']}")


@main.command()
@_common
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Describe a checkpoint instead (official .ckpt, state dict or safetensors): its recorded "
                   "settings, parameters, and the modalities / groups / heads its weights cover; with --dataset, "
                   "also what would load into the model it needs for that dataset.")
@click.option("--trust-checkpoint", is_flag=True, help="Unpickle --checkpoint fully (runs its code).")
def info(dataset: str | None, size: str, fusion: str, multispectral: str, inter_depth: int | None, measure: bool,
         device: str, as_json: bool, checkpoint: str | None, trust_checkpoint: bool) -> None:
    """Tokens per modality and per encoder sequence (all and visible at pre-training), and parameters; or what a
    checkpoint holds (--checkpoint)."""
    if checkpoint:
        from maestro_cli.checkpoint_info import show_checkpoint

        show_checkpoint(checkpoint, dataset, as_json, trust_checkpoint)
        return
    if not dataset:
        raise click.UsageError("give --dataset (or --checkpoint FILE)")
    manifest = load_manifest(dataset)
    try:
        tokens = F.modality_tokens(manifest, multispectral)
        seqs = F.encoder_sequences(manifest, fusion, multispectral)
        F.resolve_size(size)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    params = None
    error = None
    if measure:
        counts, error = _measure(manifest, size, fusion, multispectral, inter_depth, device, phases=())
        params = None if counts is None else counts["parameters"]
    report = {
        "dataset": manifest.name, "size": size, "fusion": fusion, "multispectral": multispectral,
        "modality_tokens": tokens,
        "sequences": [{"key": s.key, "modalities": list(s.modalities), "length": s.length, "count": s.count,
                       "visible_pretrain": F.visible_tokens(s.length)} for s in seqs],
        "parameters": params, "measure_error": error,
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"MAESTRO-{size} on {manifest.name}: fusion {fusion}, {multispectral} multispectral fusion")
    for name, n in tokens.items():
        m = manifest.modalities[name]
        click.echo(f"  modality {name:<8} {n:>6} tokens  (grid {m.grid_size}x{m.grid_size}, {m.temporal_bins} "
                   f"dates, {m.channels} channels, group {m.fusion_group})")
    for s in report["sequences"]:
        click.echo(f"  sequence {s['key']:<8} {s['count']:>3} x {s['length']:>5} tokens, "
                   f"{s['visible_pretrain']} visible at pre-training  ({', '.join(s['modalities'])})")
    click.echo(f"  total {sum(tokens.values())} tokens; parameters: "
               f"{_fmt(None if params is None else params / 1e6, ' M')}")
    if error:
        click.echo(f"parameters unavailable: {error}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="A maestro-train run folder (finetune/, else probe/), one of its .safetensors exports, or an "
                   "IGNF Lightning .ckpt.")
@click.option("--index", "index", required=True, help="Shard folder, its index.json, or a URL.")
@click.option("--split", default="test", show_default=True, help="A split of the shards, or 'all'.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--tta", type=click.Choice(["none", "d4"]), default="none", show_default=True,
              help="d4: average the logits of the 8 flips/rotations (inverse-transformed) before the argmax.")
@click.option("--probabilities", is_flag=True, help="Also write per-class probability COGs (uint8, scale 1/255).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--ema/--raw-weights", default=True, show_default=True,
              help="Use the EMA export / ema_model weights where the checkpoint has them.")
@click.option("--cpu", is_flag=True, help="Run on CPU even where a GPU is present.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(checkpoint: str, index: str, split: str, out: Path, tta: str, probabilities: bool, batch_size: int,
            ema: bool, cpu: bool, quiet: bool) -> None:
    """Predict SPLIT of the shards at INDEX into OUT: per tile a Cloud-Optimized GeoTIFF on the label grid and a
    VRT mosaic (segmentation), or a GeoJSON + CSV of tile footprints (classification); metrics.json with labels.
    Resumable: tiles already written are skipped."""
    import torch
    from accelerate import Accelerator

    from maestro_model.predict import PredictOptions
    from maestro_model.predict import predict as run_predict

    accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
    options = PredictOptions(checkpoint=checkpoint, index=index, out=out, split=split, tta=tta == "d4",
                             probabilities=probabilities, batch_size=batch_size, ema=ema, quiet=quiet)
    summary = run_predict(options, accelerator)
    if accelerator.is_main_process:
        click.echo(f"predicted {summary['tiles']} tiles with {summary['model']}"
                   + (" (TTA d4)" if tta == "d4" else "") + f" -> {out}")
        for path in summary["outputs"]:
            click.echo(f"  {path}")
        for name, value in summary["metrics"].items():
            if isinstance(value, float):
                click.echo(f"  {name}: {value:.4f}")


if __name__ == "__main__":
    main()
