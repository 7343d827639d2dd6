"""Host -> device side of the batch contract: numpy rows to torch tensors, deferred normalisation and D4.

Two kinds of pixel work are deferred to the accelerator by default, because they cost the host CPU most and the
device almost nothing (both choices measured by ``benchmarks/loader_throughput.py``):

* ``normalize_on_device``: integer modalities leave the loader in their stored dtype (uint8 aerial/SPOT,
  uint16/int16 S2), 2-4x fewer bytes through worker queues, pinned memory and PCIe; :func:`to_model_batch` applies
  the official float32 -> ``log(max(x, LOG_FLOOR))`` (``log_scale``) -> ``/ norm_factor`` on the device with
  :func:`normalise_tensor`, the one torch form of ``temporal.normalise`` (the model uses it for integer inputs
  too). Float modalities (S1, DEM) arrive already normalised and NaN-filled as float32 ("taken as normalised" by
  the contract).
* segmentation labels leave the loader either as their stored uint8 class values (with ``normalize_on_device``,
  the default: no host work but a copy) or already mapped (ignored classes -> missing value) in the smallest signed
  integer dtype holding them (``collate.label_dtype``, int8 for every dataset); :func:`to_model_batch` maps uint8
  labels through the manifest's table (``collate.label_table``, built and uploaded once per target and device) on
  the device and widens both to int64. So uint8 means "stored classes" and a signed dtype "training labels"
  (``label_dtype`` is always signed).
* ``d4_on_device``: the transpose of a D4 element is a strided copy (~1 ms per 512² float32 plane on one core);
  the loader returns rasters untransformed with ``batch["d4"]`` (int64 [B], the element of each row) and
  :func:`to_model_batch` applies it to every raster and segmentation label (then drops ``d4``, so it runs once).

A trainer therefore always moves batches with ``to_model_batch(batch, manifest, device)``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from maestro_data.collate import label_table
from maestro_data.manifest import Manifest, TargetSpec
from maestro_data.temporal import LOG_FLOOR


def to_tensors(batch: dict) -> dict:
    """numpy arrays -> torch tensors without copying (done in the worker, so tensors travel by shared memory)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def normalise_tensor(x: torch.Tensor, log_scale: bool, norm_factor: float) -> torch.Tensor:
    """Deferred normalisation of an integer tensor on its device, the arithmetic of ``temporal.normalise`` (without
    the NaN fill: integers hold none): float32, ``log(max(x, LOG_FLOOR))`` when ``log_scale``, ``/ norm_factor``.
    Bit for bit without ``log_scale`` (every integer modality of the four datasets); torch's and numpy's float32
    ``log`` may differ by an ulp."""
    x = x.to(torch.float32)
    if log_scale:
        x = torch.log(torch.clamp_min(x, LOG_FLOOR))
    # a 0-dim device tensor, not a Python scalar: CUDA turns scalar division into a reciprocal product (not exact)
    return x / torch.full((), norm_factor, dtype=torch.float32, device=x.device)


@lru_cache(maxsize=64)
def _label_table(target: TargetSpec, device: torch.device) -> torch.Tensor:
    """uint8 class value -> int64 training label of ``target``, on ``device`` (read only: indexing copies)."""
    return torch.from_numpy(label_table(target, 256).astype(np.int64)).to(device)


def d4_apply_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """``augment.d4_apply`` for torch tensors: bit 0 flips rows, bit 1 columns, bit 2 then swaps the last two axes."""
    if k & 1:
        x = x.flip(-2)
    if k & 2:
        x = x.flip(-1)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


def _apply_d4(out: dict[str, Any], elements: torch.Tensor, keys: list[str]) -> None:
    elements = elements.cpu()
    for k in torch.unique(elements).tolist():
        if k == 0:
            continue
        rows = torch.nonzero(elements == k).flatten()
        for key in keys:
            x = out[key]
            sel = rows.to(x.device)
            x[sel] = d4_apply_torch(x[sel], k).contiguous()


def to_model_batch(batch: dict[str, Any], manifest: Manifest, device: torch.device | str,
                   non_blocking: bool = True) -> dict[str, Any]:
    """Move a loader batch to ``device``, normalise integer modalities there, widen segmentation labels to int64
    and apply a pending ``d4``: the result follows ``batch.check_batch`` (the model's contract).

    Integer modalities go through :func:`normalise_tensor` (the arithmetic of ``temporal.normalise``)."""
    segmentation = {t.name: t for t in manifest.targets.values() if t.type == "segmentation"}
    rasters = [*manifest.modalities, *segmentation]
    pending = "d4" in batch
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            moved = value.to(device, non_blocking=non_blocking)
            spec = manifest.modalities.get(key)
            if spec is not None and not moved.is_floating_point():
                moved = normalise_tensor(moved, spec.log_scale, spec.norm_factor)
            elif key in segmentation and moved.dtype == torch.uint8:  # stored classes -> training labels
                moved = _label_table(segmentation[key], moved.device)[moved.long()]  # new: D4 below works in place
            elif key in segmentation and moved.dtype != torch.int64:
                moved = moved.to(torch.int64)
            elif pending and key in rasters and moved.data_ptr() == value.data_ptr():
                moved = value.clone()  # the D4 below works in place: never on the caller's tensors
            value = moved
        out[key] = value
    if pending:
        _apply_d4(out, out.pop("d4"), [k for k in rasters if k in out])
    return out
