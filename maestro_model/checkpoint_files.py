"""Reading checkpoint files without running their code: Lightning ``.ckpt``, bare state dicts, safetensors.

Official checkpoints are written by PyTorch Lightning around ``SSLModule``; their ``hyper_parameters`` pickle the
official configuration dataclasses (``maestro.conf.mask.MaskConfig``), which this toolkit cannot and must not import.
``torch.load(weights_only=True)`` refuses such globals; here each one that is pure configuration data (the official
``maestro.*`` classes, omegaconf containers) is mapped to an inert stand-in that only keeps the pickled fields, found
with torch's own inspection of the file's globals. Anything else is refused with a message naming the class and the
file. ``trusted=True`` is the explicit escape hatch (a full unpickle, which runs whatever the file says).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import serialization

from maestro_model.model import ModelError

# classes that hold configuration values only: unpickled as stand-ins that keep their fields, never imported
INERT_PREFIXES = ("maestro.", "omegaconf.")
INERT_NAMES = {"typing.Any"}
# plain types that configuration containers reference (omegaconf stores key/element types): allowed as themselves
PLAIN_TYPES = {f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, int, float, str, bool, bytes)}
PLAIN_TYPES["collections.defaultdict"] = __import__("collections").defaultdict


class CheckpointError(ModelError):
    """A checkpoint cannot be read or does not fit the model (the message carries the key report)."""


class StandIn:
    """Inert placeholder for a pickled configuration object: keeps the pickled state, runs no code of its class."""

    pickled_name = "?"

    def __init__(self, *args: Any) -> None:
        self.__dict__["_state"] = {"args": list(args)} if args else {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict state, slot state)
            state = {**(state[0] or {}), **state[1]}
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<{self.pickled_name} {self._state!r}>"


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (StandIn,), {"pickled_name": name, "__module__": __name__})


def plain(value: Any) -> Any:
    """Stand-ins and containers turned into plain JSON-like values (omegaconf nodes into their values)."""
    if isinstance(value, StandIn):
        state = value._state
        name = value.pickled_name
        if isinstance(state, dict) and name.startswith("omegaconf."):
            if name.endswith(("DictConfig", "ListConfig")):
                return plain(state.get("_content"))
            if "_val" in state:
                return plain(state["_val"])
        return plain(state) if isinstance(state, dict) else repr(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


@dataclass
class CheckpointFile:
    """What one checkpoint file holds: its tensors as stored, and the settings it was trained with."""

    path: str
    kind: str                                     # lightning | state_dict | safetensors | maestro
    tensors: dict[str, torch.Tensor]
    hparams: dict[str, Any] | None = None         # Lightning hyper_parameters, as plain values
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata (ours: config, manifest)
    info: dict[str, Any] = field(default_factory=dict)      # epoch, global_step, Lightning version

    @property
    def prefixes(self) -> set[str]:
        """Lightning network prefixes present (``model``, ``ema_model``); empty for a bare state dict."""
        return {p for p in ("model", "ema_model") if any(k.startswith(p + ".") for k in self.tensors)}


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None


def _torch_load(path: Path, trusted: bool) -> Any:
    if trusted:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a full unpickle can raise anything the file's code raises
            raise CheckpointError(f"{path}: cannot read the checkpoint even as trusted: "
                                  f"{type(exc).__name__}: {exc}") from None
    names = _unsafe_globals(path)
    refused = [n for n in names if n not in PLAIN_TYPES and n not in INERT_NAMES and not n.startswith(INERT_PREFIXES)]
    if refused:
        raise CheckpointError(f"{path}: the checkpoint pickles {', '.join(refused)}, which is neither a tensor nor "
                              "a known configuration class; refusing to run its code (if you trust this file, pass "
                              "--trust-checkpoint / trusted=True)")
    allowed = [(PLAIN_TYPES[n], n) if n in PLAIN_TYPES else (_stand_in(n), n) for n in names]
    try:
        with serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {str(exc).splitlines()[0]}") from None


def _tensors(state: Any, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: expected a state dict or a Lightning checkpoint, got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{name}: the checkpoint holds no tensors")
    return tensors


def read_checkpoint(source: str | Path | dict, *, trusted: bool = False) -> CheckpointFile:
    """Read any supported checkpoint (file or in-memory dict) without executing pickled code (unless ``trusted``)."""
    if isinstance(source, dict):
        return _from_object(source, "<state dict>")
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        kind = "maestro" if meta.get("format") == "maestro-model" else "safetensors"
        return CheckpointFile(str(path), kind, _tensors(tensors, str(path)), metadata=meta)
    return _from_object(_torch_load(path, trusted), str(path))


def _from_object(obj: Any, name: str) -> CheckpointFile:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name}: expected a state dict or a Lightning checkpoint, got {type(obj).__name__}")
    if "state_dict" not in obj:
        return CheckpointFile(name, "state_dict", _tensors(obj, name))
    state = obj["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: 'state_dict' is a {type(state).__name__}, not a dict")
    hparams = obj.get("hyper_parameters")
    info = {k: plain(obj[k]) for k in ("epoch", "global_step", "pytorch-lightning_version") if k in obj}
    return CheckpointFile(name, "lightning", _tensors(state, name),
                          hparams=plain(hparams) if isinstance(hparams, dict) else None, info=info)
