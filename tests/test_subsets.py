"""Furthest point sampling: hand-checkable orders, exactness vs a brute-force reference, counts, nesting, CSVs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maestro_data.build.subsets import (
    fps_subsets,
    furthest_point_order,
    geocentric,
    read_split_csvs,
    split_csv_name,
    subset_count,
)
from maestro_data.errors import StoreError
from maestro_data.manifest import load_manifest


def brute_force_fps(points: np.ndarray, count: int, start: int) -> list[int]:
    """Reference: full update of every point at every step, lowest index among equal maxima."""
    chosen = [start]
    best = np.full(len(points), np.inf)
    while len(chosen) < count:
        last = points[chosen[-1]]
        d2 = (points[:, 0] - last[0]) ** 2
        for a in range(1, points.shape[1]):
            d2 = d2 + (points[:, a] - last[a]) ** 2
        best = np.minimum(best, d2)
        best[chosen] = -1.0
        chosen.append(int(np.flatnonzero(best == best.max())[0]))
    return chosen[:count]


def line(xs) -> np.ndarray:
    return np.array([[x, 0.0, 0.0] for x in xs])


def test_hand_checkable_order_on_a_line():
    # centroid 4.8 -> 11 is furthest (idx 4); then 0 (idx 0); then 2 (gap 2); then 1 and 10 tie at 1 -> idx 1
    assert furthest_point_order(line([0, 1, 2, 10, 11]), 5).tolist() == [4, 0, 2, 1, 3]
    assert furthest_point_order(line([0, 1, 2, 10, 11]), 3, start=2).tolist() == [2, 4, 0]


def test_ties_go_to_lowest_index():
    # square corners: all equally far from the centroid -> idx 0; the opposite corner next; then 1 before 3
    square = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
    assert furthest_point_order(square, 4).tolist() == [0, 2, 1, 3]


def test_geocentric_axes_and_metric():
    pts = geocentric([0, 90, 0], [0, 0, 90])
    a, b = 6378137.0, 6356752.314245
    np.testing.assert_allclose(pts, [[a, 0, 0], [0, a, 0], [0, 0, b]], atol=1e-6)
    rng = np.random.default_rng(0)
    lon, lat = rng.uniform(-180, 180, 50), rng.uniform(-89, 89, 50)
    unit = geocentric(lon, lat, ellipsoid=False)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0)
    # chord on the unit sphere = 2 sin(angle / 2), the angle from the haversine formula
    p, q = np.radians([lon[:-1], lat[:-1]]), np.radians([lon[1:], lat[1:]])
    h = np.sin((q[1] - p[1]) / 2) ** 2 + np.cos(p[1]) * np.cos(q[1]) * np.sin((q[0] - p[0]) / 2) ** 2
    angle = 2 * np.arcsin(np.sqrt(h))
    np.testing.assert_allclose(np.linalg.norm(unit[1:] - unit[:-1], axis=1), 2 * np.sin(angle / 2), atol=1e-12)
    with pytest.raises(ValueError, match="latitudes"):
        geocentric([0], [91])


def test_two_far_cities_are_covered_first():
    # three tiles in Paris, three in Marseille (~100 m apart): the first two picks are one per city
    lon = [2.3500, 2.3512, 2.3524, 5.3700, 5.3712, 5.3724]
    lat = [48.8600, 48.8600, 48.8600, 43.3000, 43.3000, 43.3000]
    ids = ["p1", "p2", "p3", "m1", "m2", "m3"]
    first_two = fps_subsets(ids, lon, lat, percents=(100 / 3,))[100 / 3]
    assert len(first_two) == 2 and {t[0] for t in first_two} == {"p", "m"}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), clusters=st.integers(1, 4), dup=st.integers(0, 10), seed=st.integers(0, 10**6),
       data=st.data())
def test_matches_brute_force_reference(n, clusters, dup, seed, data):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 3)) * 100
    pts = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, 3))
    pts = np.concatenate([pts, pts[rng.integers(0, n, dup)]])  # exact duplicates
    count = data.draw(st.integers(0, len(pts)))
    order = furthest_point_order(pts, count)
    assert len(set(order.tolist())) == count
    if count:
        assert order.tolist() == brute_force_fps(pts, count, int(order[0]))
        d = ((pts - pts.mean(axis=0)) ** 2).sum(axis=1)
        assert int(order[0]) == int(np.flatnonzero(d == d.max())[0])


@pytest.mark.parametrize("n, p, expected", [
    (1, 5, 0), (1, 50, 1), (10, 5, 1), (30, 5, 2), (50, 5, 3), (70, 5, 4), (241100, 20, 48220), (7, 100, 7),
])
def test_subset_count_rounds_half_up(n, p, expected):
    assert subset_count(n, p) == expected == math.floor(p * n / 100 + 0.5)


def test_subset_count_rejects_bad_percent():
    for bad in (0, -5, 101):
        with pytest.raises(ValueError, match=r"\(0, 100\]"):
            subset_count(10, bad)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 200), seed=st.integers(0, 10**6),
       percents=st.lists(st.sampled_from([1, 2.5, 5, 10, 20, 33, 50, 100]), min_size=1, max_size=4, unique=True))
def test_exact_counts_nesting_and_order_independence(n, seed, percents):
    rng = np.random.default_rng(seed)
    ids = [f"tile-{i:04d}" for i in rng.permutation(n)]
    lon, lat = rng.uniform(-5, 9, n), rng.uniform(42, 51, n)
    subsets = fps_subsets(ids, lon, lat, percents)
    assert set(subsets) == set(percents)
    for p, chosen in subsets.items():
        assert len(chosen) == subset_count(n, p) and len(set(chosen)) == len(chosen)
        assert set(chosen) <= set(ids)
    ranked = sorted(subsets.values(), key=len)
    for small, big in zip(ranked, ranked[1:], strict=False):
        assert big[: len(small)] == small  # nested: a prefix
    shuffled = rng.permutation(n)
    again = fps_subsets([ids[i] for i in shuffled], lon[shuffled], lat[shuffled], percents)
    assert again == subsets  # a function of the set of tiles, not of their input order


def test_identical_coordinates_give_exact_deterministic_counts():
    ids = [f"t{i:02d}" for i in range(40)][::-1]
    subsets = fps_subsets(ids, [3.0] * 40, [45.0] * 40, (5, 20, 50))
    assert subsets[5] == ["t00", "t01"] and subsets[20] == [f"t{i:02d}" for i in range(8)]
    assert len(subsets[50]) == 20


def test_tiny_and_empty_inputs():
    assert fps_subsets(["only"], [1.0], [45.0], (5, 20, 100)) == {5: [], 20: [], 100: ["only"]}
    assert fps_subsets([], [], [], (5,)) == {5: []}
    assert furthest_point_order(line([3]), 1).tolist() == [0]
    with pytest.raises(ValueError, match="duplicate tile ids"):
        fps_subsets(["a", "a"], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="count"):
        furthest_point_order(line([0, 1]), 3)


def write_csv(path, header, rows, sep=","):
    path.write_text("\n".join([sep.join(header), *(sep.join(r) for r in rows)]) + "\n", encoding="utf-8")


def test_split_csv_names():
    assert split_csv_name("train", percent=5) == "train_filtered_5.csv"
    assert split_csv_name("test", version="flair2", percent=20) == "test_flair2_filtered_20.csv"
    assert split_csv_name("val", percent=20, fold=3) == "val_filtered_20_fold_3.csv"


def test_read_treesat_csvs(tmp_path):
    header = ["aerial_name", "sen_name", "aerial_date"]
    tiles = {}
    for stage in ("train", "val", "test"):
        for p, n in ((5, 1), (20, 3)):
            names = [f"{stage}_{i}" for i in range(n)]
            tiles.update(dict.fromkeys(names, stage))
            write_csv(tmp_path / f"{stage}_filtered_{p}.csv", header,
                      [[f"{t}.tif", f"{t}_2019.h5", "20190701"] for t in names])
    out = read_split_csvs(tmp_path, load_manifest("treesatai-ts"), tiles=tiles)
    assert out["train"] == {5: ["train_0"], 20: ["train_0", "train_1", "train_2"]}
    tiles["val_1"] = "test"
    with pytest.raises(StoreError, match="another split"):
        read_split_csvs(tmp_path, "treesatai-ts", tiles=tiles)
    del tiles["val_1"]
    with pytest.raises(StoreError, match=r"val_filtered_20\.csv: 1 tile ids are not in the store"):
        read_split_csvs(tmp_path, "treesatai-ts", tiles=tiles)


def test_read_flair2_and_pastis_names(tmp_path):
    for stage in ("train", "val", "test"):
        write_csv(tmp_path / f"{stage}_flair2_filtered_5.csv", ["patch_id"], [[f"D0-2021_{stage}"]], sep=";")
        write_csv(tmp_path / f"{stage}_filtered_5_fold_2.csv", ["image", "x"], [["10000", "1"], ["20001", "2"]])
    assert read_split_csvs(tmp_path, "flair2", (5,))["val"] == {5: ["D0-2021_val"]}
    assert read_split_csvs(tmp_path, "pastis-hd", (5,), fold=2)["test"] == {5: ["10000", "20001"]}


@pytest.mark.parametrize("case, match", [
    ("missing", r"train_filtered_5\.csv: split file not found"),
    ("column", "no column 'patch_id'"),
    ("empty", "line 3: empty 'patch_id'"),
    ("dup", "duplicate tile ids"),
])
def test_read_csv_errors(tmp_path, case, match):
    rows = {"column": (["id"], [["a"]]), "empty": (["patch_id"], [["a"], ['""']]),
            "dup": (["patch_id"], [["a"], ["a"]])}
    if case != "missing":
        write_csv(tmp_path / "train_filtered_5.csv", *rows[case])
    with pytest.raises(StoreError, match=match):
        read_split_csvs(tmp_path, "flair-hub", (5,))
    with pytest.raises(StoreError, match="no split-CSV key column"):
        read_split_csvs(tmp_path, "sen12ms", (5,))
