"""Temporal binning and time-step selection on hand-made series (official semantics + our documented edges)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maestro_data.errors import StreamError
from maestro_data.randomness import sample_rng
from maestro_data.stream.temporal import (
    apply_selection,
    bin_indices,
    fill_nonfinite,
    max_offset,
    nanmedian_steps,
    normalise,
    resolve_offset,
    select_steps,
    work_dtype,
)


def series(values, h: int = 2, w: int = 2, c: int = 1, dtype=np.uint16) -> np.ndarray:
    """(T, C, H, W) where step t is the constant ``values[t]``."""
    v = np.asarray(values, dtype=np.float64)
    return np.broadcast_to(v[:, None, None, None], (len(v), c, h, w)).astype(dtype)


def clouds(flags, h: int = 2, w: int = 2) -> np.ndarray:
    """(T, 2, H, W) masks: step t has cloud probability 50 at pixel (0, 0) of channel 1 when flagged."""
    m = np.zeros((len(flags), 2, h, w), dtype=np.uint8)
    m[np.asarray(flags, dtype=bool), 1, 0, 0] = 50
    return m


def test_eval_picks_step_closest_to_bin_median():
    # bins of 3: [0, 10, 11] -> median 10 -> step 1; [7, 3, 5] -> median 5 -> step 5
    idx = select_steps(series([0, 10, 11, 7, 3, 5]), 2, mode="eval")
    assert idx.tolist() == [1, 5]


def test_eval_ties_go_to_lowest_index():
    # [4, 6] median 5: both steps deviate by 1 -> the first
    assert select_steps(series([4, 6, 6, 4]), 2, mode="eval").tolist() == [0, 2]


def test_identity_when_t_equals_d_even_if_cloudy_or_nan():
    data = series([1, 2, 3], dtype=np.float32)
    data[1, 0, 0, 0] = np.nan
    idx = select_steps(data, 3, mask=clouds([1, 1, 1]), mode="eval")
    assert idx.tolist() == [0, 1, 2]


def test_cloudy_step_is_skipped_and_dates_follow():
    data = series([10, 0, 11, 12])  # D=1: median 10.5 -> step 0 (or 2) is best, 1 worst
    dates = np.array([[2019, d, 0] for d in (5, 10, 15, 20)], dtype=np.int16)
    idx = select_steps(data, 1, mask=clouds([1, 0, 0, 0]), threshold=0.0, mode="eval")
    # steps 1, 2, 3 are clear; their values at pixel (0,0) plus step 0's unmasked pixels enter the median
    x, d = apply_selection(data, dates, idx)
    assert idx.tolist() == [2]
    assert x.shape == (1, 1, 2, 2) and d.tolist() == [[2019, 15, 0]]


def test_mask_at_threshold_is_not_cloudy():
    data = series([0, 10, 11])
    mask = clouds([0, 1, 0])
    mask[1, 1, 0, 0] = 30
    assert select_steps(data, 1, mask=mask, threshold=30.0).tolist() == [1]
    assert select_steps(data, 1, mask=mask, threshold=29.0).tolist() == [2]


def test_mask_ignored_for_a_bin_where_every_step_is_cloudy():
    data = series([0, 10, 11, 7, 3, 5])
    mask = clouds([1, 1, 1, 0, 1, 0])  # bin 0 all cloudy -> mask ignored there; bin 1: steps 3, 5 clear
    assert select_steps(data, 2, mask=mask).tolist() == [1, 5]
    # bin 1: step 5 clouded too -> only step 3 is valid
    mask = clouds([1, 1, 1, 0, 1, 1])
    assert select_steps(data, 2, mask=mask).tolist() == [1, 3]


def test_median_uses_unmasked_pixels_of_cloudy_steps_as_the_official_code():
    # 1 bin of 3 steps, 4 pixels; step 0 is cloudy at pixel (0,0) only.
    data = np.zeros((3, 1, 2, 2), dtype=np.float32)
    data[0] = 100.0
    data[2] = 1.0
    mask = clouds([1, 0, 0])
    # per-pixel nanmedian: (0,0) -> median(0, 1) = 0.5; others -> median(100, 0, 1) = 1
    # MAD step 1 = (0.5 + 1 + 1 + 1) / 4, step 2 = (0.5 + 0 + 0 + 0) / 4 -> step 2
    # (a median over the clear steps only would tie at 0.5 and pick step 1)
    assert select_steps(data, 1, mask=mask).tolist() == [2]


def test_nan_step_never_picked_in_eval_or_train():
    data = series([10, 0, 12, 9, 30], dtype=np.float32)
    data[0, 0, 1, 1] = np.nan  # step 0 would be the median step; without it step 3 (9) is closest
    assert select_steps(data, 1).tolist() == [3]
    picks = {int(select_steps(data, 1, mode="train", rng=sample_rng(0, 0, f"k{i}"))[0]) for i in range(200)}
    assert picks == {1, 2, 3, 4}


def test_bin_without_nan_free_step_takes_fewest_nans_and_fill_removes_them():
    data = series([1, 2, 3, 50], dtype=np.float32)
    data[:, 0, 0, 0] = np.nan  # pixel (0,0) missing everywhere: the official nanargmin would raise
    data[3, 0, 0, 1] = np.nan  # step 3 has one more NaN
    idx = select_steps(data, 1)
    # candidates 0, 1, 2 (one NaN each); medians 2 at (0,1), 2.5 at row 1 -> step 1 (value 2) deviates least
    assert idx.tolist() == [1]
    for k in range(50):
        assert int(select_steps(data, 1, mode="train", rng=sample_rng(1, 0, str(k)))[0]) in (0, 1, 2)
    out = normalise(data[idx], log_scale=False, norm_factor=2.0)
    assert np.isfinite(out).all() and out[0, 0, 0, 0] == 0.0 and out[0, 0, 1, 1] == 1.0


def test_truncation_offsets():
    assert max_offset(7, 2) == 1 and max_offset(8, 2) == 0 and max_offset(3, 8) == 0
    assert bin_indices(7, 2, 0).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert bin_indices(7, 2, 1).tolist() == [[1, 2, 3], [4, 5, 6]]
    data = series([0, 5, 6, 7, 1, 2, 3])
    assert select_steps(data, 2, offset=0).tolist() == [1, 5]  # bins [0,5,6] [7,1,2]
    assert select_steps(data, 2, offset=1).tolist() == [2, 5]  # bins [5,6,7] [1,2,3]
    with pytest.raises(StreamError, match=r"\[0, 1\]"):
        select_steps(data, 2, offset=2)


def test_offset_defaults_and_random_draws():
    assert resolve_offset(7, 2, "eval", None) == 0
    drawn = {resolve_offset(11, 4, "eval", sample_rng(3, 0, str(i)), "random") for i in range(100)}
    assert drawn == {0, 1, 2, 3}
    drawn = {resolve_offset(11, 4, "train", sample_rng(3, 0, str(i))) for i in range(100)}
    assert drawn == {0, 1, 2, 3}
    with pytest.raises(StreamError, match="Generator"):
        resolve_offset(11, 4, "eval", None, "random")


def test_fewer_steps_than_bins_spreads_steps_in_order():
    data = series([4, 5, 6])
    idx = select_steps(data, 8, mask=clouds([1, 0, 1]))
    assert idx.tolist() == [d * 3 // 8 for d in range(8)]
    x, dates = apply_selection(data, np.arange(9, dtype=np.int16).reshape(3, 3), idx)
    assert x.shape == (8, 1, 2, 2) and dates[:, 0].tolist() == [0, 0, 0, 3, 3, 3, 6, 6]
    with pytest.raises(StreamError, match="nothing to truncate"):
        select_steps(data, 8, offset=1)


def test_no_date_gives_empty_selection():
    data = np.zeros((0, 3, 4, 4), dtype=np.uint16)
    idx = select_steps(data, 4, mode="train", rng=sample_rng(0, 0, "t"))
    x, d = apply_selection(data, np.zeros((0, 3), dtype=np.int16), idx)
    assert idx.shape == (0,) and x.shape == (0, 3, 4, 4) and d.shape == (0, 3)


def test_train_picks_valid_steps_uniformly():
    # D=2 bins of 5 steps; bin 0 steps 1 and 3 cloudy, bin 1 step 7 NaN
    data = series(np.arange(10), dtype=np.float32)
    data[7, 0, 1, 0] = np.nan
    mask = clouds([0, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    n = 3000
    picks = np.array([select_steps(data, 2, mask=mask, mode="train", rng=sample_rng(7, 0, f"s{i}"))
                      for i in range(n)])
    for col, valid in ((0, [0, 2, 4]), (1, [5, 6, 8, 9])):
        values, counts = np.unique(picks[:, col], return_counts=True)
        assert values.tolist() == valid
        expected = n / len(valid)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 20.0, (col, counts)  # df <= 3: p < 1e-3 if biased


def test_train_is_a_pure_function_of_the_generator_seed():
    data = series(np.arange(40) % 7, h=3, w=3)
    a = select_steps(data, 4, mode="train", rng=sample_rng(1, 2, "tile-x", "s2"))
    b = select_steps(data, 4, mode="train", rng=sample_rng(1, 2, "tile-x", "s2"))
    assert np.array_equal(a, b)
    assert all(int(a[d]) // 10 == d for d in range(4))


def test_float_and_integer_inputs_agree():
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 3000, size=(23, 4, 3, 3))
    mask = (rng.random((23, 2, 3, 3)) < 0.05).astype(np.uint8) * 80
    a = select_steps(raw.astype(np.uint16), 4, mask=mask, offset=3)
    b = select_steps(raw.astype(np.float32), 4, mask=mask, offset=3)
    assert np.array_equal(a, b)
    assert (a >= 3).all() and (a < 3 + 20).all()


def test_normalise_order_and_log_floor():
    x = np.array([[[[0.0, 1.0], [np.e, -2.0]]]], dtype=np.float32)
    out = normalise(x, log_scale=True, norm_factor=5.0)
    assert out.dtype == np.float32
    expected = np.log(np.maximum(x, np.float32(1e-10))) / np.float32(5.0)
    assert np.array_equal(out, expected)
    assert normalise(np.array([[[[255]]]], dtype=np.uint8), False, 255.0)[0, 0, 0, 0] == 1.0


def test_fill_nonfinite_uses_per_pixel_median_over_steps_then_zero():
    x = np.array([1.0, np.nan, 3.0, 10.0], dtype=np.float32).reshape(4, 1, 1, 1)
    x = np.concatenate([x, np.full((4, 1, 1, 1), np.nan, np.float32)], axis=3)  # pixel 1 never finite
    x[0, 0, 0, 1] = np.inf
    out = fill_nonfinite(x)
    assert out[1, 0, 0, 0] == 3.0  # median(1, 3, 10)
    assert (out[:, 0, 0, 1] == 0).all()
    assert out[0, 0, 0, 0] == 1.0 and np.isfinite(out).all()
    clean = np.ones((2, 1, 1, 1), np.float32)
    assert fill_nonfinite(clean) is clean


@pytest.mark.parametrize("kwargs, match", [
    ({"data": np.zeros((4, 2, 2)), "bins": 2}, r"\(T, C, H, W\)"),
    ({"data": np.zeros((4, 1, 2, 2)), "bins": 0}, "positive"),
    ({"data": np.zeros((4, 1, 2, 2)), "bins": 2, "mask": np.zeros((3, 1, 2, 2))}, "does not match"),
    ({"data": np.zeros((4, 1, 2, 2)), "bins": 2, "mode": "val"}, "mode"),
    ({"data": np.zeros((4, 1, 2, 2)), "bins": 2, "mode": "train"}, "Generator"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(StreamError, match=match):
        select_steps(**kwargs)


def test_dates_must_match_steps():
    with pytest.raises(StreamError, match="3 dates for 4"):
        apply_selection(np.zeros((4, 1, 1, 1)), np.zeros((3, 3), np.int16), np.array([0]))


@settings(max_examples=80, deadline=None)
@given(steps=st.integers(1, 20), pixels=st.integers(1, 30), nan_rate=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 10**6))
def test_nanmedian_steps_equals_numpy(steps, pixels, nan_rate, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-50, 50, size=(steps, 2, pixels)).astype(dtype) / 4  # many ties, exact halves
    x[rng.random(x.shape) < nan_rate] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on all-NaN columns
        expected = np.nanmedian(x, axis=0)
    got = nanmedian_steps(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


def test_work_dtype_is_exact():
    assert work_dtype(np.uint16) is np.float32 and work_dtype(np.int16) is np.float32
    assert work_dtype(np.float32) is np.float32 and work_dtype(np.uint8) is np.float32
    assert work_dtype(np.int32) is np.float64 and work_dtype(np.float64) is np.float64


@given(steps=st.integers(2, 30), bins=st.integers(1, 6), nan_rate=st.sampled_from([0.0, 0.2, 0.9]),
       cloud_rate=st.sampled_from([0.0, 0.1, 0.6, 1.0]), floats=st.booleans(), seed=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_train_nan_counts_equal_those_of_the_masked_float_bins(steps, bins, nan_rate, cloud_rate, floats, seed):
    from maestro_data.stream.temporal import _masked_steps, _nan_counts

    if steps < bins:
        return
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 1000, (steps, 3, 4, 4)).astype(np.float32 if floats else np.uint16)
    if floats:
        data[rng.random(data.shape) < nan_rate] = np.nan
    for mask in (None, (rng.random((steps, 2, 4, 4)) < cloud_rate).astype(np.uint8) * 60):
        idx = bin_indices(steps, bins, steps % bins)
        want = np.isnan(_masked_steps(data, mask, 50.0, idx)).sum(axis=(2, 3, 4)).T
        np.testing.assert_array_equal(_nan_counts(data, mask, 50.0, idx), want)
