"""`maestro-model info --checkpoint`: what a checkpoint file holds, and what of it a dataset's model would load."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from maestro_data.manifest import load_manifest


def _load_check(path: str, dataset: str, ckpt: Any) -> dict[str, Any]:
    """Build the model the checkpoint records for ``dataset`` and compare keys (nothing is kept)."""
    from maestro_model.checkpoints import CheckpointError, build_model_for_checkpoint, compare, read_state_dict

    try:
        model = build_model_for_checkpoint(ckpt, load_manifest(dataset))
    except CheckpointError as exc:
        return {"dataset": dataset, "fits_strictly": False, "report": f"not checked: {exc}"}
    report = compare(model, read_state_dict(ckpt), path)
    return {"dataset": dataset, "fits_strictly": report.ok, "report": report.describe()}


def show_checkpoint(path: str, dataset: str | None, as_json: bool, trusted: bool) -> None:
    """Print the checkpoint summary (and the load check for ``dataset``) as text or JSON."""
    from maestro_model.checkpoints import checkpoint_summary, read_checkpoint

    ckpt = read_checkpoint(path, trusted=trusted)
    summary = checkpoint_summary(ckpt)
    if dataset:
        logging.getLogger("maestro_model").setLevel(logging.WARNING)
        summary["load_check"] = _load_check(path, dataset, ckpt)
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    click.echo(f"{path}: {summary['kind']} checkpoint, networks {', '.join(summary['networks'])}"
               f"{' (EMA copy included)' if summary['has_ema'] else ''}")
    for key, value in summary["info"].items():
        click.echo(f"  {key}: {value}")
    click.echo(f"  parameters: {summary['parameters'] / 1e6:.2f} M in {summary['tensors']} tensors")
    click.echo(f"  modalities: {', '.join(summary['modalities'])}; patch embeddings: "
               f"{', '.join(summary['embeddings'])}")
    click.echo(f"  encoders (fusion groups): {', '.join(summary['encoders'])}"
               f"{' + shared inter-group blocks' if summary['inter_group_blocks'] else ''}")
    click.echo(f"  heads: {', '.join(summary['heads']) or 'none'}")
    settings = summary["settings"]
    if settings is None:
        click.echo("  settings: none recorded (bare state dict): build the model by hand")
    else:
        shown = ("size", "fusion", "inter_depth", "head", "interpolate", "date_encoding", "loss", "mask_ratio")
        click.echo("  settings: " + ", ".join(f"{k}={settings[k]!r}" for k in shown if k in settings))
    if summary["hyper_parameters"] is not None:
        click.echo(f"  hyper_parameters: {json.dumps(summary['hyper_parameters'], default=str)}")
    if dataset:
        check = summary["load_check"]
        click.echo(f"  into a {dataset} model: {'fits strictly' if check['fits_strictly'] else 'partial'}\n    "
                   + check["report"].replace("\n  ", "\n    "))
