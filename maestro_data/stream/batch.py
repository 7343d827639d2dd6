"""The batch contract between the streaming loader and the model (one dict per step).

Keys and layouts (B = batch size; every number comes from the manifest, see :func:`expected_shapes`):

* ``<modality>``: ``[B, D, C, H, W]`` with D = ``temporal_bins``, C = the channels the model sees (after the
  manifest's ``select``), H = W = ``image_size``. Either float32 already normalised (``log`` for ``log_scale``
  modalities, then ``/ norm_factor``), or the stored dtype of the manifest (uint8 / uint16 / int16). Batches moved
  by ``device.to_model_batch`` arrive normalised (it applies the loader's deferred normalisation on the device);
  the model still accepts integer inputs and normalises them with the same function
  (``device.normalise_tensor``: float32, ``log`` if ``log_scale``, ``/ norm_factor``). A float32 tensor is always
  taken as normalised.
* ``<modality>_dates``: int16 ``[B, D, 3]`` = (year, day of year 1..366, hour), the date of each temporal bin.
* ``ref_date``: int16 ``[B, 1, 3]``, the tile's reference date shared by all modalities.
* targets (optional for pre-training): multilabel ``[B, K]`` (float or signed integer, missing = the manifest's
  ``missing_value``, usually -1); segmentation ``[B, H_t, W_t]`` int64 with the manifest's ``missing_value`` where
  no label exists (H_t = W_t = target ``image_size``).
* ``tile_id``: ``list[str]`` of length B (optional), the exact source tile ids.

That is what the MODEL receives (:func:`check_batch`). The streaming loader's batches (:func:`check_loader_batch`)
differ before ``device.to_model_batch`` moves them, in ways that save host CPU and bytes:

* integer modalities stay in their stored dtype by default (``normalize_on_device``); ``to_model_batch``
  normalises them.
* segmentation targets may be any integer dtype of ``LOADER_SEGMENTATION_DTYPES``. By default
  (``normalize_on_device``) the loader sends the stored uint8 CLASS values and ``to_model_batch`` maps them to
  training labels (ignored classes -> ``missing_value``) through the manifest's table; otherwise the loader sends
  training labels already mapped, in the smallest signed dtype holding every label and the missing value (int8 for
  the four datasets). So uint8 means stored classes and a signed dtype training labels; either way
  ``to_model_batch`` returns int64 labels.
* extra keys: ``valid`` bool ``[B]`` (False on padding rows: exclude them from metrics), ``crop_index`` int64
  ``[B]`` (-1 on padding rows), ``<modality>_missing`` bool ``[B]`` (the tile has no date for that modality: a
  neutral all-zero row after normalisation) and, with ``d4_on_device``, ``d4`` int64 ``[B]`` (the D4 element of
  each row, still to be applied by ``to_model_batch``, which then drops the key).

Arrays may be torch tensors or numpy arrays: only ``.shape`` and ``.dtype`` are read (and ``isfinite`` in value mode),
so this module does not import torch. Extra keys are ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maestro_data.errors import MaestroError
from maestro_data.manifest import Manifest

FLOAT_DTYPE = "float32"
DATE_DTYPE = "int16"
MULTILABEL_DTYPES = ("float32", "float64", "int8", "int16", "int32", "int64")
SEGMENTATION_DTYPE = "int64"
LOADER_SEGMENTATION_DTYPES = ("int8", "uint8", "int16", "int32", "int64")


def loader_keys(manifest: Manifest) -> dict[str, tuple[tuple, str]]:
    """Shape (``None`` = batch dimension) and dtype of the extra keys of a streaming-loader batch."""
    out: dict[str, tuple[tuple, str]] = {"valid": ((None,), "bool"), "crop_index": ((None,), "int64"),
                                         "d4": ((None,), "int64")}
    out.update({f"{m}_missing": ((None,), "bool") for m in manifest.modalities})
    return out


class BatchError(MaestroError):
    """A batch does not follow the contract (the message names the key and the expected shape/dtype)."""


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__)).removeprefix("torch.")


def _shape(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join("B" if s is None else str(s) for s in shape) + "]"


def expected_shapes(manifest: Manifest) -> dict[str, tuple]:
    """Shape of every batch key for ``manifest``; ``None`` stands for the batch dimension."""
    out: dict[str, tuple] = {}
    for m in manifest.modalities.values():
        out[m.name] = (None, m.temporal_bins, m.channels, m.image_size, m.image_size)
        out[f"{m.name}_dates"] = (None, m.temporal_bins, 3)
    out["ref_date"] = (None, 1, 3)
    for t in manifest.targets.values():
        out[t.name] = (None, t.num_classes) if t.type == "multilabel" else (None, t.image_size, t.image_size)
    return out


def allowed_dtypes(manifest: Manifest) -> dict[str, tuple[str, ...]]:
    """Dtypes accepted for every batch key of ``manifest``."""
    out: dict[str, tuple[str, ...]] = {}
    for m in manifest.modalities.values():
        out[m.name] = tuple(dict.fromkeys((FLOAT_DTYPE, m.dtype)))
        out[f"{m.name}_dates"] = (DATE_DTYPE,)
    out["ref_date"] = (DATE_DTYPE,)
    for t in manifest.targets.values():
        out[t.name] = MULTILABEL_DTYPES if t.type == "multilabel" else (SEGMENTATION_DTYPE,)
    return out


def _is_finite(x: Any) -> bool:
    if hasattr(x, "isfinite"):  # torch tensor, on any device
        return bool(x.isfinite().all())
    return bool(np.isfinite(np.asarray(x)).all())


def check_batch(manifest: Manifest, batch: dict[str, Any], *, targets: bool = False, values: bool = False) -> int:
    """Validate ``batch`` against the MODEL's contract for ``manifest`` and return the batch size.

    ``targets=True`` also requires every manifest target; ``values=True`` also rejects NaN/inf in float inputs
    (a full pass over the data: meant for debugging). Raises :class:`BatchError` naming the key at fault.
    """
    return _check(manifest, batch, expected_shapes(manifest), allowed_dtypes(manifest), targets, values)


def check_loader_batch(manifest: Manifest, batch: dict[str, Any], *, targets: bool = False,
                       values: bool = False) -> int:
    """Validate a streaming-loader batch (before ``to_model_batch``): the model's contract with the loader's
    allowances (narrow segmentation dtypes) and its extra keys, each checked when present."""
    shapes, dtypes = expected_shapes(manifest), allowed_dtypes(manifest)
    for t in manifest.targets.values():
        if t.type == "segmentation":
            dtypes[t.name] = LOADER_SEGMENTATION_DTYPES
    for key, (shape, dtype) in loader_keys(manifest).items():
        if key in batch:
            shapes[key], dtypes[key] = shape, (dtype,)
    return _check(manifest, batch, shapes, dtypes, targets, values)


def _check(manifest: Manifest, batch: dict[str, Any], shapes: dict[str, tuple], dtypes: dict[str, tuple[str, ...]],
           targets: bool, values: bool) -> int:
    if not isinstance(batch, dict):
        raise BatchError(f"{manifest.name}: a batch must be a dict, got {type(batch).__name__}")
    required = [k for k in shapes if k not in manifest.targets or targets]
    missing = [k for k in required if k not in batch]
    if missing:
        raise BatchError(f"{manifest.name}: batch lacks {', '.join(repr(k) for k in missing)} "
                         f"(expected {', '.join(f'{k} {_fmt(shapes[k])}' for k in missing)})")
    size: int | None = None
    for key in shapes:
        if key not in batch:
            continue
        x = batch[key]
        shape = _shape(x)
        if shape is None or len(shape) != len(shapes[key]):
            raise BatchError(f"{manifest.name}: batch[{key!r}] has shape {shape}, expected {_fmt(shapes[key])}")
        if size is None:
            size = shape[0]
        want = (size, *shapes[key][1:])
        if shape != want:
            raise BatchError(f"{manifest.name}: batch[{key!r}] has shape {list(shape)}, expected {list(want)} "
                             f"({_fmt(shapes[key])}, B = {size} from the first key)")
        dtype = _dtype_name(x)
        if dtype not in dtypes[key]:
            raise BatchError(f"{manifest.name}: batch[{key!r}] has dtype {dtype}, expected "
                             f"{' or '.join(dtypes[key])}")
        if values and key in manifest.modalities and dtype.startswith("float") and not _is_finite(x):
            raise BatchError(f"{manifest.name}: batch[{key!r}] contains NaN or inf")
    if "tile_id" in batch:
        ids = batch["tile_id"]
        if not isinstance(ids, list | tuple) or len(ids) != size or not all(isinstance(i, str) for i in ids):
            raise BatchError(f"{manifest.name}: batch['tile_id'] must be a list of {size} strings")
    assert size is not None  # a manifest has at least one modality
    return size
