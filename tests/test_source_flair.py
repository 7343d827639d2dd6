"""FLAIR-HUB / FLAIR#2 reader against the synthetic real-layout generator, the official toy CSVs and bad inputs."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import sqlite3
import struct
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import FLAIR_TOY_SPLITS, require
from pyproj import Transformer

from maestro_data.errors import SourceError
from maestro_data.manifest import load_manifest
from maestro_data.sources import SourceOptions, open_source
from maestro_data.sources.flair import MTD_DIR, SPLIT_GPKG, Flair2Source, FlairHubSource, split_patch_id
from maestro_data.synthetic.flair import generate, patch_square

HUB = load_manifest("flair-hub")
F2 = load_manifest("flair2")
S2_GPKG = "GLOBAL_SENTINEL2_MTD_DATES.gpkg"
AERIAL_GPKG = "GLOBAL_AERIAL_MTD_DATES.gpkg"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("flair"), tiles=6, seed=3, dataset="flair-hub", t_s2=12, t_s1=14,
                    flair_csv=True)


@pytest.fixture(scope="module")
def flair2_dataset(tmp_path_factory) -> Path:
    """With MAESTRO's {train,val,test}_flair2.csv."""
    return generate(tmp_path_factory.mktemp("flair2"), tiles=6, seed=1, dataset="flair2", t_s2=6, t_s1=6, spot=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("small"), tiles=3, seed=4, t_s2=12, t_s1=4, spot=False)


@pytest.fixture
def fresh(small, tmp_path) -> Path:
    """A private copy of a small dataset, to damage."""
    return Path(shutil.copytree(small, tmp_path / "flair-hub"))


def hub(root: Path, **opts) -> FlairHubSource:
    return open_source(HUB, root, SourceOptions(**opts))


def first_ref(root: Path):
    return hub(root).list_tiles()[0]


def table_name(con: sqlite3.Connection) -> str:
    return con.execute("SELECT table_name FROM gpkg_contents WHERE data_type = 'features'").fetchone()[0]


def sql(path: Path, query: str, args: tuple = ()) -> list[tuple]:
    """Run ``query`` on the feature table of a gpkg, written as ``{t}``."""
    con = sqlite3.connect(path)
    try:
        rows = con.execute(query.format(t=f'"{table_name(con)}"'), args).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def s2_json(root: Path) -> dict[str, dict]:
    rows = sql(root / MTD_DIR / S2_GPKG, "SELECT patch_id, acquisition_dates FROM {t}")
    return {pid: json.loads(v) for pid, v in rows}


def tif_path(root: Path, pattern: str, tile_id: str) -> Path:
    return root / pattern.format(**split_patch_id(tile_id, ""))


def rewrite_tif(path: Path, data: np.ndarray, georeferenced: bool = True) -> None:
    with rasterio.open(path) as src:
        profile = src.profile
    profile.update(count=data.shape[0], height=data.shape[1], width=data.shape[2], dtype=str(data.dtype))
    if not georeferenced:
        del profile["crs"], profile["transform"]
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


# -- reading ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiles(dataset) -> dict:
    """tile id -> (probed ref, tile) for every tile of the module dataset, read once."""
    src = hub(dataset)
    src.check_layout()
    refs = [src.probe(r) for r in src.list_tiles()]
    return {r.tile_id: (r, src.read(r)) for r in refs}


def test_every_tile_equals_the_generated_files(dataset, tiles):
    assert len(tiles) == 6
    dates = s2_json(dataset)
    for ref, tile in tiles.values():
        assert tile.tile_id == ref.tile_id and tile.split == ref.split
        assert set(tile.series) == set(HUB.modalities) and set(tile.targets) == {"cosia"}
        for name, spec in HUB.modalities.items():
            s = tile.series[name]
            with rasterio.open(tif_path(dataset, spec.source, ref.tile_id)) as f:
                raw = f.read()
            c = spec.stored_channels
            t_count = ref.counts[name]
            assert s.data.dtype == np.dtype(spec.dtype) and raw.shape[0] == t_count * c
            assert s.data.shape == (t_count, c, spec.tile_size, spec.tile_size)
            for t in range(t_count):  # band index = t * C + c: time-major
                for k in range(c):
                    np.testing.assert_array_equal(s.data[t, k], raw[t * c + k])
            if spec.cloud_mask is not None:
                with rasterio.open(tif_path(dataset, spec.cloud_mask.source, ref.tile_id)) as f:
                    mraw = f.read()
                assert s.mask.dtype == np.uint8 and s.mask.shape == (t_count, 2, 10, 10)
                np.testing.assert_array_equal(s.mask[:, 1], mraw[1::2])  # channel 1 (cloud) = odd bands
        with rasterio.open(tif_path(dataset, HUB.targets["cosia"].source, ref.tile_id)) as f:
            np.testing.assert_array_equal(tile.targets["cosia"], f.read(1))
        assert tile.targets["cosia"].shape == (512, 512) and tile.targets["cosia"].dtype == np.uint8
        js = dates[ref.tile_id]  # keys "1".."T" in band order
        got = [date(int(y), 1, 1).toordinal() + int(d) - 1 for y, d, _ in tile.series["s2"].dates]
        assert got == [date(int(v[:4]), int(v[4:6]), int(v[6:])).toordinal()
                       for v in (js[str(i)] for i in range(1, len(js) + 1))]
        np.testing.assert_array_equal(tile.ref_date, tile.series["aerial"].dates[0])


def test_probe_counts_from_tables_without_opening_tifs(dataset, monkeypatch):
    src = hub(dataset)
    refs = src.list_tiles()
    monkeypatch.setattr(rasterio, "open", lambda *a, **k: pytest.fail("probe opened a raster"))
    dates = s2_json(dataset)
    for ref in refs:
        probed = src.probe(ref)
        assert probed.counts["s2"] == len(dates[ref.tile_id])
        assert probed.counts["aerial"] == probed.counts["dem"] == 1
        assert ref.counts == {}  # probe returns a new ref


def test_dates_are_per_patch_not_per_roi(tiles):
    by_roi: dict[tuple, set] = {}
    for pid, (ref, tile) in tiles.items():
        by_roi.setdefault(tuple(pid.split("_")[:2]), set()).add(ref.counts["s2"])
        assert tile.series["s2"].data.shape[0] == ref.counts["s2"]  # each read with its own T
    assert any(len(c) > 1 for c in by_roi.values())


def test_json_keys_ordered_as_integers(fresh):
    src = hub(fresh)
    ref = src.list_tiles()[0]
    before = src.read(ref).series["s2"].dates
    js = s2_json(fresh)[ref.tile_id]
    assert len(js) >= 10 and list(js)[0] == "1"
    shuffled = {k: js[k] for k in sorted(js)}  # "1", "10", "11", ..., "2": string order != band order
    sql(fresh / MTD_DIR / S2_GPKG, "UPDATE {t} SET acquisition_dates = ? WHERE patch_id = ?",
        (json.dumps(shuffled), ref.tile_id))
    np.testing.assert_array_equal(hub(fresh).read(ref).series["s2"].dates, before)


def test_aerial_day_00_is_first_of_month(dataset, tiles):
    rows = dict(sql(dataset / MTD_DIR / AERIAL_GPKG, "SELECT patch_id, date FROM {t}"))
    zero = [pid for pid, d in rows.items() if d.endswith("00")]
    assert zero
    for pid in zero:
        first = date(int(rows[pid][:4]), int(rows[pid][4:6]), 1)
        assert tuple(tiles[pid][1].ref_date) == (first.year, first.timetuple().tm_yday, 0)


def test_location_is_the_square_centre(tiles):
    to_wgs = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    for pid, (_, tile) in tiles.items():
        left, top, side = patch_square(pid)
        lon, lat = to_wgs.transform(left + side / 2, top - side / 2)
        assert tile.lon == pytest.approx(lon, abs=1e-7) and tile.lat == pytest.approx(lat, abs=1e-7)
        assert 41 < tile.lat < 52 and -5 < tile.lon < 10  # metropolitan France


def split_column(root: Path, column: str) -> dict[str, str]:
    names = {"train": "train", "valid": "val", "test": "test"}
    rows = sql(root / MTD_DIR / SPLIT_GPKG, f"SELECT patch_id, {column} FROM {{t}}")
    return {pid: names[v] for pid, v in rows if v}


@pytest.mark.parametrize("split_set", [None, 1, 2, 5])
def test_split_set_choice(dataset, split_set):
    refs = hub(dataset, split_set=split_set).list_tiles()
    expect = split_column(dataset, f"split_{split_set or 1}")
    assert {r.tile_id: r.split for r in refs} == expect
    order = [("train", "val", "test").index(r.split) for r in refs]
    assert order == sorted(order)
    assert {r.fold for r in refs} == {0}
    assert split_set in (None, 1) or expect != split_column(dataset, "split_1")  # the sets really differ


def test_unknown_split_set_is_an_error(dataset):
    with pytest.raises(SourceError, match="split_9.*split_1"):
        hub(dataset, split_set=9).list_tiles()


def test_null_or_empty_split_value_skipped_and_counted(fresh):
    ids = sorted(split_column(fresh, "split_1"))
    sql(fresh / MTD_DIR / SPLIT_GPKG, "UPDATE {t} SET split_1 = NULL WHERE patch_id = ?", (ids[0],))
    sql(fresh / MTD_DIR / SPLIT_GPKG, "UPDATE {t} SET split_1 = '' WHERE patch_id = ?", (ids[1],))
    src = hub(fresh)
    refs = src.list_tiles()
    assert {r.tile_id for r in refs} == set(ids[2:]) and src.unsplit == 2


def test_flair2_from_split_flairchallenge(dataset):
    src = open_source(F2, dataset)
    assert isinstance(src, Flair2Source)
    src.check_layout()
    refs = src.list_tiles()
    expect = split_column(dataset, "split_flairchallenge")
    assert {r.tile_id: r.split for r in refs} == expect
    all_ids = {r.tile_id for r in hub(dataset).list_tiles()}
    assert set(expect) < all_ids and src.unsplit == len(all_ids) - len(expect)
    tile = src.read(refs[0])
    assert set(tile.series) == {"aerial", "dem", "s2"}  # no Sentinel-1 in FLAIR#2


@pytest.mark.parametrize("sep", [",", ";"])
def test_flair2_from_maestro_csvs(flair2_dataset, tmp_path, sep):
    root = Path(shutil.copytree(flair2_dataset, tmp_path / "flair-hub"))
    expect = {}
    for stage in ("train", "val", "test"):
        path = root / f"{stage}_flair2.csv"
        ids = [row[0] for row in list(csv.reader(path.read_text().splitlines()))[1:]]
        expect.update(dict.fromkeys(ids, stage))
        path.write_text(f"patch_id{sep}other\n" + "".join(f"{i}{sep}x\n" for i in ids))
    assert expect and set(expect) == set(split_column(root, "split_flairchallenge"))
    assert expect != split_column(root, "split_flairchallenge")  # the CSVs, not the gpkg column, were used
    refs = open_source(F2, root).list_tiles()
    assert {r.tile_id: r.split for r in refs} == expect


def test_flair2_missing_csv_fails_or_is_recorded(flair2_dataset, tmp_path):
    root = Path(shutil.copytree(flair2_dataset, tmp_path / "flair-hub"))
    (root / "test_flair2.csv").unlink()
    expect_error(lambda: open_source(F2, root).list_tiles(), f"{root / 'test_flair2.csv'}: split file for 'test' "
                 "not found", "--on-error skip")
    src = open_source(F2, root, SourceOptions(on_error="skip"))
    with pytest.warns(UserWarning, match="test_flair2.csv"):
        refs = src.list_tiles()
    assert refs and all(r.split != "test" for r in refs)
    assert src.layout_notes == [{"kind": "missing_split", "split": "test", "file": str(root / "test_flair2.csv"),
                                 "reason": "not found; the 'test' split is empty"}]


def test_source_pickles_without_its_tables(dataset):
    src = hub(dataset)
    refs = src.list_tiles()
    clone = pickle.loads(pickle.dumps(src))
    assert clone._tables is None
    np.testing.assert_array_equal(clone.read(refs[1]).series["s2"].data, src.read(refs[1]).series["s2"].data)


# -- bad inputs ---------------------------------------------------------------------------------------------------


def expect_error(call, *needles: str) -> SourceError:
    with pytest.raises(SourceError) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    return info.value


@pytest.mark.parametrize("what, damage, needle", [
    ("s1_asc", "delete", "not found"), ("aerial", "truncate", "unreadable"), ("cosia", "truncate", "unreadable"),
    ("dem", "garbage", "unreadable"),
])
def test_missing_or_corrupt_tif(fresh, what, damage, needle):
    ref = first_ref(fresh)
    path = tif_path(fresh, (HUB.targets | HUB.modalities)[what].source, ref.tile_id)
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncate" else b"no tiff" * 99)
    expect_error(lambda: hub(fresh).read(ref), ref.tile_id, str(path), needle)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("case", ["s2 one date short", "mask one date short", "lossy dtype", "label 19", "size",
                                  "no georeference"])
def test_bad_raster_content(fresh, case):
    ref = first_ref(fresh)
    s2, t = HUB.modalities["s2"], len(s2_json(fresh)[ref.tile_id])
    pattern, edit, needles = {
        "s2 one date short": (s2.source, lambda a: a[:-10], [f"{10 * t - 10} bands", f"T = {t}", "C = 10"]),
        "mask one date short": (s2.cloud_mask.source, lambda a: a[:-2], [f"{2 * t - 2} bands", f"T = {t}", "C = 2"]),
        "lossy dtype": (s2.source, lambda a: a.astype("float32") + 0.5, ["uint16"]),
        "label 19": (HUB.targets["cosia"].source, lambda a: np.maximum(a, 19), ["[19]", "19 classes"]),
        "size": (HUB.modalities["aerial"].source, lambda a: a[:, :256, :256], ["256x256", "512x512"]),
        "no georeference": (HUB.modalities["aerial"].source, lambda a: a, ["not georeferenced"]),
    }[case]
    path = tif_path(fresh, pattern, ref.tile_id)
    with rasterio.open(path) as f:
        raw = f.read()
    rewrite_tif(path, edit(raw), georeferenced=case != "no georeference")
    expect_error(lambda: hub(fresh).read(ref), ref.tile_id, str(path), *needles)


@pytest.mark.parametrize("value, needle", [
    ("{not json", "not valid JSON"),
    ('["20200101"]', "JSON object"),
    ('{"1": "2020-01-14"}', "not YYYYMMDD"),
    ('{"1": "20201345"}', "20201345"),
    ('{"a": "20200114"}', "integers"),
    ("{}", "empty time series"),
    (None, "empty time series"),
])
def test_malformed_or_empty_dates(fresh, value, needle):
    ref = first_ref(fresh)
    gpkg = fresh / MTD_DIR / S2_GPKG
    sql(gpkg, "UPDATE {t} SET acquisition_dates = ? WHERE patch_id = ?", (value, ref.tile_id))
    src = hub(fresh)
    expect_error(lambda: src.probe(ref), ref.tile_id, str(gpkg), needle)
    expect_error(lambda: src.read(ref), ref.tile_id, needle)
    assert src.probe(src.list_tiles()[1]).counts["s2"] > 0  # only that tile fails


@pytest.mark.parametrize("gpkg, query, needle", [
    (AERIAL_GPKG, "UPDATE {t} SET date = '2020071' WHERE patch_id = ?", "YYYYMMDD"),
    ("GLOBAL_SENTINEL1-DESC_MTD_DATES.gpkg", "DELETE FROM {t} WHERE patch_id = ?", "no row"),
])
def test_bad_single_date_or_missing_row(fresh, gpkg, query, needle):
    ref = first_ref(fresh)
    sql(fresh / MTD_DIR / gpkg, query, (ref.tile_id,))
    expect_error(lambda: hub(fresh).probe(ref), ref.tile_id, str(fresh / MTD_DIR / gpkg), needle)


def test_duplicate_patch_id_in_a_date_table(fresh):
    ref = first_ref(fresh)
    sql(fresh / MTD_DIR / S2_GPKG, "INSERT INTO {t} (geom, patch_id, acquisition_dates) "
        "SELECT geom, patch_id, acquisition_dates FROM {t} WHERE patch_id = ?", (ref.tile_id,))
    expect_error(lambda: hub(fresh).probe(ref), ref.tile_id, S2_GPKG, "more than once")


def fails_alone(src, pid: str, *needles: str) -> None:
    """``pid`` is listed but its probe and read raise (naming it and every needle); every other tile probes."""
    refs = src.list_tiles()
    bad = [r for r in refs if r.tile_id == pid]
    assert len(bad) == 1, "a tile with a bad split row is listed once, to fail alone"
    expect_error(lambda: src.probe(bad[0]), pid, *needles)
    expect_error(lambda: src.read(bad[0]), pid, *needles)
    assert all(src.probe(r).counts["s2"] > 0 for r in refs if r.tile_id != pid)


def test_duplicate_patch_id_across_flair2_csvs(flair2_dataset, tmp_path):
    root = Path(shutil.copytree(flair2_dataset, tmp_path / "flair-hub"))
    pid = next(r[0] for r in csv.reader((root / "train_flair2.csv").read_text().splitlines()[1:]))
    with open(root / "test_flair2.csv", "a") as fh:
        fh.write(pid + "\n")
    fails_alone(open_source(F2, root), pid, "duplicate tile id", "'train' and 'test'", "test_flair2.csv")


@pytest.mark.parametrize("query, fid, needles", [
    ("UPDATE {t} SET split_1 = 'training' WHERE fid = 1", 1, ["'training'", "train/valid/test"]),
    ("UPDATE {t} SET patch_id = 'D006-2020_FF_S1_14_5-5' WHERE fid = 1", 1, ["malformed"]),
    ("UPDATE {t} SET patch_id = (SELECT patch_id FROM {t} WHERE fid = 2) WHERE fid = 1", 2, ["duplicate"]),
])
def test_bad_split_row_fails_that_tile_only(fresh, query, fid, needles):
    gpkg = fresh / MTD_DIR / SPLIT_GPKG
    sql(gpkg, query)
    pid = sql(gpkg, "SELECT patch_id FROM {t} WHERE fid = ?", (fid,))[0][0]
    fails_alone(hub(fresh), pid, str(gpkg), *needles)


def test_layout_checks(fresh, tmp_path):
    for folder in fresh.glob("*_SENTINEL1-DESC_TS"):
        shutil.rmtree(folder)
    expect_error(lambda: hub(fresh).check_layout(), "s1_des", "SENTINEL1-DESC_TS")
    open_source(F2, fresh).check_layout()  # FLAIR#2 does not need Sentinel-1
    (fresh / MTD_DIR / S2_GPKG).unlink()
    expect_error(lambda: open_source(F2, fresh).check_layout(), S2_GPKG)
    shutil.rmtree(fresh / MTD_DIR)
    expect_error(lambda: hub(fresh).check_layout(), str(fresh), "not a FLAIR-HUB folder", "GLOBAL_ALL_MTD", SPLIT_GPKG)
    expect_error(lambda: hub(tmp_path / "nowhere").check_layout(), "not a directory")


def test_corrupt_geopackage(fresh):
    gpkg = fresh / MTD_DIR / S2_GPKG
    gpkg.write_bytes(b"garbage" * 1000)
    expect_error(lambda: hub(fresh).list_tiles(), str(gpkg), "GeoPackage")


# -- generator and the real layout -----------------------------------------------------------------------------------


def _envelope(blob: bytes) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a GeoPackage geometry blob's header envelope (spec 2.1.3), read independently
    of the generator that wrote it."""
    assert blob[:2] == b"GP", "missing the GeoPackage blob magic"
    flags = blob[3]
    assert (flags >> 1) & 0b111 == 1, "expected an xy envelope"
    minx, maxx, miny, maxy = struct.unpack_from("<4d" if flags & 1 else ">4d", blob, 8)
    return minx, miny, maxx, maxy


def test_geopackages_are_real_geopackages(dataset):
    for gpkg in sorted((dataset / MTD_DIR).glob("*.gpkg")):
        con = sqlite3.connect(gpkg)
        assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
        t = table_name(con)
        assert con.execute("SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = ?", (t,)).fetchone() == (2154,)
        assert con.execute("SELECT organization FROM gpkg_spatial_ref_sys WHERE srs_id = 2154").fetchone() == ("EPSG",)
        for pid, blob in con.execute(f'SELECT patch_id, geom FROM "{t}"'):
            with rasterio.open(tif_path(dataset, HUB.modalities["aerial"].source, pid)) as f:
                assert _envelope(blob) == pytest.approx(tuple(f.bounds), abs=1e-6)
        con.close()


def test_generated_rasters_follow_the_real_conventions(dataset, tiles):
    pid = first_ref(dataset).tile_id
    with rasterio.open(tif_path(dataset, HUB.modalities["s2"].source, pid)) as f:
        assert f.crs.to_epsg() == 2154 and f.res == pytest.approx((10.24, 10.24))
    with rasterio.open(tif_path(dataset, HUB.modalities["s2"].cloud_mask.source, pid)) as f:
        mask = f.read()
        assert mask.dtype == np.uint8 and mask.max() <= 100
    with rasterio.open(tif_path(dataset, HUB.targets["cosia"].source, pid)) as f:
        assert f.count == 1 and f.read().max() <= 18
    read = [t for _, t in tiles.values()]
    assert any(np.isnan(t.series[m].data).any() for t in read for m in ("s1_asc", "s1_des"))  # kept as NaN
    dem = read[0].series["dem"].data[0]
    assert dem.dtype == np.float32 and (dem[0] > dem[1]).all()  # DSM above DTM
    spot = dataset / f"{pid.split('_')[0]}_SPOT_RGBI"
    assert len(list(spot.glob("*/*.tif"))) >= 1


def test_official_style_csvs_point_at_files(dataset):
    rows = 0
    for path in sorted((dataset / "csv").glob("*.csv")):
        for row in csv.DictReader(path.open()):
            rows += 1
            for col, rel in row.items():
                if col != "patch_id":
                    assert (path.parent / rel).resolve().is_file()
    assert rows == 6


def test_manifest_patterns_match_the_official_toy_csv_paths():
    folder = require(FLAIR_TOY_SPLITS)
    patterns = {m.source for m in HUB.modalities.values()} | {HUB.modalities["s2"].cloud_mask.source}
    patterns |= {t.source for t in HUB.targets.values()} | {m.source for m in F2.modalities.values()}
    checked = 0
    for path in sorted(folder.glob("*.csv")):
        for row in csv.DictReader(path.open()):
            keys = split_patch_id(row["patch_id"], str(path))
            for pattern in patterns:
                mod = pattern.split("/")[0].removeprefix("{domain}_")
                assert row[mod] == "../" + pattern.format(**keys), (path, row["patch_id"], mod)
                checked += 1
    assert checked >= 250 * 7


def test_fast_band_read_equals_the_public_read_and_falls_back(dataset, monkeypatch):
    """read_all_bands goes through rasterio's private reader for speed; it must equal src.read(), and a rasterio
    whose private reader changed must still be read through the public path."""
    from maestro_data.sources.geotiff import read_all_bands

    path = next(dataset.glob("*_SENTINEL2_TS/*/*.tif"))
    with rasterio.open(path) as src:
        fast = read_all_bands(src, "s2", "t", path)
        np.testing.assert_array_equal(fast, src.read())
        assert fast.dtype == src.read().dtype

        original = type(src)._read

        def changed(self, *args, **kwargs):  # rejects the positional-only call read_all_bands makes
            if not kwargs:
                raise TypeError("unexpected signature")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(src), "_read", changed)
        np.testing.assert_array_equal(read_all_bands(src, "s2", "t", path), fast)
