"""Which weights ``maestro-model predict`` runs: our export (a run folder or one ``.safetensors``) or an IGNF
Lightning checkpoint, EMA by default (the fine-tuned model the trainer evaluates, as the official evaluation)."""

from __future__ import annotations

from pathlib import Path

from maestro_data.manifest import Manifest
from maestro_model.checkpoint_files import CheckpointError, read_checkpoint
from maestro_model.checkpoints import build_model_for_checkpoint, load_model, load_weights
from maestro_model.model import MaestroModel

HEAD_PHASES = ("finetune", "probe")  # the run phases whose export has trained heads, preferred first
# the file each phase's evaluation measured (maestro_model.train): predictions then match the reported metrics
EVALUATED = {"finetune": ("model-ema.safetensors", "model.safetensors"), "probe": ("model.safetensors",)}


def export_file(run_dir: Path, ema: bool) -> Path:
    """The weights of a training run folder: the latest phase with heads, the file its evaluation used (fine-tuning:
    the EMA export when kept; probing: the trained weights), or its raw weights when ``ema`` is off."""
    for phase in HEAD_PHASES:
        folder = run_dir / phase
        names = EVALUATED[phase] if ema else ("model.safetensors",)
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise CheckpointError(f"{run_dir}: no finetune/ or probe/ model.safetensors (a run folder of maestro-train, "
                          "or give the checkpoint file)")


def load_predictor(checkpoint: str | Path, data_manifest: Manifest, *, ema: bool = True,
                   ) -> tuple[MaestroModel, str]:
    """(model with its heads, a line saying which weights) for ``checkpoint``; an official checkpoint records no
    manifest and is built for the shards' ``data_manifest``."""
    path = Path(checkpoint)
    if path.is_dir():
        path = export_file(path, ema)
    ckpt = read_checkpoint(path)
    if ckpt.kind == "maestro":
        model = load_model(path)
        return model, f"{path} ({'EMA' if ckpt.metadata.get('ema') else 'raw'} weights)"
    model = build_model_for_checkpoint(ckpt, data_manifest)
    which = "ema_model" if ema and "ema_model" in ckpt.prefixes else "model"
    load_weights(model, ckpt, which=which if ckpt.prefixes else "model")
    return model, f"{path} ({which})"
