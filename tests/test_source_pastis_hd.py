"""PASTIS-HD reader against the synthetic release layout: values, dates, folds, split CSVs, location, bad inputs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from maestro_data.errors import ManifestError, SourceError
from maestro_data.geo import polygon_centroid
from maestro_data.manifest import load_manifest, parse_manifest
from maestro_data.sources import SourceOptions, open_source
from maestro_data.sources.pastis_hd import (
    PastisHDSource,
    dates_property,
    fold_assignment,
    parse_dates_property,
)
from maestro_data.synthetic import generate
from maestro_data.tile import TileRef

MANIFEST = load_manifest("pastis-hd")
S2 = "DATA_S2/S2_{}.npy"
S1A = "DATA_S1A/S1A_{}.npy"
S1D = "DATA_S1D/S1D_{}.npy"
SPOT = "DATA_SPOT/PASTIS_SPOT6_RVB_1M00_2019/SPOT6_RVB_1M00_2019_{}.tif"
TARGET = "ANNOTATIONS/TARGET_{}.npy"
DATE_KEYS = {"s2": "dates-S2", "s1_asc": "dates-S1A", "s1_des": "dates-S1D"}
FILES = {"s2": S2, "s1_asc": S1A, "s1_des": S1D}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate("pastis-hd", tmp_path_factory.mktemp("phd"), tiles=5, seed=3)


@pytest.fixture
def root(base: Path, tmp_path: Path) -> Path:
    """A private copy made of hard links: change files only through _put/_save/_write_meta (they unlink first)."""
    dst = tmp_path / "pastis-hd"
    shutil.copytree(base, dst, copy_function=os.link)
    return dst


def _src(root: Path, fold: int = 1, on_error: str = "fail") -> PastisHDSource:
    return open_source(MANIFEST, root, SourceOptions(fold=fold, on_error=on_error))


def _put(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _save(path: Path, array: np.ndarray) -> None:
    path.unlink(missing_ok=True)
    np.save(path, array)


def _meta(root: Path) -> dict:
    return json.loads((root / "metadata.geojson").read_text())


def _write_meta(root: Path, meta: dict) -> None:
    _put(root / "metadata.geojson", json.dumps(meta).encode())


def _feature(meta: dict, tile_id: str) -> dict:
    return next(f for f in meta["features"] if f["properties"]["ID_PATCH"] == int(tile_id))


def _expected_dates(value: dict | str) -> np.ndarray:
    """Independent decoding of a dates-* property: (year, day of year, 0) in key order."""
    table = json.loads(value) if isinstance(value, str) else value
    days = [str(table[str(i)]) for i in range(len(table))]
    rows = [date(int(d[:4]), int(d[4:6]), int(d[6:])) for d in days]
    return np.array([(d.year, d.timetuple().tm_yday, 0) for d in rows], dtype=np.int16)


def _raises(fn, *needles: str) -> str:
    with pytest.raises(SourceError) as info:
        fn()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    return str(info.value)


def _fails_alone(src: PastisHDSource, tile_id: str, *needles: str) -> None:
    """``tile_id`` is listed once but its probe and read raise (naming it and every needle); the others probe."""
    refs = src.list_tiles()
    bad = [r for r in refs if r.tile_id == tile_id]
    assert len(bad) == 1
    for call in (src.probe, src.read):
        _raises(lambda call=call: call(bad[0]), f"tile '{tile_id}'", *needles)
    assert all(src.probe(r).counts["s2"] > 0 for r in refs if r.tile_id != tile_id)


# ---------------------------------------------------------------- generator


def test_generator_writes_the_release_layout(base: Path) -> None:
    meta = _meta(base)
    assert meta["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::2154"
    ids = [f["properties"]["ID_PATCH"] for f in meta["features"]]
    assert ids == [10000, 10001, 10002, 10003, 10004]
    assert [f["id"] for f in meta["features"]] == [str(i) for i in ids]
    assert sorted(f["properties"]["Fold"] for f in meta["features"]) == [1, 2, 3, 4, 5]
    forms = {type(f["properties"][k]) for f in meta["features"] for k in DATE_KEYS.values()}
    assert forms == {dict, str}
    for feat in meta["features"]:
        tid = str(feat["properties"]["ID_PATCH"])
        for key, pattern in FILES.items():
            data = np.load(base / pattern.format(tid))
            dates = _expected_dates(feat["properties"][DATE_KEYS[key]])
            assert data.shape == (len(dates), len(MANIFEST.modalities[key].bands), 128, 128)
            assert data.dtype == np.dtype(MANIFEST.modalities[key].dtype) and 20 <= len(dates) <= 30
            raw = feat["properties"][DATE_KEYS[key]]
            days = sorted(str(d) for d in (json.loads(raw) if isinstance(raw, str) else raw).values())
            assert days[0] >= "20180901" and days[-1] <= "20191130"
        s1 = np.load(base / S1A.format(tid))
        assert s1.min() >= -30 and s1.max() <= 5
        with rasterio.open(base / SPOT.format(tid)) as tif:
            assert (tif.count, tif.height, tif.width, tif.dtypes[0]) == (3, 1280, 1280, "uint8")
            assert tif.crs.to_epsg() == 2154
            xs, ys = zip(*feat["geometry"]["coordinates"][0], strict=True)
            assert tuple(tif.bounds) == (min(xs), min(ys), max(xs), max(ys))
        target = np.load(base / TARGET.format(tid))
        assert target.shape == (3, 128, 128) and target.dtype == np.uint8
        assert target[0].max() <= 19 and (target[0] == 19).any() and (target[0] == 0).any()
    assert set(json.loads((base / "NORM_S2_patch.json").read_text())) == {f"Fold_{k}" for k in range(1, 6)}


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a = generate("pastis-hd", tmp_path / "a", tiles=1, seed=7)
    b = generate("pastis-hd", tmp_path / "b", tiles=1, seed=7)
    c = generate("pastis-hd", tmp_path / "c", tiles=1, seed=8)
    assert (a / "metadata.geojson").read_bytes() == (b / "metadata.geojson").read_bytes()
    assert (a / S2.format(10000)).read_bytes() == (b / S2.format(10000)).read_bytes()
    assert (a / S2.format(10000)).read_bytes() != (c / S2.format(10000)).read_bytes()


# ---------------------------------------------------------------- reading


def test_every_tile_reads_equal_to_the_files(base: Path) -> None:
    src = _src(base)
    src.check_layout()
    refs = src.list_tiles()
    meta = _meta(base)
    assert sorted(r.tile_id for r in refs) == ["10000", "10001", "10002", "10003", "10004"]
    ref_day = date.fromisoformat(MANIFEST.reference_date)
    for ref in refs:
        feat = _feature(meta, ref.tile_id)
        fresh = _src(base)  # a worker's reader has not listed the tiles
        probed = fresh.probe(TileRef(ref.tile_id, ref.split, ref.fold))
        tile = fresh.read(probed)
        assert (tile.tile_id, tile.split, tile.fold) == (ref.tile_id, ref.split, feat["properties"]["Fold"])
        for key, pattern in FILES.items():
            expected = np.load(base / pattern.format(ref.tile_id))
            series = tile.series[key]
            assert series.data.dtype == expected.dtype and np.array_equal(series.data, expected)
            assert np.array_equal(series.dates, _expected_dates(feat["properties"][DATE_KEYS[key]]))
            assert probed.counts[key] == expected.shape[0]
        with rasterio.open(base / SPOT.format(ref.tile_id)) as tif:
            assert np.array_equal(tile.series["spot"].data, tif.read()[None])
        assert probed.counts["spot"] == 1
        assert tile.series["spot"].dates.tolist() == [[ref_day.year, ref_day.timetuple().tm_yday, 0]]
        assert tile.ref_date.tolist() == [2019, 182, 0]
        target = tile.targets["pastis_seg"]
        assert target.dtype == np.uint8 and np.array_equal(target, np.load(base / TARGET.format(ref.tile_id))[0])


def test_parse_dates_property_accepts_both_forms() -> None:
    expected = np.array([[2018, 267, 0], [2018, 277, 0], [2019, 1, 0]], dtype=np.int16)
    table = {"0": 20180924, "1": 20181004, "2": 20190101}
    assert np.array_equal(parse_dates_property(table), expected)
    assert np.array_equal(parse_dates_property(json.dumps(table)), expected)
    assert np.array_equal(parse_dates_property({k: str(v) for k, v in table.items()}), expected)
    assert np.array_equal(parse_dates_property({"2": 20190101, "0": 20180924, "1": 20181004}), expected)
    many = {str(i): 20180901 + i for i in range(12)}  # "10" sorts after "9", not after "1"
    assert parse_dates_property(many)[:, 1].tolist() == list(range(244, 256))


@pytest.mark.parametrize("value", [
    [20180924], "not json", '["20180924"]', {"0": "2018-09-24"}, {"0": 2018092}, {"0": 20181345},
    {"0": True}, {"0": 20180924.0}, {"0": 20180924, "2": 20180925}, {"a": 20180924}, {"0": 20180924, "00": 1},
])
def test_parse_dates_property_rejects_malformed(value: object) -> None:
    with pytest.raises(ValueError):
        parse_dates_property(value)


def test_dates_read_the_same_from_object_and_string(root: Path) -> None:
    before = _src(root).read(TileRef("10002", "train"))
    meta = _meta(root)
    props = _feature(meta, "10002")["properties"]
    for key in DATE_KEYS.values():  # flip each form: object <-> JSON string
        value = props[key]
        props[key] = json.loads(value) if isinstance(value, str) else json.dumps(value)
    _write_meta(root, meta)
    after = _src(root).read(TileRef("10002", "train"))
    for key in DATE_KEYS:
        assert np.array_equal(before.series[key].dates, after.series[key].dates)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize(("fold", "expected"), [
    (1, {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}),
    (2, {2: "train", 3: "train", 4: "train", 5: "val", 1: "test"}),
    (5, {5: "train", 1: "train", 2: "train", 3: "val", 4: "test"}),
])
def test_fold_rotation(base: Path, fold: int, expected: dict[int, str]) -> None:
    assert fold_assignment(MANIFEST.splits.options, fold) == expected
    folds = {str(f["properties"]["ID_PATCH"]): f["properties"]["Fold"] for f in _meta(base)["features"]}
    refs = _src(base, fold).list_tiles()
    assert len(refs) == 5
    for ref in refs:
        assert ref.fold == folds[ref.tile_id] and ref.split == expected[ref.fold]


def test_fold_table_errors(base: Path) -> None:
    _raises(lambda: _src(base, fold=6).list_tiles(), "fold 6")
    for bad in ({"train": [1, 2], "val": [2]}, {"train": [1, 3]}, {"train": ["1"]}):
        with pytest.raises(ValueError):
            fold_assignment(bad, 1)


def _write_csv(path: Path, ids: list[int]) -> None:
    _put(path, ("," + "image\n" + "".join(f"{i},{t}\n" for i, t in enumerate(ids))).encode())


def test_fold_csvs_take_precedence(root: Path) -> None:
    _write_csv(root / "train_fold_2.csv", [10003, 10000])
    _write_csv(root / "val_fold_2.csv", [10004])
    _write_csv(root / "test_fold_2.csv", [10001])
    folds = {str(f["properties"]["ID_PATCH"]): f["properties"]["Fold"] for f in _meta(root)["features"]}
    refs = _src(root, fold=2).list_tiles()
    assert [(r.tile_id, r.split, r.fold) for r in refs] == [
        ("10003", "train", folds["10003"]), ("10000", "train", folds["10000"]),
        ("10004", "val", folds["10004"]), ("10001", "test", folds["10001"])]
    assert len(_src(root, fold=1).list_tiles()) == 5  # no CSV for fold 1: folds from metadata
    (root / "test_fold_2.csv").unlink()
    _raises(lambda: _src(root, fold=2).list_tiles(), f"{root / 'test_fold_2.csv'}: split file for 'test' not found")
    with pytest.warns(UserWarning, match="test_fold_2.csv"):
        assert [r.split for r in _src(root, fold=2, on_error="skip").list_tiles()] == ["train", "train", "val"]
    _write_csv(root / "test_fold_2.csv", [10099])
    _fails_alone(_src(root, fold=2), "10099", str(root / "test_fold_2.csv"), "no feature")
    _write_csv(root / "test_fold_2.csv", [10000])
    _fails_alone(_src(root, fold=2), "10000", "duplicate tile id", "'train' and 'test'")
    _put(root / "test_fold_2.csv", b"patch\n10001\n")
    _raises(lambda: _src(root, fold=2).list_tiles(), "'image'", "test_fold_2.csv")


# ---------------------------------------------------------------- location


def test_location_is_the_polygon_centre(base: Path) -> None:
    to_lonlat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    src = _src(base)
    for feat in _meta(base)["features"]:
        (x0, y0), _, (x1, y1) = feat["geometry"]["coordinates"][0][:3]
        lon, lat = to_lonlat.transform((x0 + x1) / 2, (y0 + y1) / 2)
        tile = src.read(TileRef(feat["id"], "train"))
        assert tile.lon == pytest.approx(lon, abs=1e-9) and tile.lat == pytest.approx(lat, abs=1e-9)
        assert -5 < tile.lon < 10 and 41 < tile.lat < 52


def test_location_reads_the_crs_member(root: Path) -> None:
    expected = _src(root).read(TileRef("10000", "train"))
    meta = _meta(root)
    del meta["crs"]  # falls back to the manifest's location_crs (EPSG:2154)
    _write_meta(root, meta)
    no_crs = _src(root).read(TileRef("10000", "train"))
    assert (no_crs.lon, no_crs.lat) == (expected.lon, expected.lat)
    to_lonlat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    for feat in meta["features"]:
        feat["geometry"]["coordinates"] = [[list(to_lonlat.transform(x, y)) for x, y in ring]
                                           for ring in feat["geometry"]["coordinates"]]
    meta["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}
    _write_meta(root, meta)
    degrees = _src(root).read(TileRef("10000", "train"))
    assert degrees.lon == pytest.approx(expected.lon, abs=1e-5)
    assert degrees.lat == pytest.approx(expected.lat, abs=1e-5)
    meta["crs"] = {"type": "name", "properties": {"name": "EPSG:999999"}}
    _write_meta(root, meta)
    _raises(lambda: _src(root).read(TileRef("10000", "train")), "'10000'", "EPSG:999999")


def test_polygon_centroid() -> None:
    square = [[700000.0, 6600000.0], [701280.0, 6600000.0], [701280.0, 6601280.0], [700000.0, 6601280.0]]
    assert polygon_centroid({"type": "Polygon", "coordinates": [square + [square[0]]]}) == (700640.0, 6600640.0)
    assert polygon_centroid({"type": "Polygon", "coordinates": [square[::-1]]}) == (700640.0, 6600640.0)
    ell = [[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]]  # 3 unit squares: centroid (5/6, 5/6)
    assert polygon_centroid({"type": "Polygon", "coordinates": [ell]}) == pytest.approx((5 / 6, 5 / 6))
    hole = [[0, 0], [4, 0], [4, 4], [0, 4]], [[2, 0], [4, 0], [4, 4], [2, 4]]  # right half removed
    assert polygon_centroid({"type": "Polygon", "coordinates": list(hole)}) == pytest.approx((1, 2))
    multi = [[[[0, 0], [1, 0], [1, 1], [0, 1]]], [[[3, 0], [4, 0], [4, 1], [3, 1]]]]
    assert polygon_centroid({"type": "MultiPolygon", "coordinates": multi}) == pytest.approx((2, 0.5))
    for bad in ({"type": "Point", "coordinates": [0, 0]}, {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]},
                {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [2, 2]]]}, None):
        with pytest.raises(ValueError):
            polygon_centroid(bad)


# ---------------------------------------------------------------- bad inputs


def _edit_props(root: Path, tile_id: str, changes: dict[str, object]) -> None:
    """Set properties of one feature (None deletes the property)."""
    meta = _meta(root)
    props = _feature(meta, tile_id)["properties"]
    for key, value in changes.items():
        if value is None:
            del props[key]
        else:
            props[key] = value
    _write_meta(root, meta)


def _dates_of(root: Path, tile_id: str, key: str) -> dict:
    value = _feature(_meta(root), tile_id)["properties"][key]
    return json.loads(value) if isinstance(value, str) else value


def _truncate(path: Path) -> None:
    _put(path, path.read_bytes()[: path.stat().st_size // 2])


def _drop_last_date(root: Path) -> None:
    table = _dates_of(root, "10001", "dates-S2")
    del table[str(len(table) - 1)]
    _edit_props(root, "10001", {"dates-S2": table})


def _bad_date(root: Path) -> None:
    table = _dates_of(root, "10001", "dates-S1A")
    table["3"] = "2018-10-03"
    _edit_props(root, "10001", {"dates-S1A": json.dumps(table)})


def _empty_series(root: Path) -> None:
    _save(root / S2.format(10001), np.zeros((0, 10, 128, 128), np.int16))
    _edit_props(root, "10001", {"dates-S2": {}})


def _label_out_of_range(root: Path) -> None:
    target = np.load(root / TARGET.format(10001))
    target[0, 5, 7] = 25
    _save(root / TARGET.format(10001), target)


def _fractional_s2(root: Path) -> None:
    data = np.load(root / S2.format(10001)).astype(np.float32)
    data[0, 0, 0, 0] += 0.5
    _save(root / S2.format(10001), data)


# (name, mutation, raised by probe too (None: either way), text the message must contain)
BAD_TILE = [
    ("missing npy", lambda r: (r / S2.format(10001)).unlink(), True, ["S2_10001.npy", "missing"]),
    ("missing tif", lambda r: (r / SPOT.format(10001)).unlink(), True, ["SPOT6_RVB_1M00_2019_10001.tif"]),
    ("missing target", lambda r: (r / TARGET.format(10001)).unlink(), True, ["TARGET_10001.npy"]),
    ("truncated npy", lambda r: _truncate(r / S1A.format(10001)), True, ["S1A_10001.npy", "truncated"]),
    ("corrupt npy", lambda r: _put(r / S1D.format(10001), b"not an npy file" * 40), True, ["S1D_10001.npy"]),
    ("corrupt tif", lambda r: _put(r / SPOT.format(10001), b"II*\x00garbage" * 40), True, ["_10001.tif"]),
    ("truncated tif", lambda r: _truncate(r / SPOT.format(10001)), None, ["_10001.tif"]),  # GDAL: header may survive
    ("wrong channels", lambda r: _save(r / S2.format(10001), np.load(r / S2.format(10001))[:, :9]), True,
     ["S2_10001.npy", "10, 128, 128"]),
    ("wrong size", lambda r: _save(r / S1D.format(10001), np.load(r / S1D.format(10001))[..., :64, :64]), True,
     ["S1D_10001.npy", "3, 128, 128"]),
    ("T != dates", _drop_last_date, True, ["S2_10001.npy", "dates-S2"]),
    ("malformed date", _bad_date, True, ["metadata.geojson", "dates-S1A", "2018-10-03"]),
    ("missing dates", lambda r: _edit_props(r, "10001", {"dates-S1D": None}), True,
     ["metadata.geojson", "dates-S1D"]),
    ("empty series", _empty_series, True, ["S2_10001.npy", "empty"]),
    ("label outside classes", _label_out_of_range, False, ["TARGET_10001.npy", "[25]"]),
    ("non-integer S2", _fractional_s2, False, ["S2_10001.npy", "int16"]),
    ("target shape", lambda r: _save(r / TARGET.format(10001), np.zeros((3, 64, 64), np.uint8)), True,
     ["TARGET_10001.npy", "128"]),
]


@pytest.mark.parametrize(("mutate", "in_probe", "needles"), [c[1:] for c in BAD_TILE], ids=[c[0] for c in BAD_TILE])
def test_bad_tile_raises_source_error(root: Path, mutate, in_probe: bool | None, needles: list[str]) -> None:
    mutate(root)
    ref = TileRef("10001", "test", 5)
    _raises(lambda: _src(root).read(ref), "tile '10001'", *needles)
    if in_probe:
        _raises(lambda: _src(root).probe(ref), "tile '10001'", *needles)
    elif in_probe is False:
        _src(root).probe(ref)  # header-level checks pass; only read() sees the values
    assert _src(root).read(TileRef("10002", "test", 5)).tile_id == "10002"  # other tiles are unaffected


def test_duplicate_id_patch(root: Path) -> None:
    meta = _meta(root)
    meta["features"][3]["properties"]["ID_PATCH"] = 10001
    _write_meta(root, meta)
    _fails_alone(_src(root), "10001", str(root / "metadata.geojson"), "duplicate ID_PATCH (features 1 and 3)")


def test_bad_fold_and_id_values(root: Path) -> None:
    _raises(lambda: _src(root).read(TileRef("55555", "train")), "tile '55555'", "metadata.geojson")
    _edit_props(root, "10001", {"Fold": 7})
    _fails_alone(_src(root), "10001", str(root / "metadata.geojson"), "Fold 7 is not one of the folds")
    _edit_props(root, "10001", {"Fold": "x"})
    _fails_alone(_src(root), "10001", str(root / "metadata.geojson"), "Fold 'x' is not an integer")
    _edit_props(root, "10001", {"ID_PATCH": "P1"})
    _raises(lambda: _src(root).list_tiles(), "metadata.geojson", "'P1'")


def test_not_a_pastis_folder(root: Path, tmp_path: Path) -> None:
    _src(root).check_layout()
    shutil.rmtree(root / "DATA_S2")
    _raises(lambda: _src(root).check_layout(), "DATA_S2")
    (root / "metadata.geojson").unlink()
    _raises(lambda: _src(root).check_layout(), "metadata.geojson")
    _raises(lambda: _src(root).list_tiles(), "metadata.geojson")
    _raises(lambda: _src(root).read(TileRef("10000", "train")), "metadata.geojson")
    _raises(lambda: _src(tmp_path / "nowhere").check_layout(), "nowhere")
    _put(root / "metadata.geojson", b"{not json")
    _raises(lambda: _src(root).list_tiles(), "metadata.geojson", "GeoJSON")


# ---------------------------------------------------------------- manifest-driven paths


def test_dates_property_comes_from_the_folder() -> None:
    assert dates_property("DATA_S2/S2_{id}.npy") == "dates-S2"
    assert dates_property("DATA_S1D/S1D_{id}.npy") == "dates-S1D"
    assert dates_property("S2/S2_{id}.npy") is None


def test_renamed_modality_keeps_its_dates(base: Path) -> None:
    text = MANIFEST.text.replace("[modalities.s2]", "[modalities.sentinel2]").replace(
        'ref_input = "s2"', 'ref_input = "sentinel2"')
    renamed = parse_manifest(text, origin="renamed.toml")
    tile = open_source(renamed, base).read(TileRef("10003", "train"))
    expected = _expected_dates(_feature(_meta(base), "10003")["properties"]["dates-S2"])
    assert np.array_equal(tile.series["sentinel2"].dates, expected)
    moved = parse_manifest(MANIFEST.text.replace('"DATA_S1A/S1A_{id}.npy"', '"S1A/S1A_{id}.npy"'), origin="m.toml")
    with pytest.raises(ManifestError, match=r"modalities\.s1_asc\.source .*DATA_<X>"):
        open_source(moved, base)  # refused when the reader is made, before any tile is read


def test_reader_survives_pickling(base: Path) -> None:
    src = _src(base)
    refs = src.list_tiles()
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read(clone.probe(refs[0])).tile_id == refs[0].tile_id
