"""The pure core of `maestro-data stats` / `show`: streamed accumulators against numpy, band clustering, the norm
factor rule, the manifest writer, hillshade and colour mapping, and the one-line error without matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from maestro_data.errors import MaestroError, ManifestError
from maestro_data.inspect.accumulate import CoMoments, Histogram, Moments
from maestro_data.inspect.proposal import Proposal, cluster_bands, manifest_with, nice_factor
from maestro_data.inspect.samples import display_manifest
from maestro_data.inspect.show import class_image, hillshade, stretch
from maestro_data.manifest import load_manifest, parse_manifest


def _chunks(x: np.ndarray, n: int) -> list[np.ndarray]:
    return np.array_split(x, n, axis=1)


def test_streamed_moments_histograms_and_correlations_equal_numpy():
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 4000, (3, 5000)).astype(np.float64)
    ints[1, ::7] = np.nan  # not counted in band 1 (and not in the correlation)
    moments, comoments, hist = Moments.zeros(3), CoMoments.zeros(3), Histogram.for_dtype(np.dtype("uint16"), 3)
    for part in _chunks(ints, 7):
        moments.add(part)
        comoments.add(part)
        hist.add(part)
    for c in range(3):
        v = ints[c][~np.isnan(ints[c])]
        assert moments.n[c] == v.size
        assert np.isclose(moments.mean[c], v.mean(), rtol=1e-12) and np.isclose(moments.std[c], v.std(), rtol=1e-12)
        expected = np.percentile(v, [1, 2, 50, 98, 99], method="inverted_cdf")
        assert np.array_equal(hist.percentiles((1, 2, 50, 98, 99))[c], expected)  # exact for integers
    joint = ints[:, ~np.isnan(ints).any(axis=0)]
    assert comoments.n == joint.shape[1]
    assert np.allclose(comoments.correlation(), np.corrcoef(joint), atol=1e-12)
    floats = rng.normal(-3, 2, (2, 4000))
    fh = Histogram.for_range(floats.min(axis=1), floats.max(axis=1))
    for part in _chunks(floats, 3):
        fh.add(part)
    got = fh.percentiles((1, 50, 99))
    for c in range(2):
        expected = np.percentile(floats[c], [1, 50, 99], method="inverted_cdf")
        assert np.all(np.abs(got[c] - expected) <= fh.resolution[c] + 1e-12)


def test_coarse_histogram_keeps_every_count():
    h = Histogram.for_dtype(np.dtype("uint16"), 1)
    values = np.arange(100, 3000, dtype=np.float64)[None]
    h.add(values)
    edges, counts = h.coarse(0)
    assert sum(counts) == values.size and len(counts) <= 256 and edges[0] == 100 and edges[-1] >= 2999


def test_clustering_recovers_planted_blocks_even_out_of_order():
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(3, 20000))
    owner = [0, 0, 1, 2, 1, 1, 2, 0]  # block membership, not in runs
    x = np.stack([latent[o] + 0.15 * rng.normal(size=20000) for o in owner])
    groups = cluster_bands(np.corrcoef(x))
    assert groups == [[0, 1, 7], [2, 4, 5], [3, 6]]
    m = load_manifest("treesatai-ts")
    proposal = Proposal(select=tuple(i for g in groups for i in g), norm_groups=(3, 3, 2), norm_factor=1.0)
    assert proposal.groups(m.modalities["aerial"].bands + ("a", "b", "c", "d")) == [
        ["NIR", "G", "d"], ["B", "a", "b"], ["R", "c"]]


def test_nice_factor_picks_the_nearest_one_two_five_number():
    assert [nice_factor(v) for v in (4300, 3200, 6.5, 23, 0.0)] == [5000, 5000, 5, 20, 1]


def test_manifest_with_writes_groups_factors_and_select_and_keeps_comments():
    base = load_manifest("treesatai-ts")
    proposals = {"aerial": Proposal((0, 1, 3, 2), (1, 2, 1), 255.0),
                 "s2": Proposal(tuple(range(10)), (3, 5, 2), 2000.0)}
    text = manifest_with(base, proposals)
    m = parse_manifest(text)
    assert m.modalities["aerial"].select == (0, 1, 3, 2) and m.modalities["aerial"].norm_groups == (1, 2, 1)
    assert m.modalities["s2"].norm_groups == (3, 5, 2) and m.modalities["s2"].norm_factor == 2000.0
    assert m.storage_sha256 == base.storage_sha256  # still reads the same store
    assert "# file order; GDAL mis-flags band 4 as alpha" in text
    variant = load_manifest("treesatai-ts-from-flair-hub")  # extends a base: its text lacks most tables
    written = parse_manifest(manifest_with(variant, {"s1_asc": Proposal((0, 1), (2,), 10.0)}))
    assert written.modalities["s1_asc"].norm_groups == (2,) and written.modalities["s1_asc"].norm_factor == 10.0


def test_hillshade_lights_slopes_facing_the_sun():
    y, x = np.mgrid[0:20, 0:20].astype(float)
    assert np.allclose(hillshade(np.zeros((20, 20)), 1.0), np.sin(np.radians(45)))
    facing_nw = hillshade(x + y, 1.0)  # rises to the south-east: faces north-west, the default sun
    facing_se = hillshade(-(x + y), 1.0)
    assert facing_nw.mean() > 0.9 and facing_se.mean() < 0.2


def test_stretch_and_class_colours():
    img = np.stack([np.linspace(0, 100, 400).reshape(20, 20)] * 3)
    out = stretch(img)
    assert out.min() == 0 and out.max() == 1 and out.dtype == np.float32
    t = load_manifest("flair-hub").targets["cosia"]
    rgba = class_image(np.array([[0, 18], [-1, 200]]), t)
    assert np.allclose(rgba[0, 0, :3], [0xdb / 255, 0x0e / 255, 0x9a / 255])  # building, the official colour
    assert np.allclose(rgba[1, 0], rgba[1, 1])  # missing and unknown values: the same grey


def test_old_store_manifests_borrow_display_keys_and_other_data_is_refused():
    m = load_manifest("flair-hub")
    bare = parse_manifest("\n".join(line for line in m.text.splitlines()
                                    if not line.startswith(("display =", "colors =", "          \"#"))))
    assert display_manifest(bare).targets["cosia"].colors == m.targets["cosia"].colors
    with pytest.raises(ManifestError, match="other stored data"):
        display_manifest(bare, "pastis-hd")


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    from maestro_data.inspect.figures import new_figure

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MaestroError, match=r"pip install 'maestro-eo\[plots\]'"):
        new_figure(1, 1)
