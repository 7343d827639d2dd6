"""The per-sample transform of the stream and the collation of samples into batches (pure numpy, no I/O).

One *element* of an epoch is (decoded tile, crop index). :class:`SampleTransform` writes it straight into one row of
preallocated batch arrays (:class:`BatchBuffer`), in the official order (model-spec §9): crop first (a view, so the
temporal work only touches the crop) -> per-modality time-step selection on the RAW values of the bands the model
receives (``temporal.select_steps`` judges deviations and NaN on the manifest's ``select`` only, as the official
reader, which selects bands first) -> band selection/reorder (``select``) -> float32, ``log`` where ``log_scale``,
``/ norm_factor`` and the NaN fill of ``temporal.normalise`` (deferred to the device for integer modalities by
default) -> labels (multilabel: fraction > threshold, NaN and ignored classes -> missing_value; segmentation: crop,
ignored classes -> missing_value, in the smallest signed integer dtype holding every label (``label_dtype``: int8
for all four datasets), or with ``normalize_on_device`` (default) the stored uint8 classes, mapped on the device;
``device.to_model_batch`` returns the contract's int64 either way) -> D4 (one element for every raster and
segmentation label of the element; deferred to the device by default: ``batch["d4"]``, see device.py). Big rasters
are copied (or normalised) plane by plane from the decoded sample into the row, with no gathered temporary; batch
memory is recycled (:class:`ArrayPool`) because first-touch page faults cost more than the copies.

Every random choice draws from ``randomness.sample_rng(seed, epoch, key, "<purpose>:<crop>")``: the crop origin,
the temporal offset and time steps per modality, and the D4 element depend only on (seed, epoch, sample key, crop
index), never on the rank, the worker or the order of reading.

NaN rule: integer modalities cannot hold NaN. Float modalities (S1, DEM) are always normalised here, on the host,
with ``temporal.normalise``: NaN/inf that survive the time-step selection become the per-pixel median of the finite
selected steps, else 0. So no NaN reaches the model, whichever side normalises.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from maestro_data.errors import StreamError
from maestro_data.manifest import Manifest, ModalitySpec, TargetSpec
from maestro_data.randomness import sample_rng
from maestro_data.stream.augment import (
    crop_grid,
    crop_window,
    d4_apply,
    eval_crop_origins,
    random_crop_origin,
    random_d4,
)
from maestro_data.stream.temporal import channel_index, fill_nonfinite, normalise, select_steps

BIG_RASTER = 4096  # pixels per step from which a raster is copied plane by plane (no gathered temporary)
POOL_MIN_BYTES = 1 << 18  # batch arrays from which ArrayPool recycles memory


@dataclass(frozen=True)
class TransformOptions:
    mode: str = "train"  # "train" | "eval"
    seed: int = 0
    d4: bool = True
    eval_offset: str = "first"  # "first" (offset 0) | "random" (the official reader draws it even in eval)
    keep_hours: bool = False  # the official reader parses dates at day resolution: hours are zeroed by default
    normalize_on_device: bool = True  # integer modalities stay uint8/uint16/int16; see device.to_model_batch
    d4_on_device: bool = True  # the D4 element travels as batch["d4"] and device.to_model_batch applies it


def option_problems(options: TransformOptions) -> list[str]:
    """What is wrong with ``options`` (empty when valid): THE check of mode and eval_offset, used by
    :class:`SampleTransform` and by the stream's configuration check."""
    problems = []
    if options.mode not in ("train", "eval"):
        problems.append(f"mode {options.mode!r} is not 'train' or 'eval'")
    if options.eval_offset not in ("first", "random"):
        problems.append(f"eval_offset {options.eval_offset!r} is not 'first' or 'random'")
    return problems


def deferred(spec: ModalitySpec, options: TransformOptions) -> bool:
    """Whether ``spec`` leaves the loader in its stored integer dtype (normalised by ``to_model_batch``)."""
    return options.normalize_on_device and np.dtype(spec.dtype).kind in "iu"


def label_dtype(t: TargetSpec) -> np.dtype:
    """The loader's dtype for segmentation target ``t``: the smallest signed integer type holding every training
    label and the missing value (a quarter to an eighth of the contract's int64 bytes through the loader)."""
    lo, hi = min(0, t.missing_value), max(len(t.classes) - 1, t.missing_value)
    return next(np.dtype(d) for d in (np.int8, np.int16, np.int32, np.int64)
                if np.iinfo(d).min <= lo and hi <= np.iinfo(d).max)


def raw_labels(t: TargetSpec, options: TransformOptions) -> bool:
    """Whether segmentation target ``t`` leaves the loader as its stored uint8 class values (mapped to training
    labels by ``device.to_model_batch``): with ``normalize_on_device``, like the integer modalities."""
    return options.normalize_on_device and np.dtype(t.dtype) == np.uint8


def label_table(t: TargetSpec, size: int | None = None) -> np.ndarray:
    """Class value -> training label: ignored classes (and classes >= num_classes, and with ``size`` every
    value up to ``size`` - 1 that is no class) -> missing_value."""
    lut = np.full(max(size or 0, len(t.classes)), t.missing_value, dtype=np.int64)
    lut[:t.num_classes] = np.arange(t.num_classes)
    lut[[i for i in t.ignore if i < t.num_classes]] = t.missing_value
    return lut.astype(label_dtype(t))  # exact: label_dtype holds every value of the table


class SampleTransform:
    """(decoded sample, crop index, epoch) -> {batch key: array} for one batch row."""

    def __init__(self, manifest: Manifest, options: TransformOptions):
        problems = option_problems(options)
        if problems:
            raise StreamError(f"{manifest.name}: invalid transform options: " + "; ".join(problems))
        self.manifest, self.options = manifest, options
        self.train = options.mode == "train"
        self.origins = eval_crop_origins(manifest)
        self.repeats = len(self.origins)
        self.select = {m: (None if s.select == tuple(range(s.stored_channels)) else np.asarray(s.select))
                       for m, s in manifest.modalities.items()}
        # the channels the time-step choice looks at, resolved once (a slice: a view of the crop, no copy)
        self.choice_channels = {m: channel_index(s.stored_channels, s.select) for m, s in manifest.modalities.items()}
        self.deferred = {m: deferred(s, options) for m, s in manifest.modalities.items()}
        self.luts = {t.name: label_table(t) for t in manifest.targets.values() if t.type == "segmentation"}
        # uint8 class rasters (every dataset): one gather through a table of all 256 values
        self.luts8 = {t.name: label_table(t, 256) for t in manifest.targets.values() if t.type == "segmentation"}
        self.raw = {t.name: raw_labels(t, options) for t in manifest.targets.values() if t.type == "segmentation"}
        # eval crops are fixed: their pixel windows are computed once
        self._eval_windows = [self._windows(o) for o in self.origins]
        self.grid = crop_grid(manifest)
        # crop == tile (TreeSat, FLAIR): a single possible origin, no draw needed (its own rng stream: skipping
        # it shifts no other choice)
        self.random_crops = self.grid.max_origin_units > 0
        self._direct = [self._direct_fields(w) for w in self._eval_windows] if not self.random_crops else None
        # re-keyed for every draw (sample_rng's ``reuse``): each use is done before the next is keyed
        self._rng = sample_rng(0, 0, "", "")

    def __getstate__(self) -> dict:  # a Generator pickles, but its state is meaningless in another process
        return {k: v for k, v in self.__dict__.items() if k != "_rng"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._rng = sample_rng(0, 0, "", "")

    def _windows(self, origin: tuple[float, float]) -> dict[str, tuple[int, int, int]]:
        out = {m: crop_window(s, origin) for m, s in self.manifest.modalities.items()}
        out.update({t.name: crop_window(t, origin) for t in self.manifest.targets.values()
                    if t.type == "segmentation"})
        return out

    def _direct_fields(self, windows: dict[str, tuple[int, int, int]]) -> tuple[str, ...]:
        """The fields whose row is their stored member byte for byte when the member has the row's shape: whole
        tile, one step, every channel in order, stored dtype kept (or float32 normalised in place), no host D4. A
        reader may then read those members straight into the row (``direct``); the transform's copy or in-place
        normalisation of a row onto itself gives the same bytes."""
        if self.options.d4 and not self.options.d4_on_device:
            return ()
        out = []
        for m, s in self.manifest.modalities.items():
            r, c, size = windows[m]
            stored = np.dtype(s.dtype)
            # one step per bin and big: the member is the row (else a time series the selection cuts, read
            # directly only to be copied back out)
            if ((r, c, size) == (0, 0, s.tile_size) and size * size >= BIG_RASTER and s.temporal_bins == 1
                    and self.select[m] is None and (self.deferred[m] or stored == np.float32)):
                out.append(m)
        for t in self.manifest.targets.values():
            if (t.type == "segmentation" and self.raw[t.name] and windows[t.name] == (0, 0, t.tile_size)
                    and t.tile_size ** 2 >= BIG_RASTER):
                out.append(t.name)
        return tuple(out)

    def direct_fields(self, crop: int) -> tuple[str, ...]:
        """The fields of element (sample, ``crop``) that may be read straight into its row (see above); none
        with random crops."""
        return self._direct[crop] if self._direct is not None else ()

    def output_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and dtype of every array key (the collation buffers)."""
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for m, s in self.manifest.modalities.items():
            dtype = np.dtype(s.dtype) if self.deferred[m] else np.dtype(np.float32)
            out[m] = ((s.temporal_bins, s.channels, s.image_size, s.image_size), dtype)
            out[f"{m}_dates"] = ((s.temporal_bins, 3), np.dtype(np.int16))
            out[f"{m}_missing"] = ((), np.dtype(bool))
        out["ref_date"] = ((1, 3), np.dtype(np.int16))
        for t in self.manifest.targets.values():
            if t.type == "multilabel":
                out[t.name] = ((t.num_classes,), np.dtype(np.float32))
            else:
                dtype = np.dtype(np.uint8) if self.raw[t.name] else label_dtype(t)
                out[t.name] = ((t.image_size, t.image_size), dtype)
        return out

    def row_bytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.output_spec().values())

    def __call__(self, sample: dict, crop: int, epoch: int, row: dict[str, np.ndarray]) -> int:
        """Write the element into ``row`` (views of one batch row, as ``output_spec``); returns its D4 element,
        which is already applied unless ``d4_on_device``."""
        key = sample["__key__"]
        seed = self.options.seed
        if self.train and self.random_crops:
            windows = self._windows(random_crop_origin(sample_rng(seed, epoch, key, f"crop:{crop}", reuse=self._rng),
                                                       self.grid))
        else:
            windows = self._eval_windows[crop]
        k = random_d4(sample_rng(seed, epoch, key, f"d4:{crop}", reuse=self._rng)) if self.options.d4 else 0
        host_k = 0 if self.options.d4_on_device else k
        for m, spec in self.manifest.modalities.items():
            row[f"{m}_missing"][...] = self._modality(sample, m, spec, windows[m], key, crop, epoch, row, host_k)
        ref = row["ref_date"]
        ref[...] = np.asarray(sample["meta"]["ref_date"], dtype=np.int16).reshape(1, 3)
        if not self.options.keep_hours:
            ref[:, 2] = 0
        for t in self.manifest.targets.values():
            if t.type == "multilabel":
                row[t.name][...] = self._multilabel(sample[t.name], t)
            else:
                r, c, s = windows[t.name]
                self._segmentation(sample[t.name][r:r + s, c:c + s], t, row[t.name], host_k)
        return k

    def _modality(self, sample: dict, m: str, spec: ModalitySpec, window: tuple[int, int, int], key: str,
                  crop: int, epoch: int, row: dict[str, np.ndarray], k: int) -> bool:
        """Write modality ``m`` into ``row``; returns True when the tile has no date for it (neutral row)."""
        r, c, s = window
        data = sample[m][:, :, r:r + s, c:c + s]  # a view: the temporal work only ever sees the crop
        t, bins = data.shape[0], spec.temporal_bins
        dst = row[m]
        if t == 0:  # no date: a row that is 0 after normalisation (log-scale raw 1 -> log 1 = 0), dates 0
            dst[...] = 1 if (spec.log_scale and self.deferred[m]) else 0
            row[f"{m}_dates"][...] = 0
            return True
        if t > bins:
            mask = sample.get(f"{m}_mask")
            if mask is not None:
                mask = mask[:, :, r:r + s, c:c + s]
            threshold = spec.cloud_mask.threshold if spec.cloud_mask else 0.0
            random_offset = self.train or self.options.eval_offset == "random"
            rng = (sample_rng(self.options.seed, epoch, key, f"temporal:{m}:{crop}", reuse=self._rng)
                   if random_offset else None)
            idx = select_steps(data, bins, mask=mask, threshold=threshold, mode=self.options.mode, rng=rng,
                               offset="random" if random_offset else 0, channels=self.choice_channels[m])
        else:  # T <= D: no truncation and no choice (temporal.py: bin d takes step floor(d*T/D))
            idx = select_steps(data, bins, mode="eval")
        dates = row[f"{m}_dates"]
        dates[...] = sample[f"{m}_dates"][idx]
        if not self.options.keep_hours:
            dates[:, 2] = 0
        sel = self.select[m]
        channels = sel if sel is not None else range(spec.stored_channels)
        if s * s >= BIG_RASTER:  # plane by plane into the row: no gathered temporary of a big raster
            for d, step in enumerate(idx.tolist()):
                for j, ch in enumerate(channels):
                    plane = data[step, ch] if k == 0 else d4_apply(data[step, ch], k)
                    if self.deferred[m]:
                        if not _same_memory(plane, dst[d, j]):  # a row read straight from the shard is done
                            dst[d, j] = plane
                    else:  # normalised straight from the sample into the row (one pass per plane)
                        normalise(plane, spec.log_scale, spec.norm_factor, fill=False, out=dst[d, j])
            if not self.deferred[m]:
                fill_nonfinite(dst, out=dst)
            return False
        x = data[idx] if sel is None else data[idx[:, None], sel[None, :]]
        if self.deferred[m]:
            dst[...] = d4_apply(x, k)
        elif k == 0:
            normalise(x, spec.log_scale, spec.norm_factor, out=dst)
        else:
            dst[...] = d4_apply(normalise(x, spec.log_scale, spec.norm_factor), k)
        return False

    @staticmethod
    def _multilabel(fractions: np.ndarray, t: TargetSpec) -> np.ndarray:
        # compared in float32, the stored precision: a CSV fraction of exactly 0.07 stays "not > 0.07"
        f = np.asarray(fractions, dtype=np.float32)[:t.num_classes]
        out = (f > np.float32(t.threshold)).astype(np.float32)
        out[np.isnan(f)] = t.missing_value
        out[[i for i in t.ignore if i < t.num_classes]] = t.missing_value
        return out

    def _segmentation(self, labels: np.ndarray, t: TargetSpec, dst: np.ndarray, k: int) -> None:
        """Class raster -> training labels (ignored classes -> missing_value) written into ``dst``
        (``label_dtype(t)``), or with ``raw_labels`` the stored class values copied into ``dst`` (uint8)."""
        if self.raw[t.name]:
            if labels.dtype != np.uint8:
                raise StreamError(f"target {t.name!r}: {labels.dtype} labels, the manifest declares uint8")
            if k or not _same_memory(labels, dst):  # a row read straight from the shard is done
                dst[...] = d4_apply(labels, k) if k else labels
            return
        if labels.dtype == np.uint8:  # the hot case: one gather of the raster through a 256-entry table
            np.take(self.luts8[t.name], d4_apply(labels, k) if k else labels, out=dst, mode="clip")
            return
        lut = self.luts[t.name]
        v = labels.astype(np.int64)
        inside = (v >= 0) & (v < len(lut))
        mapped = np.where(inside, lut[np.clip(v, 0, len(lut) - 1)], t.missing_value)
        dst[...] = d4_apply(mapped, k)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory (copying one onto the other is a no-op
    that still costs a pass over a raster)."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides and a.dtype == b.dtype)


class ArrayPool:
    """Recycles the memory of batch arrays once nothing refers to them any more (the consumer dropped the batch):
    writing into fresh pages costs a page fault and a kernel zeroing per page, ~0.1 ms per MB, more than the pixel
    work of an aerial or DEM raster. (Loader workers recycle shared memory instead: ``slots.SlotPool``.)

    ``empty`` hands out a view of a pooled base array; when the view (and every tensor made from it) is gone, a
    finalizer returns the base, so reuse never races a live batch. At most ``keep`` free bases per
    (shape, dtype) are kept; the pool is not pickled."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._free: dict[tuple, list[np.ndarray]] = {}

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if math.prod(shape) * np.dtype(dtype).itemsize < POOL_MIN_BYTES:  # small: malloc reuses its memory anyway
            return np.empty(shape, dtype)
        key = (tuple(shape), np.dtype(dtype).str)
        free = self._free.get(key)
        base = free.pop() if free else np.empty(shape, dtype)
        view = base[...]
        weakref.finalize(view, self._release, key, base)
        return view

    def _release(self, key: tuple, base: np.ndarray) -> None:
        free = self._free.setdefault(key, [])
        if len(free) < self.keep:
            free.append(base)

    def __getstate__(self) -> dict:
        return {"keep": self.keep, "_free": {}}


def batch_shapes(spec: dict[str, tuple[tuple[int, ...], np.dtype]], size: int,
                 d4_key: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of a batch of ``size`` rows of ``spec`` (``SampleTransform.output_spec``),
    with the loader's ``valid``, ``crop_index`` and, when ``d4_key``, ``d4``."""
    out = {k: ((size, *shape), np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
    out["valid"] = ((size,), np.dtype(bool))
    out["crop_index"] = ((size,), np.dtype(np.int64))
    if d4_key:
        out["d4"] = ((size,), np.dtype(np.int64))
    return out


class BatchBuffer:
    """Preallocated arrays of one batch; rows are written in place, unused rows are padding (``valid`` False,
    zeros, ``crop_index`` -1, ``d4`` 0) once ``as_dict`` hands the batch over.

    The arrays are allocated uninitialised: a filled row writes every element of its row (``SampleTransform``),
    so only the rows left unfilled are zeroed, in ``as_dict`` (zeroing whole batches cost a pass over ~3 MB per
    FLAIR-HUB row). With a ``pool`` the arrays reuse the memory of released batches; ``arrays`` (every key of
    ``batch_shapes``, e.g. a loader worker's shared-memory slot) are written over whatever they held."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], np.dtype]], size: int, d4_key: bool,
                 pool: ArrayPool | None = None, arrays: dict[str, np.ndarray] | None = None):
        if arrays is None:
            empty = pool.empty if pool is not None else np.empty
            arrays = {k: empty(shape, dtype) for k, (shape, dtype) in batch_shapes(spec, size, d4_key).items()}
        self.arrays = arrays
        arrays["valid"][...] = False
        arrays["crop_index"][...] = -1
        if d4_key:
            arrays["d4"][...] = 0
        self.tile_id = [""] * size

    def fill(self, i: int, transform: SampleTransform, sample: dict, crop: int, epoch: int, tile_id: str) -> None:
        """Row ``i`` := the element (sample, crop); a failing element leaves the row as padding."""
        row = {k: v[i, ...] for k, v in self.arrays.items()}  # views, also for 1-D arrays (0-d views)
        try:
            k = transform(sample, crop, epoch, row)
        except BaseException:
            for v in row.values():
                v[...] = 0
            self.arrays["crop_index"][i] = -1
            raise
        if "d4" in self.arrays:
            self.arrays["d4"][i] = k
        self.arrays["valid"][i] = True
        self.arrays["crop_index"][i] = crop
        self.tile_id[i] = tile_id

    def as_dict(self) -> dict:
        """The batch: every array, with the rows that hold no element zeroed (padding), and ``tile_id``."""
        unfilled = np.flatnonzero(~self.arrays["valid"])
        if len(unfilled):
            for key, v in self.arrays.items():
                v[unfilled] = -1 if key == "crop_index" else 0
        return {**self.arrays, "tile_id": self.tile_id}
