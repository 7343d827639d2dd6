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
import pickle
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from maestro_data.manifest import Manifest, parse_manifest
from maestro_model.masking import MaskConfig
from maestro_model.model import MaestroModel, ModelConfig, ModelError

log = logging.getLogger(__name__)
FORMAT = "maestro-model"
FORMAT_VERSION = "1"
PREFIXES = ("model", "ema_model")
# top-level containers indexed by modality / sequence / target: report their keys per entry
PER_KEY_DICTS = {"patch_embed", "encoder", "enc_to_dec", "decoder", "embed_to_rec", "mask_token", "heads"}


class CheckpointError(ModelError):
    """A checkpoint cannot be read or does not fit the model (the message carries the key report)."""


@dataclass
class LoadReport:
    """Key comparison between a checkpoint and a model."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        """Readable report: counts, keys grouped by module (per modality / sequence / target), first mis-shaped ones."""
        def grouped(keys: list[str]) -> str:
            counts = Counter(".".join(k.split(".")[:2 if k.split(".")[0] in PER_KEY_DICTS else 1]) for k in keys)
            items = [f"{p}.* ({n})" for p, n in list(counts.items())[:limit]]
            return ", ".join(items) + (f", ... {len(counts) - limit} more groups" if len(counts) > limit else "")

        lines = [f"{self.source}: {self.loaded} tensors match"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): {grouped(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected in checkpoint ({len(self.unexpected)}): {grouped(self.unexpected)}")
        if self.mismatched:
            shown = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:limit])
            lines.append(f"mis-shaped ({len(self.mismatched)}): {shown}")
        return "\n  ".join(lines)


def _torch_load(path: Path, trusted: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        hint = "" if trusted else " (if you trust this file, pass trusted=True to allow arbitrary pickled objects)"
        raise CheckpointError(f"{path}: cannot read the checkpoint: {exc}{hint}") from None


def read_state_dict(source: str | Path | Mapping, *, which: str = "model", trusted: bool = False) -> dict:
    """Tensors of a checkpoint file or object, with the Lightning ``model.`` / ``ema_model.`` prefix resolved.

    ``source``: a ``.safetensors`` file, a torch file (Lightning ``.ckpt`` or bare state dict), or such a dict.
    ``which``: ``model`` (raw weights) or ``ema_model`` (the EMA copy) when the checkpoint has both.
    """
    if which not in PREFIXES:
        raise CheckpointError(f"which must be one of {', '.join(PREFIXES)}, got {which!r}")
    name = "<state dict>"
    if isinstance(source, str | Path):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        if path.suffix == ".safetensors":
            try:
                source = load_file(path)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        else:
            source = _torch_load(path, trusted)
    if not isinstance(source, Mapping):
        raise CheckpointError(f"{name}: expected a state dict or a Lightning checkpoint, got {type(source).__name__}")
    state = source.get("state_dict", source)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name}: 'state_dict' is a {type(state).__name__}, not a dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    prefixed = {p for p in PREFIXES if any(k.startswith(p + ".") for k in tensors)}
    if prefixed:
        if which not in prefixed:
            raise CheckpointError(f"{name}: no '{which}.' weights in this checkpoint (it has: "
                                  f"{', '.join(sorted(prefixed))})")
        tensors = {k[len(which) + 1:]: v for k, v in tensors.items() if k.startswith(which + ".")}
    if not tensors:
        raise CheckpointError(f"{name}: the checkpoint holds no tensors")
    return tensors


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


def load_weights(model: MaestroModel, source: str | Path | Mapping, *, which: str = "model", strict: bool = True,
                 exclude: tuple[str, ...] = (), trusted: bool = False) -> LoadReport:
    """Load an official or own checkpoint into ``model``; strict: raise :class:`CheckpointError` on any difference.

    Non-strict loads only the matching tensors and logs the report (``exclude`` prefixes, e.g. ``("heads.",)``, are
    skipped on both sides, which is the clean way to transfer an encoder to another head).
    """
    name = str(source) if isinstance(source, str | Path) else "<state dict>"
    state = read_state_dict(source, which=which, trusted=trusted)
    report = compare(model, state, name, exclude)
    if not report.ok:
        if strict:
            raise CheckpointError(f"checkpoint does not fit the {model.manifest.name} model "
                                  f"(size {model.config.size}, fusion {model.config.fusion}):\n  {report.describe()}")
        log.warning("partial load:\n  %s", report.describe())
    bad = {k for k, _, _ in report.mismatched}
    keep = {k: v for k, v in state.items() if k not in bad and not k.startswith(exclude) and k not in report.unexpected}
    model.load_state_dict(keep, strict=False)
    return report


def save_model(model: MaestroModel, path: str | Path) -> None:
    """Write the weights as safetensors, with the model configuration and the manifest text as metadata."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config_dict()),
            "manifest_name": model.manifest.name, "manifest_sha256": model.manifest.sha256,
            "manifest_text": model.manifest.text}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def load_model(path: str | Path, manifest: Manifest | None = None, *, strict: bool = True) -> MaestroModel:
    """Rebuild a model saved by :func:`save_model` (with its own manifest unless one is given) and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise CheckpointError(f"{path}: not a safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (use load_weights for official checkpoints)")
    raw = json.loads(meta["config"])
    config = ModelConfig(**{**raw, "mask": MaskConfig(**raw["mask"])})
    if manifest is None:
        manifest = parse_manifest(meta["manifest_text"], origin=f"{path} (embedded manifest)")
    elif manifest.sha256 != meta.get("manifest_sha256"):
        log.warning("%s: saved with manifest %s (sha256 %s), loading for %s (sha256 %s)", path,
                    meta.get("manifest_name"), meta.get("manifest_sha256"), manifest.name, manifest.sha256)
    model = MaestroModel(manifest, config)
    load_weights(model, path, strict=strict)
    return model
