"""TreeSatAI-TS reader: synthetic layouts read back exactly, the real tiles, and every bad input."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from conftest import real_split_counts
from pyproj import Transformer

from maestro_data.errors import SourceError
from maestro_data.manifest import load_manifest
from maestro_data.sources import SourceOptions, open_source
from maestro_data.sources.treesatai_ts import TreeSatAITSSource
from maestro_data.synthetic.treesatai_ts import MAESTRO_GENERA, generate

MANIFEST = load_manifest("treesatai-ts")
TARGET = next(iter(MANIFEST.targets.values()))
H5_NAMES = ("sen-1-asc-data", "sen-1-asc-products", "sen-1-des-data", "sen-1-des-products", "sen-2-data",
            "sen-2-masks", "sen-2-products")


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("tsai"), tiles=8, seed=0)


@pytest.fixture
def fresh(tmp_path) -> Path:
    """A small dataset a test may damage."""
    return generate(tmp_path, tiles=3, seed=1)


def source(root: Path, on_error: str = "fail") -> TreeSatAITSSource:
    return open_source(MANIFEST, root, SourceOptions(on_error=on_error))


def stamp_date(name: str, token: int) -> tuple[int, int, int]:
    t = datetime.strptime(name.split("_")[token], "%Y%m%dT%H%M%S")
    return t.year, t.timetuple().tm_yday, t.hour


def expected_from_files(root: Path, ref) -> dict:
    """What the tile must hold, read straight from its files with h5py/rasterio."""
    out = {}
    with rasterio.open(root / "aerial" / ref.keys["aerial_name"]) as src:
        out["aerial"] = src.read()[:, 2:302, 2:302]
        b = src.bounds
        tr = Transformer.from_crs(src.crs.to_wkt(), "EPSG:4326", always_xy=True)
        out["lonlat"] = tr.transform((b.left + b.right) / 2, (b.bottom + b.top) / 2)
    with h5py.File(root / "sentinel-ts" / ref.keys["sen_name"], "r") as f:
        for key, ds, tok in (("s2", "sen-2", 2), ("s1_asc", "sen-1-asc", 4), ("s1_des", "sen-1-des", 4)):
            out[key] = f[f"{ds}-data"][()]
            out[key + "_dates"] = [stamp_date(p.decode(), tok) for p in f[f"{ds}-products"][()]]
        out["s2_mask"] = f["sen-2-masks"][()]
    return out


def check_tile(root: Path, src: TreeSatAITSSource, ref) -> None:
    probed = src.probe(ref)
    tile = src.read(probed)
    exp = expected_from_files(root, ref)
    assert probed.counts == {"aerial": 1, **{k: len(exp[k]) for k in ("s2", "s1_asc", "s1_des")}}
    aerial = tile.series["aerial"]
    assert aerial.data.dtype == np.uint8 and aerial.data.shape == (1, 4, 300, 300)
    np.testing.assert_array_equal(aerial.data[0], exp["aerial"])
    s2 = tile.series["s2"]
    assert s2.data.dtype == np.uint16 and s2.mask.dtype == np.float32
    np.testing.assert_array_equal(s2.data.astype(np.float32), exp["s2"])
    np.testing.assert_array_equal(s2.mask, exp["s2_mask"][:, :2])  # lossless, residues of 1e-22 included
    for key in ("s2", "s1_asc", "s1_des"):
        np.testing.assert_array_equal(tile.series[key].dates, np.array(exp[key + "_dates"], dtype=np.int16))
    for key in ("s1_asc", "s1_des"):
        data = tile.series[key].data
        assert data.dtype == np.float32
        np.testing.assert_array_equal(data.view(np.uint32), exp[key].view(np.uint32))  # bit-equal, NaNs too
    year = int(ref.keys["aerial_date"][:4])
    july1 = datetime(year, 7, 1).timetuple().tm_yday
    np.testing.assert_array_equal(tile.ref_date, np.array([year, july1, 0], np.int16))
    np.testing.assert_array_equal(aerial.dates, tile.ref_date[None])
    assert tile.lon == pytest.approx(exp["lonlat"][0], abs=1e-9)
    assert tile.lat == pytest.approx(exp["lonlat"][1], abs=1e-9)


# ----- synthetic ---------------------------------------------------------------------------------------------
def test_synthetic_every_tile_reads_as_written(syn):
    src = source(syn)
    src.check_layout()
    refs = src.list_tiles()
    assert len(refs) == 8 and {r.split for r in refs} == {"train", "val", "test"}
    for ref in refs:
        check_tile(syn, src, ref)
        assert 6.5 < src.read(ref).lon < 11.7 and 51.2 < src.read(ref).lat < 54.0  # Lower Saxony


def test_targets_follow_the_csv_by_column_name(syn):
    header = (syn / "train.csv").read_text().splitlines()[0].split(",")
    assert tuple(header[3:]) == MAESTRO_GENERA and list(MAESTRO_GENERA) != sorted(MAESTRO_GENERA)
    src = source(syn)
    for ref in src.list_tiles():
        row = next(line.split(",") for line in (syn / f"{ref.split}.csv").read_text().splitlines()
                   if line.startswith(ref.keys["aerial_name"] + ","))
        by_name = dict(zip(header[3:], map(float, row[3:]), strict=True))
        target = src.read(ref).targets[TARGET.name]
        assert target.dtype == np.float32 and target.shape == (len(TARGET.classes),)
        np.testing.assert_array_equal(target, np.array([by_name[c] for c in TARGET.classes], np.float32))


def test_release_layout_lists_the_same_tiles_and_labels(syn, tmp_path):
    via_csv = source(syn).list_tiles()
    release = tmp_path / "release"
    shutil.copytree(syn, release, ignore=shutil.ignore_patterns("*.csv"))
    src = source(release)
    src.check_layout()
    via_lst = src.list_tiles()
    assert [(r.tile_id, r.split, r.keys) for r in via_lst] == [(r.tile_id, r.split, r.keys) for r in via_csv]
    for name in ("train", "val", "test"):  # the lists may also sit in the root (OmniSat/AnySat layout)
        (release / "split" / f"{name}_filenames.lst").rename(release / f"{name}_filenames.lst")
    assert [r.keys for r in source(release).list_tiles()] == [r.keys for r in via_csv]
    ref = via_lst[0]
    np.testing.assert_array_equal(source(release).read(ref).targets[TARGET.name],
                                  source(syn).read(via_csv[0]).targets[TARGET.name])
    check_tile(release, src, ref)


def test_generator_layout_choice(tmp_path):
    only_release = generate(tmp_path / "r", tiles=3, seed=2, layout="release")
    only_csv = generate(tmp_path / "c", tiles=3, seed=2, layout="csv")
    assert not list(only_release.glob("*.csv")) and not (only_csv / "labels").exists()
    assert [r.keys for r in source(only_release).list_tiles()] == [r.keys for r in source(only_csv).list_tiles()]
    with pytest.raises(ValueError, match="layout"):
        generate(tmp_path / "x", tiles=1, layout="zip")


def test_duplicated_s1_frames_nans_and_zeros_are_kept(syn):
    src = source(syn)
    seen = nan = zero = 0
    for ref in src.list_tiles():
        tile = src.read(ref)
        for key in ("s1_asc", "s1_des"):
            nan += int(np.isnan(tile.series[key].data).sum())
            zero += int((tile.series[key].data == 0).sum())
        des = tile.series["s1_des"]
        day = [tuple(d[:2]) for d in des.dates.tolist()]
        for k in range(1, len(day)):
            if day[k] == day[k - 1]:
                seen += 1
                assert des.data[k].tobytes() == des.data[k - 1].tobytes()
    assert seen > 10 and nan > 0 and zero > 0  # check_tile proves they equal the file bit for bit


def test_ten_channel_mask_is_cut_to_snow_and_cloud(syn):
    src = source(syn)
    ten = 0
    for ref in src.list_tiles():
        with h5py.File(syn / "sentinel-ts" / ref.keys["sen_name"], "r") as f:
            raw = f["sen-2-masks"][()]
        mask = src.read(ref).series["s2"].mask
        assert mask.shape == (len(raw), 2, 6, 6)
        if raw.shape[1] == 10:
            ten += 1
            assert not raw[:, 2:].any()
            np.testing.assert_array_equal(mask, raw[:, :2])
    assert ten == 1


def test_generator_reproduces_the_real_file_format(syn):
    tif = next((syn / "aerial").glob("*.tif"))
    with rasterio.open(tif) as src:
        assert (src.count, src.height, src.width, src.dtypes[0]) == (4, 304, 304, "uint8")
        assert src.crs.to_epsg() == 25832 and src.res == pytest.approx((0.2, 0.2))
        assert [c.name for c in src.colorinterp] == ["red", "green", "blue", "alpha"]
        assert src.compression is None and src.interleaving.name == "pixel" and src.nodata is None
    matches = list((syn / "sentinel-ts").glob(f"{tif.stem}_*.h5"))  # one <IMG_ID>_<YYYY>.h5 per aerial tile
    assert len(matches) == 1 and len(matches[0].stem.rsplit("_", 1)[1]) == 4
    h5 = matches[0]
    with h5py.File(h5, "r") as f:
        assert tuple(sorted(f)) == H5_NAMES and not dict(f.attrs)
        for name in H5_NAMES:
            if name.endswith("products"):
                assert h5py.check_string_dtype(f[name].dtype).encoding == "utf-8"
                assert isinstance(f[name][0], bytes)
            else:
                assert f[name].dtype == np.float32 and f[name].shape[2:] == (6, 6)
        s2 = f["sen-2-data"][()]
        assert s2.min() >= 1 and s2.max() <= 18000 and np.array_equal(s2, np.round(s2))


def test_generator_is_deterministic(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(generate(tmp_path / "a", tiles=2, seed=5)), files(generate(tmp_path / "b", tiles=2, seed=5))
    assert a == b
    assert files(generate(tmp_path / "c", tiles=2, seed=6)) != a


# ----- real tiles --------------------------------------------------------------------------------------------
def test_real_sample_tile(real_sample):
    """The real folder holds train.csv only: an error by default, two empty splits on record under skip."""
    with pytest.raises(SourceError) as info:
        source(real_sample).list_tiles()
    assert f"{real_sample / 'val.csv'}: split file for 'val' not found" in str(info.value)
    assert f"{real_sample / 'test.csv'}: split file for 'test' not found" in str(info.value)
    src = source(real_sample, on_error="skip")
    src.check_layout()
    with pytest.warns(UserWarning) as record:
        refs = src.list_tiles()
    assert sorted(str(w.message).split("split file for ")[1][:6] for w in record) == ["'test'", "'val' "]
    assert [(n["split"], n["file"]) for n in src.layout_notes] == [("val", str(real_sample / "val.csv")),
                                                                   ("test", str(real_sample / "test.csv"))]
    assert [(r.tile_id, r.split) for r in refs] == [("Betula_spec._1_15679_WEFL_NLF", "train")]
    ref = src.probe(refs[0])
    assert ref.counts == {"aerial": 1, "s2": 146, "s1_asc": 115, "s1_des": 235}
    check_tile(real_sample, src, ref)
    tile = src.read(ref)
    assert tile.lon == pytest.approx(7.9353, abs=1e-3) and tile.lat == pytest.approx(52.9113, abs=1e-3)
    with h5py.File(real_sample / "sentinel-ts" / ref.keys["sen_name"], "r") as f:
        s2_name, des_names = f["sen-2-products"][0].decode(), [p.decode() for p in f["sen-1-des-products"][:2]]
        assert np.isnan(f["sen-1-des-data"][()]).any()
    assert s2_name.split("_")[2] == "20190103T104431"
    np.testing.assert_array_equal(tile.series["s2"].dates[0], [2019, 3, 10])  # 2019-01-03 10:44
    assert [n.split("_")[4] for n in des_names] == ["20190103T054940", "20190103T054945"]
    np.testing.assert_array_equal(tile.series["s1_des"].dates[:2], [[2019, 3, 5], [2019, 3, 5]])
    np.testing.assert_array_equal(tile.series["s1_des"].data[0].view(np.uint32),
                                  tile.series["s1_des"].data[1].view(np.uint32))
    expected = {"Betula": 0.72542, "Quercus": 0.04406, "Picea": 0.10447}
    np.testing.assert_array_equal(tile.targets[TARGET.name],
                                  np.array([expected.get(c, 0.0) for c in TARGET.classes], np.float32))


@pytest.mark.filterwarnings("ignore:.*split file for")  # the committed one-tile folder has train.csv only
def test_real_mini_lists_the_split_csv_tiles_and_reads_them(real_mini):
    """Two tiles per split in ../shared's six-tile folder; the committed real tile (train only) on a fresh clone."""
    counts = real_split_counts(real_mini)
    assert sum(counts.values()) >= 1
    src = source(real_mini, on_error="skip")
    refs = src.list_tiles()
    assert {s: sum(r.split == s for r in refs) for s in counts} == counts
    for ref in refs:
        check_tile(real_mini, src, ref)


# ----- bad inputs --------------------------------------------------------------------------------------------
def first(root: Path):
    ref = source(root).list_tiles()[0]
    return ref, root / "aerial" / ref.keys["aerial_name"], root / "sentinel-ts" / ref.keys["sen_name"]


def fails(root: Path, ref, *words: str, probe: bool = True) -> None:
    """probe (if asked) and read both raise a SourceError naming the tile and every word."""
    calls = [source(root).read] + ([source(root).probe] if probe else [])
    for call in calls:
        with pytest.raises(SourceError) as info:
            call(ref)
        for word in (ref.tile_id, *words):
            assert word in str(info.value), (word, str(info.value))


def fails_alone(root: Path, tile_id: str, *words: str) -> None:
    """``tile_id`` is listed once but its probe and read raise naming it and every word; the other tiles read."""
    src = source(root)
    refs = src.list_tiles()
    bad = [r for r in refs if r.tile_id == tile_id]
    assert len(bad) == 1, [r.tile_id for r in refs]
    fails(root, bad[0], *words)
    assert all(src.read(src.probe(r)).tile_id == r.tile_id for r in refs if r.tile_id != tile_id)


def rewrite(h5: Path, name: str, value: np.ndarray | None) -> None:
    with h5py.File(h5, "r+") as f:
        del f[name]
        if value is not None:
            dtype = h5py.string_dtype("utf-8") if value.dtype == object else value.dtype
            f.create_dataset(name, data=value, dtype=dtype)


def test_missing_files(fresh):
    ref, tif, h5 = first(fresh)
    tif.unlink()
    fails(fresh, ref, tif.name, "missing GeoTIFF")
    ref = source(fresh).list_tiles()[1]
    h5 = fresh / "sentinel-ts" / ref.keys["sen_name"]
    h5.unlink()
    fails(fresh, ref, h5.name, "missing Sentinel time-series HDF5")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_files(fresh, damage):
    ref, tif, h5 = first(fresh)
    for path in (tif, h5):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00not a raster" * 50)
    with pytest.raises(SourceError, match="truncated or corrupt") as info:
        source(fresh).read(ref)
    assert ref.tile_id in str(info.value) and tif.name in str(info.value)
    tif.unlink()
    shutil.copy(fresh / "aerial" / source(fresh).list_tiles()[1].keys["aerial_name"], tif)
    fails(fresh, ref, h5.name, "truncated or corrupt")


def test_wrong_aerial_size(fresh):
    ref, tif, _ = first(fresh)
    with rasterio.open(tif) as src:
        profile, data = src.profile, src.read()
    profile.update(width=300, height=300)
    with rasterio.open(tif, "w", **profile) as dst:
        dst.write(data[:, :300, :300])
    fails(fresh, ref, tif.name, "304x304", probe=False)


@pytest.mark.parametrize("name", ["sen-1-asc-products", "sen-2-masks", "sen-1-des-data"])
def test_missing_hdf5_dataset(fresh, name):
    ref, _, h5 = first(fresh)
    rewrite(h5, name, None)
    fails(fresh, ref, h5.name, name, probe=name != "sen-2-masks")


def test_products_do_not_match_the_data(fresh):
    ref, _, h5 = first(fresh)
    with h5py.File(h5, "r") as f:
        names = f["sen-2-products"][()]
    rewrite(h5, "sen-2-products", names[:-1])
    fails(fresh, ref, h5.name, "sen-2-products", str(len(names) - 1))


@pytest.mark.parametrize(("product", "words"), [
    ("garbage", ["'garbage'", "token 2"]),
    ("S2A_MSIL2A_20191332T104431_N0211_R008_T32UMD_20190103T115449", ["20191332"]),
])
def test_malformed_product_names(fresh, product, words):
    ref, _, h5 = first(fresh)
    with h5py.File(h5, "r") as f:
        names = f["sen-2-products"][()]
    names[3] = product.encode()
    rewrite(h5, "sen-2-products", names.astype(object))
    fails(fresh, ref, h5.name, "sen-2-products", *words, probe=False)


def test_empty_time_series(fresh):
    ref, _, h5 = first(fresh)
    rewrite(h5, "sen-1-asc-data", np.zeros((0, 2, 6, 6), np.float32))
    rewrite(h5, "sen-1-asc-products", np.array([], dtype=object))
    fails(fresh, ref, h5.name, "s1_asc")
    with pytest.raises(SourceError, match="empty time series"):
        source(fresh).read(ref)


def test_non_integer_s2_cannot_be_stored_as_uint16(fresh):
    ref, _, h5 = first(fresh)
    with h5py.File(h5, "r") as f:
        data = f["sen-2-data"][()]
    data[0, 0, 0, 0] += 0.5
    rewrite(h5, "sen-2-data", data)
    fails(fresh, ref, h5.name, "non-integer", "uint16", probe=False)


def test_duplicate_tile_across_splits(fresh):
    train = (fresh / "train.csv").read_text().splitlines()
    (fresh / "val.csv").write_text("\n".join((fresh / "val.csv").read_text().splitlines() + train[1:2]))
    tile_id = train[1].split(".tif,")[0]
    fails_alone(fresh, tile_id, "duplicate tile id (listed in splits 'train' and 'val')", str(fresh))


def test_not_a_treesatai_folder(tmp_path, fresh):
    with pytest.raises(SourceError, match="not a folder"):
        source(tmp_path / "nothing").check_layout()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="missing aerial/, sentinel-ts/"):
        source(tmp_path / "empty").check_layout()
    (tmp_path / "other" / "aerial").mkdir(parents=True)
    with pytest.raises(SourceError, match="missing sentinel-ts/"):
        source(tmp_path / "other").check_layout()
    for table in [*fresh.glob("*.csv"), *fresh.glob("split/*.lst")]:
        table.unlink()
    with pytest.raises(SourceError, match="no split table.*train.csv"):
        source(fresh).check_layout()


def edit_csv(root: Path, edit) -> tuple[Path, list[list[str]]]:
    path = root / "train.csv"
    rows = edit([line.split(",") for line in path.read_text().splitlines()])
    path.write_text("\n".join(",".join(r) for r in rows))
    return path, rows


@pytest.mark.parametrize(("edit", "words"), [
    (lambda rows: [r[:-1] for r in rows], ["missing ['Populus']"]),
    (lambda rows: [r + (["Ulmus"] if i == 0 else ["0.0"]) for i, r in enumerate(rows)], ["['Ulmus']"]),
])
def test_csv_genus_columns_must_match_the_manifest(fresh, edit, words):
    path, _ = edit_csv(fresh, edit)
    with pytest.raises(SourceError) as info:
        source(fresh).list_tiles()
    for word in (path.name, *words):
        assert word in str(info.value)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "abc"])
def test_bad_fractions(fresh, value):
    path, rows = edit_csv(fresh, lambda rows: [*rows[:1], [*rows[1][:3], value, *rows[1][4:]], *rows[2:]])
    words = ["is not a number"] if value == "abc" else ["outside [0, 1]", f"('Betula', {float(value)})"]
    fails_alone(fresh, rows[1][0].removesuffix(".tif"), f"{path}:2", *words)


def release_only(root: Path) -> Path:
    for table in root.glob("*.csv"):
        table.unlink()
    return root


def test_release_time_series_must_be_unique(fresh):
    src = source(release_only(fresh))
    ref = src.list_tiles()[0]
    h5 = fresh / "sentinel-ts" / ref.keys["sen_name"]
    shutil.copy(h5, h5.with_name(f"{ref.tile_id}_2099.h5"))
    ref = src.list_tiles()[0]
    assert ref.keys["sen_name"] == ""
    fails(fresh, ref, "expected exactly one", "found 2")
    for extra in (fresh / "sentinel-ts").glob(f"{ref.tile_id}_*.h5"):
        extra.unlink()
    fails(fresh, src.list_tiles()[0], "found 0")


def test_release_labels_and_years_are_checked(fresh):
    release_only(fresh)
    labels = fresh / "labels" / "TreeSatBA_v9_60m_multi_labels.json"
    text = labels.read_text()
    genus = text.split('[["')[1].split('"')[0]
    labels.write_text(text.replace(f'[["{genus}"', '[["Ulmus"', 1))
    first_label = text.split('"')[1].removesuffix(".tif")
    fails_alone(fresh, first_label, str(labels), "'Ulmus' is outside the manifest's classes")
    labels.write_text(text)
    years = fresh / "geojson" / "bb_60m.GeoJSON"
    years.write_text(years.read_text().replace('"IMG_ID"', '"ID"'))
    with pytest.raises(SourceError, match="IMG_ID and YEAR"):
        source(fresh).list_tiles()
    years.unlink()
    with pytest.raises(SourceError, match="bb_60m.GeoJSON"):
        source(fresh).list_tiles()


@pytest.mark.filterwarnings("ignore:.*split file for")
def test_integer_mask_manifest_keeps_the_official_validity_rule(real_mini):
    """A manifest copy that stores masks as uint8 rounds the real files' 1e-22..1e-8 residues up, so
    "mask > 0" still decides exactly as on the raw values."""
    from maestro_data.manifest import parse_manifest

    text = load_manifest("treesatai-ts").text.replace(
        'dtype = "float32"                # integer percentages', 'dtype = "uint8"  # integer percentages')
    manifest = parse_manifest(text)
    assert manifest.modalities["s2"].cloud_mask.dtype == "uint8"
    src = TreeSatAITSSource(manifest, real_mini, SourceOptions(on_error="skip"))
    refs = src.list_tiles()
    assert len(refs) == sum(real_split_counts(real_mini).values()) >= 1
    for ref in refs:
        mask = src.read(src.probe(ref)).series["s2"].mask
        with h5py.File(real_mini / "sentinel-ts" / ref.keys["sen_name"]) as f:
            raw = f["sen-2-masks"][()][:, :2]
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, np.ceil(raw))
        np.testing.assert_array_equal(mask > 0, raw > 0)
