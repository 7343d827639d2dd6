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
* ``d4_on_device``: the transpose of a D4 element is a strided copy (~0.3 ms per 512² plane on one core);
  the loader returns rasters untransformed with ``batch["d4"]`` (int64 [B], the element of each row) and
  :func:`to_model_batch` applies it to every raster and segmentation label (then drops ``d4``, so it runs once).

A trainer therefore always moves batches with ``to_model_batch(batch, manifest, device)``. With a CPU ``device``
(CPU training and inference) the same work runs on the host, each raster written once into reused memory
(:func:`_host_raster`, :class:`_HostBuffers`); the results are those of the accelerator's kernels bit for bit
(conversions, table look-ups, D4 and one float32 division are exact; a ``log_scale`` integer modality, which no
dataset has, is normalised on the whole tensor by :func:`normalise_`, as :func:`normalise_tensor` does).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from maestro_data.manifest import Manifest, TargetSpec
from maestro_data.stream.collate import label_table
from maestro_data.stream.temporal import LOG_FLOOR


def to_tensors(batch: dict) -> dict:
    """numpy arrays -> torch tensors without copying (done in the worker, so tensors travel by shared memory)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def normalise_(x: torch.Tensor, log_scale: bool, norm_factor: float) -> torch.Tensor:
    """In place on a float32 tensor: ``log(max(x, LOG_FLOOR))`` when ``log_scale``, then ``/ norm_factor``. The
    arithmetic of :func:`normalise_tensor`, op for op, without a new tensor per step (the host path's speed)."""
    if log_scale:
        x.clamp_min_(LOG_FLOOR).log_()
    # a 0-dim device tensor, not a Python scalar: CUDA turns scalar division into a reciprocal product (not exact)
    return x.div_(torch.full((), norm_factor, dtype=torch.float32, device=x.device))


def normalise_tensor(x: torch.Tensor, log_scale: bool, norm_factor: float) -> torch.Tensor:
    """Deferred normalisation of an integer tensor on its device, the ONE torch form of ``temporal.normalise``
    (without the NaN fill: integers hold none), used by :func:`to_model_batch` and ``MaestroModel.prepare``:
    float32, ``log(max(x, LOG_FLOOR))`` when ``log_scale``, ``/ norm_factor``. Bit for bit without ``log_scale``
    (every integer modality of the four datasets); torch's and numpy's float32 ``log`` may differ by an ulp."""
    return normalise_(x.to(torch.float32, copy=True), log_scale, norm_factor)


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


# torch's blocked 2-D transpose copy (same dtype, contiguous destination) applies from this many elements; a batched
# transposed copy walks element by element, ~3x slower per element on a 512² plane
_FAST_TRANSPOSE = 60 * 60


def _fill(dst: torch.Tensor, src: torch.Tensor, table: torch.Tensor | None, divisor: torch.Tensor | None = None
          ) -> None:
    """dst := src in dst's dtype, or, with ``table``, each stored class looked up as its training label, or, with
    ``divisor``, float32(src) / divisor in one pass (exact: the conversion then the division of normalise_)."""
    if divisor is not None:
        torch.div(src, divisor, out=dst)
    elif table is None:
        dst.copy_(src)
    else:  # one gather (int32 indices: half the temporary of int64 ones; uint8 would index as a mask)
        torch.index_select(table, 0, src.reshape(-1).to(torch.int32), out=dst.view(-1))


# torch implements flips and the fast transpose for few unsigned types: move their bits as the signed type
_SAME_BITS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _d4_into(dst: torch.Tensor, src: torch.Tensor, k: int) -> None:
    """dst := ``d4_apply_torch(src, k)`` materialised once in ``dst`` (contiguous, src's dtype, square planes)."""
    if src.dtype in _SAME_BITS:
        dst, src = dst.view(_SAME_BITS[src.dtype]), src.view(_SAME_BITS[src.dtype])
    flips = [dim for bit, dim in ((1, -2), (2, -1)) if k & bit]
    if not k & 4:
        torch.ops.aten.flip.out(src, flips, out=dst) if flips else dst.copy_(src)
        return
    if flips:
        src = src.flip(flips)
    h, w = src.shape[-2:]
    if h * w < _FAST_TRANSPOSE:
        dst.copy_(src.transpose(-1, -2))
        return
    for d, s in zip(dst.view(-1, h, w), src.reshape(-1, h, w), strict=True):
        d.copy_(s.t())  # plane by plane: the 2-D fast path


# the storage reference count has no public accessor; without it (another torch) nothing is reused
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _HostBuffers:
    """Reused memory for :func:`to_model_batch`'s large CPU outputs. A fresh batch tensor over 32 MiB is mapped
    anew by glibc at every call and pays one page fault per 4 KiB written; on a VM (where the host backs each page
    again) that costs more than the conversion itself. A buffer is handed out again only when nothing else holds
    its memory: the reference count of its storage, which every tensor, view, numpy array and autograd record on it
    raises, is the pool's own. Shared-memory storages are never reused (another process may read them). At most
    ``per_size`` buffers per byte size are kept, for the process's life (FLAIR-HUB, batch 8: <= 192 MB)."""

    def __init__(self, min_bytes: int = 1 << 22, per_size: int = 4):
        self.min_bytes, self.per_size = min_bytes, per_size
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = shape.numel() * dtype.itemsize
        if nbytes < self.min_bytes or _use_count is None:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            kept = self._free.setdefault(nbytes, [])
            for s in kept:
                if _use_count(s._cdata) == 1 and s.nbytes() == nbytes and not s.is_shared():
                    return torch.empty(0, dtype=dtype).set_(s, 0, shape)
            out = torch.empty(shape, dtype=dtype)
            if len(kept) < self.per_size:
                kept.append(out.untyped_storage())
            return out


_BUFFERS = _HostBuffers()


def _host_raster(x: torch.Tensor, elements: list[int] | None, dtype: torch.dtype, table: torch.Tensor | None,
                 divisor: torch.Tensor | None = None) -> torch.Tensor:
    """A CPU raster batch converted to ``dtype`` (or looked up in ``table``; or divided by ``divisor``) with each
    row's D4 element applied, written once into a new tensor. D4 runs in the source dtype (1 byte per pixel for
    uint8) into a scratch plane that stays in cache; the conversion then writes the output plane once. Large planes
    go one by one (the 2-D fast transpose, and the output is not read back for a separate division), small ones a
    row at a time (fewer calls)."""
    out = _BUFFERS.empty(x.shape, dtype)
    ks = elements or [0] * len(x)
    h, w = x.shape[-2:]
    if any(k & 4 for k in ks) and h != w:
        raise ValueError(f"a D4 transpose needs square rasters, got {tuple(x.shape)}")
    planes = h * w >= _FAST_TRANSPOSE
    direct = table is None and divisor is None and x.dtype == dtype  # D4 straight into the output
    scratch = torch.empty((h, w) if planes else x.shape[1:], dtype=x.dtype)
    for i, k in enumerate(ks):
        pairs = zip(x[i].reshape(-1, h, w), out[i].view(-1, h, w), strict=True) if planes else ((x[i], out[i]),)
        for src, dst in pairs:
            if k and direct:
                _d4_into(dst, src, k)
                continue
            if k:
                _d4_into(scratch, src, k)
                src = scratch
            _fill(dst, src, table, divisor)
    return out


def _device_raster(x: torch.Tensor, elements: list[int] | None, dtype: torch.dtype, table: torch.Tensor | None
                   ) -> torch.Tensor:
    """:func:`_host_raster` on an accelerator: one conversion kernel, then D4 in place per group of rows sharing an
    element (few large kernels rather than many plane-sized ones)."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _fill(out, x, table)
    for k in sorted(set(elements or ())):
        if k:
            rows = torch.tensor([i for i, e in enumerate(elements) if e == k], device=x.device)
            out[rows] = d4_apply_torch(out[rows], k)
    return out


def to_model_batch(batch: dict[str, Any], manifest: Manifest, device: torch.device | str,
                   non_blocking: bool = True) -> dict[str, Any]:
    """Move a loader batch to ``device``, normalise integer modalities there, widen segmentation labels to int64
    and apply a pending ``d4``: the result follows ``batch.check_batch`` (the model's contract).

    Integer modalities go through :func:`normalise_` (the arithmetic of :func:`normalise_tensor`). On a CPU
    ``device`` every raster is written once (see :func:`_host_raster`); elsewhere the raw batch is moved first,
    so the host only copies stored bytes. New tensors are returned wherever values change: the caller's batch is
    never modified."""
    device = torch.device(device)
    segmentation = {t.name: t for t in manifest.targets.values() if t.type == "segmentation"}
    d4 = batch.get("d4")
    elements = None if d4 is None else [int(k) for k in d4.reshape(-1).tolist()]  # numpy or torch, any device
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if key == "d4" or not isinstance(value, torch.Tensor):
            if key != "d4":
                out[key] = value
            continue
        spec, target = manifest.modalities.get(key), segmentation.get(key)
        norm = spec is not None and not value.is_floating_point()
        table = _label_table(target, device) if target is not None and value.dtype == torch.uint8 else None
        dtype = torch.float32 if norm else torch.int64 if target is not None else value.dtype
        if spec is None and target is None or (elements is None and dtype == value.dtype):
            out[key] = value.to(device, non_blocking=non_blocking)  # nothing to do: no copy on the same device
            continue
        if device.type == "cpu" and value.device.type == "cpu":
            # without a log, the division happens plane by plane while the plane is in cache (exact either way)
            divisor = torch.full((), spec.norm_factor, dtype=torch.float32) if norm and not spec.log_scale else None
            moved = _host_raster(value, elements, dtype, table, divisor)
            norm = norm and divisor is None
        else:
            moved = _device_raster(value.to(device, non_blocking=non_blocking), elements, dtype, table)
        out[key] = normalise_(moved, spec.log_scale, spec.norm_factor) if norm else moved
    return out
