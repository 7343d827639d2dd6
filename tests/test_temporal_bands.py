"""Time steps are chosen on the bands the model receives (the manifest's ``select``), as the official reader does.

PASTIS-HD stores Sentinel-1 as VV, VH and VV/VH (dB difference) and the model receives VV and VH only: the
official reader keeps ``bands=[[0, 1]]`` first and then computes the per-pixel median and the mean absolute
deviation that choose each bin's step. The ratio channel must not take part in the choice.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from maestro_data.manifest import load_manifest
from maestro_data.randomness import sample_rng
from maestro_data.stream.collate import BatchBuffer, SampleTransform, TransformOptions
from maestro_data.stream.temporal import bin_indices, select_steps

PASTIS = load_manifest("pastis-hd")
# bin 0 of the crafted S1 series (dB): VV, VH per step; the stored third channel is VV - VH
VV, VH = (-14.0, -14.0, -12.0), (-20.0, -16.0, -17.0)


def official_mad(x: np.ndarray) -> np.ndarray:
    """Per step of one bin ``(S, C, H, W)``: mean |x - per-pixel median over steps| (the official rule, plain numpy)."""
    return np.nanmean(np.abs(x - np.nanmedian(x, axis=0)), axis=(1, 2, 3))


def s1_series(steps: int = 12, size: int = 128) -> np.ndarray:
    """(T, 3, H, W) float32: VV, VH, VV - VH; every bin repeats the crafted steps on a fixed field pattern."""
    yy, xx = np.mgrid[0:size, 0:size]
    ground = (np.sin(yy / 9.0) + np.cos(xx / 7.0)).astype(np.float32)  # the same in every step: no deviation
    vv = np.resize(np.asarray(VV, np.float32), steps)[:, None, None] + ground
    vh = np.resize(np.asarray(VH, np.float32), steps)[:, None, None] + ground
    return np.stack([vv, vh, vv - vh], axis=1).astype(np.float32)


def test_the_ratio_channel_no_longer_changes_the_choice():
    data = s1_series(steps=3, size=16)
    mad2, mad3 = official_mad(data[:, :2]), official_mad(data)
    np.testing.assert_allclose(mad2, [1.5, 0.5, 1.0], atol=1e-5)  # VV, VH: step 1 is the most representative
    np.testing.assert_allclose(mad3, [4 / 3, 4 / 3, 2 / 3], atol=1e-5)  # + VV/VH: step 2 would be
    assert select_steps(data, 1, channels=[0, 1]).tolist() == [1]  # the official choice
    assert select_steps(data, 1).tolist() == [2]  # all stored channels: the choice before this fix
    assert select_steps(data, 1, channels=[1, 0]).tolist() == [1]  # a reordering select judges the same bands


def dates(n: int) -> np.ndarray:
    return np.array([[2018, 250 + 7 * i, 0] for i in range(n)], np.int16)


def _pastis_sample(s1_des: np.ndarray) -> dict:
    rng = np.random.default_rng(3)
    t2, t1 = 20, s1_des.shape[0]
    return {"__key__": "25640", "meta": {"ref_date": [2019, 182, 0]},
            "spot": rng.integers(0, 255, (1, 3, 1280, 1280), dtype=np.uint8), "spot_dates": dates(1),
            "s2": rng.integers(0, 5000, (t2, 10, 128, 128), dtype=np.int16), "s2_dates": dates(t2),
            "s1_asc": s1_des.copy(), "s1_asc_dates": dates(t1), "s1_des": s1_des, "s1_des_dates": dates(t1),
            "pastis_seg": rng.integers(0, 20, (128, 128), dtype=np.uint8)}


def _row(transform: SampleTransform, sample: dict, crop: int = 0, epoch: int = 0) -> dict[str, np.ndarray]:
    buffer = BatchBuffer(transform.output_spec(), 1, d4_key=True)
    buffer.fill(0, transform, sample, crop, epoch, sample["__key__"])
    return {k: v[0] for k, v in buffer.arrays.items()}


def test_pastis_eval_crop_takes_the_official_s1_step():
    data = s1_series()  # T = 12, D = 4: bins of 3 steps, offset 0 in eval
    sample = _pastis_sample(data)
    transform = SampleTransform(PASTIS, TransformOptions(mode="eval", d4=False, normalize_on_device=False))
    row = _row(transform, sample, crop=0)
    official = [3 * d + 1 for d in range(4)]  # step 1 of every bin; on 3 channels it would be step 2
    assert row["s1_des_dates"].tolist() == sample["s1_des_dates"][official].tolist()
    np.testing.assert_array_equal(row["s1_des"], data[official, :2, :16, :16] / np.float32(20))


def test_train_validity_ignores_nan_in_dropped_channels():
    data = s1_series(steps=12, size=16)
    data[[0, 2], 2, 5, 5] = np.nan  # NaN only in the ratio channel of steps 0 and 2 of bin 0
    clean = data.copy()
    clean[:, 2] = 0
    picks = set()
    for i in range(60):
        got = select_steps(data, 4, mode="train", rng=sample_rng(0, i, "k", "temporal:s1_des:0"), channels=[0, 1])
        want = select_steps(clean, 4, mode="train", rng=sample_rng(0, i, "k", "temporal:s1_des:0"))
        assert got.tolist() == want.tolist()  # same draws as without the NaN: randomness unchanged
        picks.add(int(got[0]))
    assert picks == {0, 1, 2}  # every step of bin 0 stays valid (on 3 channels only step 1 was)
    old = {int(select_steps(data, 4, mode="train", rng=sample_rng(0, i, "k"))[0]) for i in range(30)}
    assert old == {1}


def test_pastis_train_rows_draw_among_steps_valid_on_vv_vh():
    data = s1_series()
    data[[0, 2], 2] = np.nan  # the dropped ratio channel is NaN in steps 0 and 2: VV, VH are fine
    transform = SampleTransform(PASTIS, TransformOptions(mode="train", d4=False, normalize_on_device=False))
    firsts = set()
    for epoch in range(40):
        row = _row(transform, _pastis_sample(data), crop=0, epoch=epoch)
        firsts.add(int(row["s1_des_dates"][0, 1]))
        assert np.isfinite(row["s1_des"]).all()
    assert len(firsts) > 1  # not pinned to the one step whose ratio is finite


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(2, 24), bins=st.integers(1, 5), channels=st.permutations(range(4)).flatmap(
    lambda p: st.integers(1, 4).map(lambda n: list(p[:n]))), nan_rate=st.sampled_from([0.0, 0.05, 0.5]),
    cloudy=st.booleans(), seed=st.integers(0, 10**6))
def test_choosing_on_channels_equals_choosing_on_the_selected_array(steps, bins, channels, nan_rate, cloudy, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 50, (steps, 4, 3, 3)).astype(np.float32)
    data[rng.random(data.shape) < nan_rate] = np.nan
    mask = (rng.random((steps, 2, 3, 3)) < 0.2).astype(np.uint8) * 60 if cloudy else None
    offset = steps % bins if steps > bins else 0
    selected = np.ascontiguousarray(data[:, channels])
    got = select_steps(data, bins, mask=mask, offset=offset, channels=channels)
    assert got.tolist() == select_steps(selected, bins, mask=mask, offset=offset).tolist()
    for epoch in range(3):
        got = select_steps(data, bins, mask=mask, mode="train", rng=sample_rng(seed, epoch, "k"), channels=channels)
        want = select_steps(selected, bins, mask=mask, mode="train", rng=sample_rng(seed, epoch, "k"))
        assert got.tolist() == want.tolist()
    if steps > bins and nan_rate == 0 and mask is None:  # every step valid: the official argmin of plain numpy
        idx = bin_indices(steps, bins, offset)
        ev = select_steps(data, bins, offset=offset, channels=channels)
        assert ev.tolist() == [int(b[np.argmin(official_mad(selected[b]))]) for b in idx]
