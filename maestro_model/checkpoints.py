"""Weights in and out: official IGNF Lightning checkpoints, bare state dicts, and our own safetensors format.

Official checkpoints (``SSLModule``) hold the network twice in ``state_dict``: ``model.<key>`` (raw weights) and
``ema_model.<key>`` (the EMA copy used for fine-tuned evaluation); our modules use the official key names, so the
keys map one to one. Loading is strict by default: any missing, unexpected or mis-shaped key raises a
:class:`CheckpointError` with a grouped report (a checkpoint of another dataset, size or fusion mode never loads
partially without the caller asking for it).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from maestro_data.manifest import Manifest, parse_manifest
from maestro_model.checkpoint_files import CheckpointError, CheckpointFile, read_checkpoint
from maestro_model.checkpoint_settings import build_keywords, checkpoint_settings, differences
from maestro_model.masking import MaskConfig
from maestro_model.model import MaestroModel, ModelConfig, build_model

__all__ = ["CheckpointError", "LoadReport", "build_model_for_checkpoint", "checkpoint_summary", "compare",
           "load_model", "load_weights", "read_checkpoint", "read_state_dict", "save_model"]

log = logging.getLogger(__name__)
FORMAT = "maestro-model"
FORMAT_VERSION = "1"
PREFIXES = ("model", "ema_model")
# top-level containers indexed by modality / sequence / target: report their keys per entry
PER_KEY_DICTS = {"patch_embed", "encoder", "enc_to_dec", "decoder", "embed_to_rec", "mask_token", "heads"}


@dataclass
class LoadReport:
    """Key comparison between a checkpoint and a model."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: int = 0
    loaded_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @staticmethod
    def group(keys: list[str], limit: int = 8) -> str:
        """Keys counted per module (per modality / sequence / target for the indexed containers)."""
        counts = Counter(".".join(k.split(".")[:2 if k.split(".")[0] in PER_KEY_DICTS else 1]) for k in keys)
        items = [f"{p}.* ({n})" for p, n in list(counts.items())[:limit]]
        return ", ".join(items) + (f", ... {len(counts) - limit} more groups" if len(counts) > limit else "")

    def describe(self, limit: int = 8) -> str:
        """Readable report: loaded, kept as initialised (missing), skipped (unexpected, mis-shaped), by module."""
        lines = [f"{self.source}: {self.loaded} tensors match"]
        if self.loaded_keys:
            lines.append(f"loaded ({len(self.loaded_keys)}): {self.group(self.loaded_keys, 3 * limit)}")
        if self.missing:
            lines.append(f"newly initialised, missing in checkpoint ({len(self.missing)}): "
                         f"{self.group(self.missing, limit)}")
        if self.unexpected:
            lines.append(f"skipped, unexpected in checkpoint ({len(self.unexpected)}): "
                         f"{self.group(self.unexpected, limit)}")
        if self.mismatched:
            shown = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:limit])
            lines.append(f"skipped for shape ({len(self.mismatched)}): {shown}")
        return "\n  ".join(lines)


def read_state_dict(source: str | Path | Mapping | CheckpointFile, *, which: str = "model",
                    trusted: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, with the Lightning ``model.`` / ``ema_model.`` prefix resolved.

    ``source``: a ``.safetensors`` file, a torch file (Lightning ``.ckpt`` or bare state dict), such a dict, or an
    already read :class:`CheckpointFile`. ``which``: ``model`` (raw weights) or ``ema_model`` (the EMA copy); asking
    for ``ema_model`` from a file without one is an error, never a silent fallback to the raw weights.
    """
    if which not in PREFIXES:
        raise CheckpointError(f"which must be one of {', '.join(PREFIXES)}, got {which!r}")
    ckpt = source if isinstance(source, CheckpointFile) else read_checkpoint(
        dict(source) if isinstance(source, Mapping) else source, trusted=trusted)
    prefixed = ckpt.prefixes
    if which not in prefixed and (prefixed or which == "ema_model"):
        has = ", ".join(sorted(prefixed)) or "bare weights, no EMA copy"
        raise CheckpointError(f"{ckpt.path}: no '{which}.' weights in this checkpoint (it has: {has})")
    if not prefixed:
        return dict(ckpt.tensors)
    return {k[len(which) + 1:]: v for k, v in ckpt.tensors.items() if k.startswith(which + ".")}


def compare(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state dict>",
            exclude: tuple[str, ...] = ()) -> LoadReport:
    """Key and shape comparison between ``state`` and ``model.state_dict()`` (keys under ``exclude`` ignored)."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(exclude)}
    theirs = {k: v for k, v in state.items() if not k.startswith(exclude)}
    report = LoadReport(source, missing=[k for k in own if k not in theirs],
                        unexpected=[k for k in theirs if k not in own])
    for k in own.keys() & theirs.keys():
        if tuple(own[k].shape) != tuple(theirs[k].shape):
            report.mismatched.append((k, tuple(theirs[k].shape), tuple(own[k].shape)))
    report.mismatched.sort()
    report.loaded = len(own) - len(report.missing) - len(report.mismatched)
    return report


def required_keys(model: MaestroModel, state: Mapping[str, torch.Tensor]) -> list[str]:
    """The model tensors a transfer must load: the encoder of every modality the checkpoint also covers (its patch
    embedding, its sequence's encoder blocks, the shared inter-group blocks)."""
    embeds = {k.split(".")[1] for k in state if k.startswith("patch_embed.")}
    mods = [s for s in model.manifest.modalities.values() if s.embed_name in embeds]
    if model.config.fusion == "shared":
        encoders = {"shared"} if mods else set()
    else:
        encoders = {s.name if model.config.fusion in ("monotemp", "mod") else s.fusion_group for s in mods}
    prefixes = tuple({f"patch_embed.{s.embed_name}." for s in mods} | {f"encoder.{k}." for k in encoders}
                     | ({"encoder_inter."} if mods and model.encoder_inter is not None else set()))
    return [k for k in model.state_dict() if prefixes and k.startswith(prefixes)]


def load_weights(model: MaestroModel, source: str | Path | Mapping | CheckpointFile, *, which: str = "model",
                 strict: bool = True, exclude: tuple[str, ...] = (), trusted: bool = False, settings: str = "check",
                 force: bool = False) -> LoadReport:
    """Load an official or own checkpoint into ``model`` and log the report at INFO.

    ``strict``: any missing, unexpected or mis-shaped key raises :class:`CheckpointError` (model untouched).
    Non-strict loads the matching tensors, but refuses (unless ``force``) when less than the encoder of the modalities
    both sides share would load (:func:`required_keys`); ``exclude`` prefixes (e.g. ``("heads.",)``) are ignored on
    both sides. ``settings``: ``check`` raises when the settings the checkpoint records (date encodings, resize mode,
    fusion, head, ...) differ from the model's, ``warn`` logs them, ``ignore`` skips the comparison.
    """
    if settings not in ("check", "warn", "ignore"):
        raise CheckpointError(f"settings must be check, warn or ignore, got {settings!r}")
    ckpt = source if isinstance(source, CheckpointFile) else read_checkpoint(
        dict(source) if isinstance(source, Mapping) else source, trusted=trusted)
    state = read_state_dict(ckpt, which=which)
    recorded = checkpoint_settings(ckpt) if settings != "ignore" else None
    diffs = differences(model.config, recorded) if recorded else []
    if diffs and settings == "check":
        raise CheckpointError(f"{ckpt.path}: recorded settings differ from the {model.manifest.name} model:\n  "
                              + "\n  ".join(diffs) + "\n  (build the model the checkpoint needs with "
                              "build_model_for_checkpoint, or accept the differences with settings='warn' / "
                              "train.init_settings = \"warn\")")
    if diffs:
        log.warning("%s: loading despite settings that differ:\n  %s", ckpt.path, "\n  ".join(diffs))
    report = compare(model, state, ckpt.path, exclude)
    if not report.ok and strict:
        raise CheckpointError(f"checkpoint does not fit the {model.manifest.name} model "
                              f"(size {model.config.size}, fusion {model.config.fusion}):\n  {report.describe()}")
    bad = {k for k, _, _ in report.mismatched}
    keep = {k: v for k, v in state.items() if k not in bad and not k.startswith(exclude) and k not in report.unexpected}
    needed = [k for k in required_keys(model, state) if k not in keep and not k.startswith(exclude)]
    if not strict and (needed or not keep) and not force:
        what = (f"{len(needed)} encoder tensors of the shared modalities would stay random: "
                f"{report.group(needed)}" if needed else "no tensor of the checkpoint fits")
        raise CheckpointError(f"{ckpt.path}: partial load refused, {what}\n  {report.describe()}\n  (force=True / "
                              "train.init_force = true loads it anyway)")
    model.load_state_dict(keep, strict=False)
    report.loaded_keys = sorted(keep)
    log.info("weights from %s (%s):\n  %s", ckpt.path, which, report.describe())
    return report


def build_model_for_checkpoint(source: str | Path | CheckpointFile, manifest: Manifest | str, *,
                               trusted: bool = False, **overrides: Any) -> MaestroModel:
    """The model a checkpoint was trained as (its recorded size, fusion, head, date encoding, resize mode, mask),
    for ``manifest``; ``overrides`` are ``build_model`` keywords that replace recorded values."""
    ckpt = source if isinstance(source, CheckpointFile) else read_checkpoint(source, trusted=trusted)
    recorded = checkpoint_settings(ckpt)
    if recorded is None:
        raise CheckpointError(f"{ckpt.path}: a bare state dict records no model settings; build the model with "
                              "build_model(manifest, size, fusion, ...) instead")
    size, fusion, kw = build_keywords({**recorded, **overrides})
    return build_model(manifest, size, fusion, **kw)


def checkpoint_summary(ckpt: CheckpointFile) -> dict[str, Any]:
    """What ``maestro-model info --checkpoint`` shows: kind, recorded settings, parameters, what the weights cover."""
    prefixes = sorted(ckpt.prefixes) or [""]
    main = read_state_dict(ckpt, which=prefixes[0]) if prefixes[0] else dict(ckpt.tensors)

    def names(container: str) -> list[str]:
        return sorted({k.split(".")[1] for k in main if k.startswith(container + ".")})

    return {
        "path": ckpt.path, "kind": ckpt.kind, "networks": [p or "model" for p in prefixes],
        "has_ema": "ema_model" in prefixes or bool(ckpt.metadata.get("ema")),
        "tensors": len(main), "parameters": sum(v.numel() for v in main.values()),
        "modalities": names("mask_token"), "embeddings": names("patch_embed"), "encoders": names("encoder"),
        "inter_group_blocks": any(k.startswith("encoder_inter.") for k in main), "heads": names("heads"),
        "settings": checkpoint_settings(ckpt), "hyper_parameters": ckpt.hparams, "info": ckpt.info,
        "manifest": ckpt.metadata.get("manifest_name"),
    }


def save_model(model: MaestroModel, path: str | Path, *, ema: bool = False) -> None:
    """Write the weights as safetensors, with the model configuration and the manifest text as metadata
    (``ema``: these are EMA-averaged weights, recorded so that ``info`` and ``predict`` can say so)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config_dict()),
            "ema": "1" if ema else "",
            "manifest_name": model.manifest.name, "manifest_sha256": model.manifest.sha256,
            "manifest_text": model.manifest.text}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def load_model(path: str | Path, manifest: Manifest | None = None, *, strict: bool = True) -> MaestroModel:
    """Rebuild a model saved by :func:`save_model` (with its own manifest unless one is given) and load its weights."""
    ckpt = read_checkpoint(path)
    if ckpt.kind != "maestro":
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (official or bare files: build the model with "
                              "build_model_for_checkpoint / build_model, then load_weights)")
    meta = ckpt.metadata
    raw = json.loads(meta["config"])
    config = ModelConfig(**{**raw, "mask": MaskConfig(**raw["mask"])})
    if manifest is None:
        manifest = parse_manifest(meta["manifest_text"], origin=f"{path} (embedded manifest)")
    elif manifest.sha256 != meta.get("manifest_sha256"):
        log.warning("%s: saved with manifest %s (sha256 %s), loading for %s (sha256 %s)", path,
                    meta.get("manifest_name"), meta.get("manifest_sha256"), manifest.name, manifest.sha256)
    model = MaestroModel(manifest, config)
    load_weights(model, ckpt, strict=strict)
    return model
