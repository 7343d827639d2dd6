"""The per-sample transform of the stream and the collation of samples into batches (pure numpy, no I/O).

One *element* of an epoch is (decoded tile, crop index). :class:`SampleTransform` writes it straight into one row
of preallocated batch arrays (:class:`BatchBuffer`), in the official order (model-spec §9): crop first (a view, so
the temporal work only touches the crop) -> per-modality time-step selection on the RAW values
(``temporal.select_steps``) -> band selection/reorder (``select``) -> float32, ``log`` where ``log_scale``,
``/ norm_factor`` and the NaN fill of ``temporal.normalise`` (deferred to the device for integer modalities by
default) -> labels (multilabel: fraction > threshold, NaN and ignored classes -> missing_value; segmentation: crop,
ignored classes -> missing_value, int64) -> D4 (one element for every raster and segmentation label of the element;
deferred to the device by default: ``batch["d4"]``, see device.py). Big rasters are copied plane by plane from the
decoded sample into the row, with no gathered temporary.

Every random choice draws from ``randomness.sample_rng(seed, epoch, key, "<purpose>:<crop>")``: the crop origin,
the temporal offset and time steps per modality, and the D4 element depend only on (seed, epoch, sample key, crop
index), never on the rank, the worker or the order of reading.

NaN rule: integer modalities cannot hold NaN. Float modalities (S1, DEM) are always normalised here, on the host,
with ``temporal.normalise``: NaN/inf that survive the time-step selection become the per-pixel median of the finite
selected steps, else 0. So no NaN reaches the model, whichever side normalises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maestro_data.augment import crop_grid, crop_window, d4_apply, eval_crop_origins, random_crop_origin, random_d4
from maestro_data.errors import StreamError
from maestro_data.manifest import Manifest, ModalitySpec, TargetSpec
from maestro_data.randomness import sample_rng
from maestro_data.temporal import LOG_FLOOR, fill_nonfinite, normalise, select_steps

SEG_DTYPE = np.int64  # the batch contract's segmentation dtype, written directly by the label look-up table
BIG_RASTER = 4096  # pixels per step from which a raster is copied plane by plane (no gathered temporary)


@dataclass(frozen=True)
class TransformOptions:
    mode: str = "train"  # "train" | "eval"
    seed: int = 0
    d4: bool = True
    eval_offset: str = "first"  # "first" (offset 0) | "random" (the official reader draws it even in eval)
    keep_hours: bool = False  # the official reader parses dates at day resolution: hours are zeroed by default
    normalize_on_device: bool = True  # integer modalities stay uint8/uint16/int16; see device.to_model_batch
    d4_on_device: bool = True  # the D4 element travels as batch["d4"] and device.to_model_batch applies it


def deferred(spec: ModalitySpec, options: TransformOptions) -> bool:
    """Whether ``spec`` leaves the loader in its stored integer dtype (normalised by ``to_model_batch``)."""
    return options.normalize_on_device and np.dtype(spec.dtype).kind in "iu"


def _label_lut(t: TargetSpec) -> np.ndarray:
    """Class value -> training label: ignored classes (and classes >= num_classes) -> missing_value."""
    lut = np.arange(len(t.classes), dtype=np.int64)
    lut[list(t.ignore)] = t.missing_value
    lut[t.num_classes:] = t.missing_value  # the manifest guarantees these are ignored or the missing value
    return lut.astype(SEG_DTYPE)


def normalise_in_place(x: np.ndarray, log_scale: bool, norm_factor: float) -> None:
    """``temporal.normalise`` on a float32 array in place, operation for operation (tested equal): log floor,
    ``log``, division by the float32 factor, then ``fill_nonfinite`` only where something is not finite."""
    if log_scale:
        np.maximum(x, np.float32(LOG_FLOOR), out=x)
        np.log(x, out=x)
    x /= np.float32(norm_factor)
    if not np.isfinite(x).all():
        x[...] = fill_nonfinite(x)


class SampleTransform:
    """(decoded sample, crop index, epoch) -> {batch key: array} for one batch row."""

    def __init__(self, manifest: Manifest, options: TransformOptions):
        if options.mode not in ("train", "eval"):
            raise StreamError(f"mode must be 'train' or 'eval', got {options.mode!r}")
        if options.eval_offset not in ("first", "random"):
            raise StreamError(f"eval_offset must be 'first' or 'random', got {options.eval_offset!r}")
        self.manifest, self.options = manifest, options
        self.train = options.mode == "train"
        self.origins = eval_crop_origins(manifest)
        self.repeats = len(self.origins)
        self.select = {m: (None if s.select == tuple(range(s.stored_channels)) else np.asarray(s.select))
                       for m, s in manifest.modalities.items()}
        self.deferred = {m: deferred(s, options) for m, s in manifest.modalities.items()}
        self.luts = {t.name: _label_lut(t) for t in manifest.targets.values() if t.type == "segmentation"}
        # uint8 value -> "is not its own label" (the look-up table only ever maps a class to itself or to missing)
        self.ignored = {n: np.concatenate([lut != np.arange(len(lut)), np.ones(256 - len(lut), bool)])
                        for n, lut in self.luts.items()}
        # eval crops are fixed: their pixel windows are computed once
        self._eval_windows = [self._windows(o) for o in self.origins]
        # crop == tile (TreeSat, FLAIR): a single possible origin, no draw needed (its own rng stream: skipping
        # it shifts no other choice)
        self.random_crops = crop_grid(manifest).max_origin_units > 0

    def _windows(self, origin: tuple[float, float]) -> dict[str, tuple[int, int, int]]:
        out = {m: crop_window(s, origin) for m, s in self.manifest.modalities.items()}
        out.update({t.name: crop_window(t, origin) for t in self.manifest.targets.values()
                    if t.type == "segmentation"})
        return out

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
                out[t.name] = ((t.image_size, t.image_size), np.dtype(SEG_DTYPE))
        return out

    def row_bytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.output_spec().values())

    def __call__(self, sample: dict, crop: int, epoch: int, row: dict[str, np.ndarray]) -> int:
        """Write the element into ``row`` (views of one batch row, as ``output_spec``); returns its D4 element,
        which is already applied unless ``d4_on_device``."""
        key = sample["__key__"]
        seed = self.options.seed
        if self.train and self.random_crops:
            windows = self._windows(random_crop_origin(sample_rng(seed, epoch, key, f"crop:{crop}"), self.manifest))
        else:
            windows = self._eval_windows[crop]
        k = random_d4(sample_rng(seed, epoch, key, f"d4:{crop}")) if self.options.d4 else 0
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
            rng = sample_rng(self.options.seed, epoch, key, f"temporal:{m}:{crop}") if random_offset else None
            idx = select_steps(data, bins, mask=mask, threshold=threshold, mode=self.options.mode, rng=rng,
                               offset="random" if random_offset else 0)
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
                    dst[d, j] = d4_apply(data[step, ch], k)
            if not self.deferred[m]:
                normalise_in_place(dst, spec.log_scale, spec.norm_factor)
            return False
        x = data[idx] if sel is None else data[idx[:, None], sel[None, :]]
        if not self.deferred[m]:
            x = normalise(x, spec.log_scale, spec.norm_factor)
        dst[...] = d4_apply(x, k)
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
        """Class raster -> training labels (ignored classes -> missing_value) written into ``dst`` (int64)."""
        lut = self.luts[t.name]
        if labels.dtype == np.uint8 and k == 0:  # the hot case: a cast, then only the ignored pixels rewritten
            dst[...] = labels
            bad = np.take(self.ignored[t.name], labels)
            if bad.any():
                dst[bad] = t.missing_value
            return
        v = labels.astype(np.int64)
        inside = (v >= 0) & (v < len(lut))
        mapped = np.where(inside, lut[np.clip(v, 0, len(lut) - 1)], t.missing_value)
        dst[...] = d4_apply(mapped, k)


class BatchBuffer:
    """Preallocated arrays of one batch; rows are written in place, unused rows stay padding (``valid`` False,
    zeros, ``crop_index`` -1, ``d4`` 0)."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], np.dtype]], size: int, d4_key: bool):
        self.arrays = {k: np.zeros((size, *shape), dtype) for k, (shape, dtype) in spec.items()}
        self.arrays["valid"] = np.zeros(size, bool)
        self.arrays["crop_index"] = np.full(size, -1, np.int64)
        if d4_key:
            self.arrays["d4"] = np.zeros(size, np.int64)
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
        return {**self.arrays, "tile_id": self.tile_id}
