"""D4 group properties, crop geometry on the real manifests, and per-sample randomness (pure functions)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maestro_data.errors import StreamError
from maestro_data.manifest import load_manifest
from maestro_data.randomness import permutation, sample_rng
from maestro_data.stream.augment import (
    crop_grid,
    crop_window,
    d4_apply,
    d4_compose,
    d4_inverse,
    eval_crop_origins,
    random_crop_origin,
    random_d4,
)

ELEMENTS = range(8)


def generic(n: int = 5) -> np.ndarray:
    return np.arange(2 * 3 * n * n).reshape(2, 3, n, n)


def test_eight_distinct_elements_and_official_coin_order():
    x = generic()
    images = [d4_apply(x, k) for k in ELEMENTS]
    assert len({im.tobytes() for im in map(np.ascontiguousarray, images)}) == 8
    assert np.array_equal(images[0], x)
    assert np.array_equal(images[1], np.flip(x, axis=2))
    assert np.array_equal(images[2], np.flip(x, axis=3))
    assert np.array_equal(images[4], np.swapaxes(x, 2, 3))
    assert np.array_equal(images[7], np.swapaxes(np.flip(np.flip(x, axis=2), axis=3), 2, 3))


def test_group_closure_identity_inverse_associativity():
    x = generic(4)
    for a, b in itertools.product(ELEMENTS, ELEMENTS):
        assert np.array_equal(d4_apply(d4_apply(x, b), a), d4_apply(x, d4_compose(a, b)))
    for k in ELEMENTS:
        assert d4_compose(k, 0) == k == d4_compose(0, k)
        assert d4_compose(k, d4_inverse(k)) == 0 == d4_compose(d4_inverse(k), k)
        assert np.array_equal(d4_apply(d4_apply(x, k), d4_inverse(k)), x)
    for a, b, c in itertools.product(ELEMENTS, repeat=3):
        assert d4_compose(a, d4_compose(b, c)) == d4_compose(d4_compose(a, b), c)
    # D4 is not abelian: a flip and the transpose do not commute
    assert d4_compose(1, 4) != d4_compose(4, 1)


@pytest.mark.parametrize("k", ELEMENTS)
def test_labels_follow_inputs_at_different_resolutions(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, 19, size=(4, 4))  # a 10 m label raster
    s2 = rng.random((3, 2, 4, 4))  # same grid as the labels
    spot = np.kron(labels, np.ones((10, 10), dtype=labels.dtype))  # 1 m raster, each pixel carries its label
    tl, ts2, tspot = (d4_apply(a, k) for a in (labels, s2, spot))
    # every 1 m pixel still lies inside the 10 m cell whose label it carries
    assert np.array_equal(tspot, np.kron(tl, np.ones((10, 10), dtype=labels.dtype)))
    # s2 and labels keep their pixel-to-pixel correspondence: apply the same permutation of cells
    cells = np.arange(16).reshape(4, 4)
    moved = d4_apply(cells, k).ravel()
    assert np.array_equal(ts2.reshape(3, 2, 16), s2.reshape(3, 2, 16)[..., moved])
    assert np.array_equal(tl.ravel(), labels.ravel()[moved])


def test_random_d4_is_uniform_over_the_group():
    draws = [random_d4(sample_rng(0, 0, f"k{i}", "d4")) for i in range(800)]
    counts = np.bincount(draws, minlength=8)
    assert counts.min() > 60


def test_bad_d4_inputs():
    with pytest.raises(ValueError, match="0..7"):
        d4_apply(np.zeros((2, 2)), 8)
    with pytest.raises(ValueError, match="last two axes"):
        d4_apply(np.zeros(3), 1)


def test_pastis_crop_grid_and_64_eval_crops():
    m = load_manifest("pastis-hd")
    grid = crop_grid(m)
    assert grid.unit_m * grid.tile_units == pytest.approx(m.tile_m)
    assert grid.crop_units * grid.unit_m == pytest.approx(m.crop_m)
    origins = eval_crop_origins(m)
    assert len(origins) == m.repeats**2 == 64 and len(set(origins)) == 64
    rasters = {**m.modalities, **{n: t for n, t in m.targets.items() if t.type == "segmentation"}}
    for name, spec in rasters.items():
        cover = np.zeros((spec.tile_size, spec.tile_size), dtype=np.int64)
        for origin in origins:
            row, col, size = crop_window(spec, origin)
            assert size == spec.image_size
            assert (row * spec.resolution_m, col * spec.resolution_m) == pytest.approx(origin)
            cover[row:row + size, col:col + size] += 1
        assert (cover == 1).all(), name  # the crops partition the tile, without overlap
    assert origins[1][0] == 0 and origins[1][1] == pytest.approx(m.crop_m)  # row-major, as the official order


def test_random_crop_is_aligned_and_in_bounds_for_every_raster():
    m = load_manifest("pastis-hd")
    grid = crop_grid(m)
    seen = set()
    for i in range(200):
        origin = random_crop_origin(sample_rng(0, 0, f"t{i}", "crop"), grid)  # the per-sample form: a ready grid
        assert origin == random_crop_origin(sample_rng(0, 0, f"t{i}", "crop"), m)  # the same draw from the manifest
        seen.add(origin)
        for spec in (*m.modalities.values(), *m.targets.values()):
            crop_window(spec, origin)  # raises when off-grid or out of bounds
        assert all(0 <= o <= grid.max_origin_units * grid.unit_m + 1e-9 for o in origin)
    assert len(seen) > 150
    assert random_crop_origin(sample_rng(0, 0, "t1", "crop"), m) == random_crop_origin(
        sample_rng(0, 0, "t1", "crop"), m)


@pytest.mark.parametrize("name", ["flair-hub", "flair2", "treesatai-ts"])
def test_single_crop_datasets(name):
    m = load_manifest(name)
    assert eval_crop_origins(m) == [(0.0, 0.0)]
    assert random_crop_origin(np.random.default_rng(0), m) == (0.0, 0.0)
    for spec in m.modalities.values():
        assert crop_window(spec, (0.0, 0.0)) == (0, 0, spec.image_size)


def test_crop_window_rejects_off_grid_and_out_of_tile():
    m = load_manifest("pastis-hd")
    with pytest.raises(StreamError, match="pixel grid"):
        crop_window(m.modalities["s2"], (5.0, 0.0))
    with pytest.raises(StreamError, match="outside"):
        crop_window(m.modalities["s2"], (0.0, m.tile_m - m.crop_m + 10.0))
    with pytest.raises(StreamError, match="not a raster"):
        crop_window(load_manifest("treesatai-ts").targets["treesat_mlc_thresh"], (0.0, 0.0))


def test_sample_rng_is_a_pure_function_of_its_inputs():
    a = sample_rng(3, 1, "tile-α", "crop").random(4)
    assert np.array_equal(a, sample_rng(3, 1, "tile-α", "crop").random(4))
    for other in (sample_rng(4, 1, "tile-α", "crop"), sample_rng(3, 2, "tile-α", "crop"),
                  sample_rng(3, 1, "tile-β", "crop"), sample_rng(3, 1, "tile-α", "d4"),
                  sample_rng(3, 1, "tile-αcrop", ""), sample_rng(3, 1, "tile-", "αcrop")):
        assert not np.array_equal(a, other.random(4))
    with pytest.raises(ValueError, match="non-negative"):
        sample_rng(-1, 0, "k")
    with pytest.raises(TypeError):
        sample_rng(0, 0, 5)  # type: ignore[arg-type]


def test_sample_rng_reuse_draws_what_a_fresh_generator_draws():
    used = sample_rng(9, 9, "other")
    used.random(3)
    used.integers(0, 7, size=5)  # leaves a buffered half word and a moved counter behind
    used.bit_generator.random_raw()
    for args in ((3, 1, "tile-α", "crop"), (0, 0, "", ""), (2**40, 7, "k", "temporal:s2:0")):
        fresh = sample_rng(*args)
        again = sample_rng(*args, reuse=used)
        assert again is used
        assert np.array_equal(fresh.integers(0, 9, size=3), again.integers(0, 9, size=3))
        assert np.array_equal(fresh.random(5), again.random(5))
        assert fresh.bit_generator.state["state"]["counter"].tolist() == \
            again.bit_generator.state["state"]["counter"].tolist()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**63), epoch=st.integers(0, 10**6), salt=st.text(max_size=8))
def test_permutation_properties(n, seed, epoch, salt):
    p = permutation(n, seed, epoch, salt)
    assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(n))
    assert np.array_equal(p, permutation(n, seed, epoch, salt))
    if n >= 20:
        assert not np.array_equal(p, permutation(n, seed, epoch + 1, salt))
        assert not np.array_equal(p, permutation(n, seed, epoch, salt + "x"))


def test_permutation_is_well_mixed():
    n, trials = 10, 4000
    first = np.bincount([permutation(n, 7, e)[0] for e in range(trials)], minlength=n)
    expected = trials / n
    assert float(((first - expected) ** 2 / expected).sum()) < 40  # df 9: p < 1e-5 if biased
