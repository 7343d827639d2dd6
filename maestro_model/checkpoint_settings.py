"""The model settings a checkpoint was trained with, read from its own record, and how they differ from a model.

Official Lightning checkpoints record ``SSLModule``'s arguments in ``hyper_parameters`` (``model_size``,
``fusion_mode`` + ``inter_depth``, ``type_head``, ``interpolate``, ``use_date_enc``, ``loss``, ``mask``,
``use_ema``); our safetensors exports record the full :class:`ModelConfig`. Settings that change what a forward
computes without changing any tensor shape or key (date encodings, resize mode, inter-group depth, ...) are
invisible to a key comparison, so they are compared here.
"""

from __future__ import annotations

import json
from typing import Any

from maestro_model.checkpoint_files import CheckpointError, CheckpointFile
from maestro_model.model import DIM_KEYS, MASK_OPTIONS, SIZE_ALIASES, SIZES, ModelConfig

# settings that change the network's function (the forward); the rest (loss, masking) only change training
FORWARD_KEYS = ("size", "fusion", "inter_depth", "multispectral", "head", "interpolate", "date_encoding",
                "pos_grid", *DIM_KEYS)
OFFICIAL_MASK = {"mask_ratio": "ratio", "mask_scale": "scale", "mask_mod": "p_mod", "mask_bands": "p_bands",
                 "mask_dates": "p_dates", "mask_loc": "p_loc"}


def _official(hp: dict[str, Any], name: str) -> dict[str, Any]:
    """Official ``hyper_parameters`` -> our ModelConfig fields (``build_model`` keywords)."""
    if hp.get("model", "mae") != "mae":
        raise CheckpointError(f"{name}: a checkpoint of the official {hp.get('model')!r} baseline, not MAESTRO "
                              "(model 'mae'); only MAESTRO weights load here")
    size = SIZE_ALIASES.get(hp.get("model_size", "tiny"), hp.get("model_size", "tiny"))
    if size not in SIZES:
        raise CheckpointError(f"{name}: hyper_parameters.model_size {hp.get('model_size')!r} is not one of "
                              f"{', '.join([*SIZES, *SIZE_ALIASES])}")
    fusion, depth = hp.get("fusion_mode", "group"), int(hp.get("inter_depth", 3) or 0)
    out: dict[str, Any] = {"size": size, "fusion": "inter-group" if fusion == "group" and depth else fusion,
                           "inter_depth": depth, "multispectral": "joint"}
    out.update(dict(zip(DIM_KEYS, SIZES[size], strict=True)))
    for key, ours in (("type_head", "head"), ("interpolate", "interpolate"), ("use_date_enc", "date_encoding"),
                      ("loss", "loss")):
        if key in hp:
            out[ours] = hp[key]
    mask = hp.get("mask")
    if isinstance(mask, dict):
        out.update({k: mask[k] for k in OFFICIAL_MASK if k in mask})
    return out


def _ours(meta: dict[str, str], name: str) -> dict[str, Any]:
    try:
        raw = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: the model configuration in its metadata is unreadable ({exc})") from None
    mask = raw.pop("mask", {}) or {}
    inverse = {v: k for k, v in MASK_OPTIONS.items()}
    raw.update({inverse[k]: v for k, v in mask.items() if k in inverse})
    return raw


def checkpoint_settings(ckpt: CheckpointFile) -> dict[str, Any] | None:
    """Model settings recorded in the checkpoint as ``build_model`` keywords, or None when it records none."""
    if ckpt.kind == "maestro":
        return _ours(ckpt.metadata, ckpt.path)
    if ckpt.hparams is not None and ("model_size" in ckpt.hparams or "fusion_mode" in ckpt.hparams):
        return _official(ckpt.hparams, ckpt.path)
    return None


def model_settings(config: ModelConfig) -> dict[str, Any]:
    """A model's configuration in the same keyword form as :func:`checkpoint_settings`."""
    out = {k: getattr(config, k) for k in ModelConfig.__dataclass_fields__ if k != "mask"}
    out.update({k: getattr(config.mask, v) for k, v in MASK_OPTIONS.items()})
    return out


def differences(config: ModelConfig, recorded: dict[str, Any]) -> list[str]:
    """Forward-relevant settings where ``config`` differs from what the checkpoint recorded, one line each."""
    ours = model_settings(config)
    return [f"{k}: checkpoint {recorded[k]!r}, model {ours[k]!r}" for k in FORWARD_KEYS
            if k in recorded and k in ours and recorded[k] != ours[k]]


def build_keywords(recorded: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(size, fusion, other ``build_model`` keywords) that rebuild the recorded model."""
    kw = dict(recorded)
    size, fusion = kw.pop("size"), kw.pop("fusion")
    kw.pop("debug_checks", None)
    return size, fusion, kw
