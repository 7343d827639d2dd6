"""Official temporal binning and time-step selection on one modality of one (already cropped) sample.

Semantics of the official reader (``maestro/dataset/dataset.py::preprocess_raster``, model-spec §9):

* ``T == D``: identity, no masking, no selection.
* ``T > D``: keep ``D·⌊T/D⌋`` consecutive steps from ``offset`` in ``[0, T mod D]`` and cut them into D bins of
  ``S = ⌊T/D⌋`` steps. A pixel of a step is *masked* where any mask channel exceeds the threshold; a bin in which
  every step has a masked pixel ignores the mask. Masked pixels become NaN (data NaN stay NaN). A step is *valid*
  when it then holds no NaN. Eval: the valid step with the lowest mean absolute deviation to the bin's per-pixel
  nanmedian (over every non-NaN value of the bin, as the official code), lowest index on ties. Train: a
  uniformly random valid step. Selection runs on the RAW stored values of exactly the channels the model
  receives, in the manifest's ``select`` order (the official reader keeps the configured bands first: PASTIS-HD
  S1 is judged on VV and VH, never on its stored VV/VH ratio); ``normalise`` comes after. Arithmetic is float32
  for the stored dtypes (exact for integer data; the official precision for float32 data), with the deviations
  summed in float64.
* The paper writes ``⌈T/D⌉`` steps per bin, which cannot fit in T steps; no paper variant is offered.

Our definitions where the official code crashes or lets NaN through:

* No valid step in a bin (every step NaN somewhere; the official ``nanargmin`` raises): the candidates are the
  steps with the FEWEST NaN values; eval ranks them by the mean absolute deviation over their non-NaN values,
  train draws uniformly among them. With at least one valid step this is exactly the official rule.
* ``0 < T < D``: bin ``d`` takes step ``⌊d·T/D⌋`` (every step used, in order, some repeated); no masking.
* ``T == 0``: the selection is empty; the caller fills zeros and marks the modality missing.
* NaN (and ±inf) that survive (``T <= D``, or a bin without valid step) are filled by ``fill_nonfinite`` inside
  ``normalise``: per pixel and channel the median of the finite selected steps, then 0 (after log and division).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from maestro_data.errors import StreamError

Mode = Literal["train", "eval"]
LOG_FLOOR = 1e-10
_NETWORK_MAX_STEPS = 8


def max_offset(num_steps: int, bins: int) -> int:
    """Largest truncation offset, ``T mod D`` (0 when ``T <= D``: nothing is truncated)."""
    return num_steps % bins if num_steps > bins else 0


def resolve_offset(num_steps: int, bins: int, mode: Mode, rng: np.random.Generator | None,
                   offset: int | Literal["random"] | None = None) -> int:
    """The truncation offset: an int is checked; ``"random"`` draws uniformly in ``[0, T mod D]``;
    ``None`` means the mode's default (train: random, eval: 0). The official reader draws even in eval."""
    top = max_offset(num_steps, bins)
    if offset is None:
        offset = "random" if mode == "train" else 0
    if offset == "random":
        if rng is None:
            raise StreamError("a random temporal offset needs a numpy Generator (rng=None given)")
        # Drawn even when top == 0 so that the generator's consumption never depends on T.
        return int(rng.integers(0, top + 1))
    if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or not 0 <= offset <= top:
        raise StreamError(f"temporal offset must be an integer in [0, {top}] for T={num_steps}, D={bins}; "
                          f"got {offset!r}")
    return int(offset)


def bin_indices(num_steps: int, bins: int, offset: int = 0) -> np.ndarray:
    """Raw step indices ``(D, S)`` of the D bins of ``S = ⌊T/D⌋`` consecutive steps starting at ``offset``."""
    steps = num_steps // bins
    if steps < 1 or not 0 <= offset <= num_steps - bins * steps:
        raise StreamError(f"cannot cut T={num_steps} steps into {bins} bins from offset {offset}")
    return offset + np.arange(bins * steps, dtype=np.int64).reshape(bins, steps)


def _sort_steps(v: np.ndarray) -> np.ndarray:
    """``v`` (S, ...) sorted along axis 0. Few steps: an odd-even transposition network of in-place whole-row
    min/max (numpy's per-row sort overhead dominates for thousands of short rows); many steps: ``np.sort``."""
    if v.shape[0] > _NETWORK_MAX_STEPS or v.shape[0] < 2:
        return np.sort(v, axis=0)
    rows, spare = list(v.copy()), np.empty_like(v[0])
    for rnd in range(len(rows)):
        for i in range(rnd % 2, len(rows) - 1, 2):
            low, high = rows[i], rows[i + 1]
            np.minimum(low, high, out=spare)
            np.maximum(low, high, out=high)
            rows[i], spare = spare, low
    return np.stack(rows)


def nanmedian_steps(x: np.ndarray) -> np.ndarray:
    """``np.nanmedian(x, axis=0)`` for float ``x`` (S, ...): median of the non-NaN values, NaN where none;
    computed in ``x``'s dtype, as numpy does."""
    s = x.shape[0]
    nan = np.isnan(x)
    if not nan.any():
        ordered = _sort_steps(x)
        med = ordered[(s - 1) // 2] + ordered[s // 2]
        med /= 2
        return med
    n = s - nan.sum(axis=0, dtype=np.int32)
    ordered = _sort_steps(np.where(nan, np.inf, x))  # NaN (as +inf) sort last
    lo_pos, hi_pos = (np.maximum(n, 1) - 1) >> 1, np.maximum(n, 1) >> 1
    if s <= _NETWORK_MAX_STEPS:  # a few masked copies beat fancy indexing for few steps
        lo, hi = ordered[0].copy(), ordered[0].copy()
        for k in range(1, s // 2 + 1):
            np.copyto(lo, ordered[k], where=lo_pos == k)
            np.copyto(hi, ordered[k], where=hi_pos == k)
    else:
        lo = np.take_along_axis(ordered, lo_pos[None], axis=0)[0]
        hi = np.take_along_axis(ordered, hi_pos[None], axis=0)[0]
    med = lo + hi
    med /= 2
    med[n == 0] = np.nan
    return med


def work_dtype(dtype: np.dtype) -> type[np.floating]:
    """float32 where it holds every value exactly (the stored dtypes: uint8, uint16, int16, float32; integer
    medians are then exact halves), float64 otherwise. The official reader also works in float32 there."""
    dtype = np.dtype(dtype)
    exact32 = (dtype.kind in "ui" and dtype.itemsize <= 2) or (dtype.kind == "f" and dtype.itemsize <= 4)
    return np.float32 if exact32 or dtype.kind == "b" else np.float64


Channels = slice | np.ndarray  # which stored channels the selection looks at (see channel_index)


def channel_index(num_channels: int, channels: Sequence[int] | np.ndarray | slice | None) -> Channels:
    """``channels`` (the manifest's ``select``) as a slice when it is an evenly spaced ascending run, so that the
    selection reads a view of the series (no copy), else as an index array (any order). None: every channel;
    a slice is taken as already resolved."""
    if channels is None:
        return slice(None)
    if isinstance(channels, slice):
        return channels
    ch = np.asarray(channels, dtype=np.int64).reshape(-1)
    if ch.size == 0 or ch.min() < 0 or ch.max() >= num_channels:
        raise StreamError(f"channels {ch.tolist()} must be a non-empty list of indices into {num_channels} "
                          "stored channels")
    step = int(ch[1] - ch[0]) if ch.size > 1 else 1
    if step > 0 and np.array_equal(ch, ch[0] + step * np.arange(ch.size)):
        return slice(int(ch[0]), int(ch[-1]) + 1, step)
    return ch


def _masked_steps(data: np.ndarray, mask: np.ndarray | None, threshold: float, idx: np.ndarray,
                  channels: Channels = slice(None)) -> np.ndarray:
    """The bins as float ``(S, D, C, H, W)`` (steps first, only ``channels``, in their order) with masked pixels
    set to NaN (official rule)."""
    # one gather of the chosen steps (and, for an index array, channels): a private copy, cast without another
    x = data[:, channels][idx.T] if isinstance(channels, slice) else data[idx.T[:, :, None], channels]
    x = x.astype(work_dtype(data.dtype), copy=False)
    if mask is not None:
        cloudy = (mask[idx.T] > threshold).any(axis=2)  # (S, D, H, W): any mask channel
        every_step_cloudy = cloudy.any(axis=(2, 3)).all(axis=0)  # (D,)
        cloudy &= ~every_step_cloudy[None, :, None, None]
        x[np.broadcast_to(cloudy[:, :, None], x.shape)] = np.nan
    return x


def _nan_counts(data: np.ndarray, mask: np.ndarray | None, threshold: float, idx: np.ndarray,
                channels: Channels = slice(None)) -> np.ndarray:
    """``np.isnan(_masked_steps(..., channels)).sum(axis=(2, 3, 4)).T`` (D, S), from per-step counts on the raw
    series: the NaN of a step are its data NaN united with its masked pixels (on every chosen channel)."""
    pick = None
    if isinstance(channels, slice):
        data = data[:, channels]  # a view: NaN are only looked for in the chosen channels
    else:
        pick = channels  # counted per channel, then summed over the chosen ones
    t = data.shape[0]
    c = data.shape[1] if pick is None else len(pick)

    def per_step(bad: np.ndarray) -> np.ndarray:  # (T, C, H, W) bool -> (T,) over the chosen channels
        return bad.sum(axis=(1, 2, 3)) if pick is None else bad.sum(axis=(2, 3))[:, pick].sum(axis=1)

    data_nan = np.isnan(data) if data.dtype.kind == "f" else None
    if mask is None:
        per = np.zeros(t, np.int64) if data_nan is None else per_step(data_nan)
        return per[idx]
    cloudy = (mask > threshold).any(axis=1)  # (T, H, W)
    if data_nan is None:
        masked = c * cloudy.sum(axis=(1, 2))
        clear = np.zeros(t, np.int64)
    else:
        masked = per_step(data_nan | cloudy[:, None])
        clear = per_step(data_nan)
    every_step_cloudy = cloudy.any(axis=(1, 2))[idx].all(axis=1)  # (D,): the bin ignores its mask
    return np.where(every_step_cloudy[:, None], clear[idx], masked[idx])


def _check_inputs(data: np.ndarray, mask: np.ndarray | None, bins: int) -> None:
    if data.ndim != 4:
        raise StreamError(f"temporal data must be (T, C, H, W), got shape {data.shape}")
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise StreamError(f"the number of temporal bins must be a positive integer, got {bins!r}")
    if mask is not None and (mask.ndim != 4 or mask.shape[0] != data.shape[0] or mask.shape[2:] != data.shape[2:]):
        raise StreamError(f"mask of shape {mask.shape} does not match data of shape {data.shape} "
                          "(expected (T, C_mask, H, W) with the same T, H, W)")


def select_steps(data: np.ndarray, bins: int, *, mask: np.ndarray | None = None, threshold: float = 0.0,
                 mode: Mode = "eval", rng: np.random.Generator | None = None,
                 offset: int | Literal["random"] | None = None,
                 channels: Sequence[int] | np.ndarray | slice | None = None) -> np.ndarray:
    """Raw time index chosen for each of the ``bins`` bins: int64 ``(D,)``, or ``(0,)`` when ``T == 0``.

    ``data`` is ``(T, C, H, W)`` in its stored dtype, ``mask`` ``(T, C_mask, H, W)`` probabilities compared
    with ``> threshold``. ``channels``: the stored channels the model receives (the manifest's ``select``);
    deviations and NaN are judged on those only (None: every channel). ``rng`` is needed in train mode and for
    ``offset="random"``. For ``T > D`` a train selection draws one offset (unless fixed) then D uniforms,
    whatever the values, masks and channels.
    """
    _check_inputs(data, mask, bins)
    ch = channel_index(data.shape[1], channels)
    if mode not in ("train", "eval"):
        raise StreamError(f"mode must be 'train' or 'eval', got {mode!r}")
    if mode == "train" and rng is None:
        raise StreamError("train-mode time-step selection needs a numpy Generator (rng=None given)")
    t = data.shape[0]
    if t == 0:
        return np.zeros(0, dtype=np.int64)
    if t <= bins:
        if offset not in (None, "random", 0):
            raise StreamError(f"temporal offset {offset!r} given but T={t} <= D={bins} leaves nothing to truncate")
        return (np.arange(bins, dtype=np.int64) * t) // bins
    idx = bin_indices(t, bins, resolve_offset(t, bins, mode, rng, offset))
    rows = np.arange(bins)
    if mode == "train":  # only the NaN counts matter: counted on the raw steps, no float copy of the bins
        nan_count = _nan_counts(data, mask, threshold, idx, ch)
        candidate = nan_count == nan_count.min(axis=1, keepdims=True)
        u = rng.random(bins)
        n_cand = candidate.sum(axis=1)
        k = np.minimum((u * n_cand).astype(np.int64), n_cand - 1)
        pick = np.argmax(np.cumsum(candidate, axis=1) > k[:, None], axis=1)  # the (k+1)-th candidate
        return idx[rows, pick]
    x = _masked_steps(data, mask, threshold, idx, ch)
    nan_count = np.isnan(x).sum(axis=(2, 3, 4)).T  # (D, S)
    candidate = nan_count == nan_count.min(axis=1, keepdims=True)
    dev = x - nanmedian_steps(x)[None]
    np.abs(dev, out=dev)
    seen = ~np.isnan(dev)
    dev[~seen] = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mad = (dev.sum(axis=(2, 3, 4), dtype=np.float64) / seen.sum(axis=(2, 3, 4))).T  # (D, S)
    mad = np.where(np.isnan(mad), np.finfo(np.float64).max, mad)  # a candidate with no value ranks last
    mad = np.where(candidate, mad, np.inf)
    return idx[rows, np.argmin(mad, axis=1)]


def apply_selection(data: np.ndarray, dates: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data[idx]`` and ``dates[idx]`` (the dates follow the chosen steps); raw dtype kept."""
    if dates.shape[0] != data.shape[0]:
        raise StreamError(f"{dates.shape[0]} dates for {data.shape[0]} time steps")
    return data[idx], dates[idx]


def fill_nonfinite(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Replace NaN/±inf of ``(D, C, H, W)`` float by the per-pixel, per-channel median of the finite steps,
    then by 0 where no step is finite. Returns ``x`` itself when it is all finite; with ``out`` (may be ``x``)
    the result is written there."""
    if np.isfinite(x).all():  # the common case: one pass, no temporary of x's size kept
        if out is not None and out is not x:
            out[...] = x
        return x if out is None else out
    bad = ~np.isfinite(x)
    clean = np.where(bad, np.nan, x)
    with np.errstate(invalid="ignore"):
        fill = nanmedian_steps(clean)  # (C, H, W)
    fill = np.where(np.isnan(fill), 0.0, fill).astype(x.dtype)
    if out is None:
        return np.where(bad, fill[None], x)
    np.copyto(out, x)
    np.copyto(out, np.broadcast_to(fill[None], x.shape), where=bad)
    return out


def normalise(x: np.ndarray, log_scale: bool, norm_factor: float, *, fill: bool = True,
              out: np.ndarray | None = None) -> np.ndarray:
    """Official order: float32, ``log(max(x, 1e-10))`` when ``log_scale``, then ``/ norm_factor``; then
    (``fill=True``) non-finite values filled by ``fill_nonfinite`` so that no NaN reaches the model.

    ``out``: a float32 array of ``x``'s shape (e.g. a batch row) written in place and returned, with no
    temporary of ``x``'s size; ``x`` may be any strided view. Same arithmetic, bit for bit (tested)."""
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != x.shape:
        raise StreamError(f"normalise: out must be float32 {x.shape}, got {out.dtype}{out.shape}")
    # every step is a float32 ufunc with its result in ``out``: integer inputs are cast exactly (<= 16 bits)
    if log_scale:
        np.maximum(x, np.float32(LOG_FLOOR), out=out, dtype=np.float32)
        np.log(out, out=out)
        np.divide(out, np.float32(norm_factor), out=out)
    else:
        np.divide(x, np.float32(norm_factor), out=out, dtype=np.float32)
    if fill:
        fill_nonfinite(out, out=out)
    return out
