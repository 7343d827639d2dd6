"""Issue #11: every grid of a tile covers one footprint, the grids are captured in Tile.grids, and a tile whose file
is off its footprint fails alone, naming both files and the offset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from sourcekit import assert_others_unchanged, build_fails, build_skips, damaged_copy

from maestro_data.errors import SourceError
from maestro_data.manifest import load_manifest
from maestro_data.sources import SourceOptions, open_source
from maestro_data.sources.flair import split_patch_id
from maestro_data.sources.grids import (
    check_coregistered,
    footprint_bounds,
    grid_bounds,
    misregistration,
    normalise_crs,
    same_crs,
    window_grid,
)
from maestro_data.synthetic import generate
from maestro_data.synthetic.treesatai_ts import AERIAL_CRS_WKT
from maestro_data.tile import Grid

HUB, PASTIS, TSAI = load_manifest("flair-hub"), load_manifest("pastis-hd"), load_manifest("treesatai-ts")


# ----- the rule --------------------------------------------------------------------------------------------------
def test_crs_equality_is_pyproj_s_after_normalising():
    assert normalise_crs(AERIAL_CRS_WKT) == "EPSG:25832"  # the real files' unnamed WKT
    assert same_crs(normalise_crs(AERIAL_CRS_WKT), "EPSG:25832")
    assert not same_crs("EPSG:25832", "EPSG:32632")  # same zone, other datum: not equal
    assert normalise_crs("urn:ogc:def:crs:EPSG::2154") == "EPSG:2154"


def test_tolerance_is_half_a_pixel_of_the_coarser_grid():
    fine = Grid("EPSG:2154", (0.2, 0.0, 1000.0, 0.0, -0.2, 2000.0), 512, 512)  # 102.4 m
    coarse = Grid("EPSG:2154", (10.24, 0.0, 1000.0, 0.0, -10.24, 2000.0), 10, 10)
    shifted = Grid("EPSG:2154", (10.24, 0.0, 1005.0, 0.0, -10.24, 2000.0), 10, 10)
    assert misregistration(fine, coarse) is None
    assert misregistration(fine, shifted) is None  # 5 m < 5.12 m
    beyond = Grid("EPSG:2154", (10.24, 0.0, 1005.2, 0.0, -10.24, 2000.0), 10, 10)
    assert misregistration(fine, beyond) == "bounds 5.20 m apart (tolerance 5.12 m: half a pixel of the coarser grid)"
    fine_shift = Grid("EPSG:2154", (0.2, 0.0, 1000.2, 0.0, -0.2, 2000.0), 512, 512)
    assert "0.20 m apart (tolerance 0.10 m" in misregistration(fine, fine_shift)
    assert "differs from EPSG:2154" in misregistration(fine, Grid("EPSG:3857", fine.transform, 512, 512))
    assert "not georeferenced" in misregistration(fine, Grid(None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 512, 512))
    with pytest.raises(SourceError) as info:
        check_coregistered(fine, "a.tif", "modality aerial", beyond, "b.tif", "modality s2", "T1")
    assert str(info.value) == ("tile 'T1': b.tif: modality s2 is not co-registered with modality aerial (a.tif): "
                               "bounds 5.20 m apart (tolerance 5.12 m: half a pixel of the coarser grid)")


def test_window_grid_and_reprojected_footprints():
    grid = Grid("EPSG:25832", (0.2, 0.0, 428370.0, 0.0, -0.2, 5862962.2), 304, 304)
    crop = window_grid(grid, 2, 2, 300, 300)
    assert grid_bounds(crop) == pytest.approx((428370.4, 5862901.8, 428430.4, 5862961.8))
    square = np.array([[428370.4, 5862901.8], [428430.4, 5862901.8], [428430.4, 5862961.8], [428370.4, 5862961.8]])
    lonlat = np.column_stack(Transformer.from_crs("EPSG:25832", "OGC:CRS84", always_xy=True).transform(*square.T))
    # the vertices are reprojected, so a square comes back to itself (its lon/lat envelope would not)
    assert footprint_bounds(lonlat, "OGC:CRS84", "EPSG:25832") == pytest.approx(grid_bounds(crop), abs=1e-6)


# ----- FLAIR-HUB ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flair(tmp_path_factory) -> Path:
    return generate("flair-hub", tmp_path_factory.mktemp("flair"), tiles=4, seed=2, t_s2=5, t_s1=5, spot=False)


def flair_file(root: Path, source: str, pid: str) -> Path:
    return root / source.format(**split_patch_id(pid, ""))


def edit_tif(path: Path, *, dx: float = 0.0, crs: str | None = None) -> None:
    with rasterio.open(path, "r+") as dst:
        if dx:
            dst.transform = Affine.translation(dx, 0) @ dst.transform
        if crs is not None:
            dst.crs = rasterio.crs.CRS.from_user_input(crs)


def test_flair_grids_are_each_file_s_georeference(flair):
    src = open_source(HUB, flair)
    ref = src.list_tiles()[0]
    tile = src.read(ref)
    assert set(tile.grids) == set(HUB.modalities) | set(HUB.targets)
    for name, spec in (HUB.modalities | HUB.targets).items():
        with rasterio.open(flair_file(flair, spec.source, ref.tile_id)) as f:
            assert tile.grids[name] == Grid("EPSG:2154", tuple(f.transform)[:6], f.width, f.height), name
    assert tile.grids["s2"].width == 10 and tile.grids["s2"].transform[0] == pytest.approx(10.24)


def test_flair_tile_off_its_footprint_fails_alone(flair, tmp_path):
    root = damaged_copy(flair, tmp_path / "flair-hub")
    refs = open_source(HUB, root).list_tiles()
    shifted, other_crs, nudged = refs[0].tile_id, refs[1].tile_id, refs[2].tile_id
    s2 = flair_file(root, HUB.modalities["s2"].source, shifted)
    edit_tif(s2, dx=20.48)  # two S2 pixels east
    cosia = flair_file(root, HUB.targets["cosia"].source, other_crs)
    edit_tif(cosia, crs="EPSG:3857")
    edit_tif(flair_file(root, HUB.modalities["s1_asc"].source, nudged), dx=3.0)  # < half a 10.24 m pixel: fine
    aerial = str(flair_file(root, HUB.modalities["aerial"].source, shifted))
    build_fails(HUB, root, tmp_path / "a", f"tile '{shifted}'", f"{s2}: modality s2 is not co-registered with "
                f"modality aerial ({aerial}): bounds 20.48 m apart (tolerance 5.12 m")
    build_skips(HUB, root, tmp_path / "b", {
        shifted: [str(s2), aerial, "20.48 m apart"],
        other_crs: [str(cosia), "target cosia is not co-registered", "CRS EPSG:3857 differs from EPSG:2154"]})
    assert assert_others_unchanged(HUB, tmp_path / "b", flair, {shifted, other_crs}) == 2


# ----- PASTIS-HD ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pastis(tmp_path_factory) -> Path:
    return generate("pastis-hd", tmp_path_factory.mktemp("pastis"), tiles=4, seed=5)


def test_pastis_grids_cut_the_polygon_and_read_the_spot_file(pastis):
    src = open_source(PASTIS, pastis)
    ref = src.list_tiles()[0]
    tile = src.read(ref)
    meta = json.loads((pastis / "metadata.geojson").read_text())
    ring = np.array(next(f for f in meta["features"] if str(f["properties"]["ID_PATCH"]) == ref.tile_id)
                    ["geometry"]["coordinates"][0])
    left, top = ring[:, 0].min(), ring[:, 1].max()
    assert tile.grids["s2"] == Grid("EPSG:2154", (10.0, 0.0, left, 0.0, -10.0, top), 128, 128)
    assert tile.grids["pastis_seg"] == tile.grids["s2"]
    with rasterio.open(pastis / PASTIS.modalities["spot"].source.replace("{id}", ref.tile_id)) as f:
        assert tile.grids["spot"] == Grid("EPSG:2154", tuple(f.transform)[:6], f.width, f.height)
    assert set(tile.grids) == set(PASTIS.modalities) | set(PASTIS.targets)


def test_pastis_spot_off_its_polygon_fails_alone(pastis, tmp_path):
    root = damaged_copy(pastis, tmp_path / "pastis-hd")
    tid = open_source(PASTIS, root).list_tiles()[1].tile_id
    spot = root / PASTIS.modalities["spot"].source.replace("{id}", tid)
    edit_tif(spot, dx=-20.0)
    edit_tif(root / PASTIS.modalities["spot"].source.replace("{id}", "10000" if tid != "10000" else "10001"),
             dx=4.0)  # within half a 10 m pixel of the S2 grid
    meta = str(root / "metadata.geojson")
    build_fails(PASTIS, root, tmp_path / "a", f"tile '{tid}': {spot}: spot is not co-registered with the polygon",
                meta, "20.00 m apart (tolerance 5.00 m")
    build_skips(PASTIS, root, tmp_path / "b", {tid: [str(spot), meta, "20.00 m apart"]})
    assert assert_others_unchanged(PASTIS, tmp_path / "b", pastis, {tid}) == 3


# ----- TreeSatAI-TS ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def treesat(tmp_path_factory) -> Path:
    return generate("treesatai-ts", tmp_path_factory.mktemp("tsai"), tiles=4, seed=4)  # CSVs + release tables


def test_real_tile_grids_are_the_aerial_crop_and_its_60m_for_the_time_series(real_sample):
    src = open_source(TSAI, real_sample, SourceOptions(on_error="skip"))
    with pytest.warns(UserWarning):
        ref = src.list_tiles()[0]
    grids = src.read(ref).grids
    aerial = grids["aerial"]
    assert aerial.crs == "EPSG:25832" and (aerial.width, aerial.height) == (300, 300)
    assert grid_bounds(aerial) == pytest.approx((428370.4, 5862901.8, 428430.4, 5862961.8), abs=1e-6)
    for name in ("s2", "s1_asc", "s1_des"):
        assert grids[name].crs == "EPSG:25832" and (grids[name].width, grids[name].height) == (6, 6)
        assert grid_bounds(grids[name]) == pytest.approx(grid_bounds(aerial), abs=1e-6)


def test_treesat_aerial_off_its_geojson_footprint_fails_alone(treesat, tmp_path):
    root = damaged_copy(treesat, tmp_path / "treesatai-ts")
    geojson = root / "geojson" / "bb_60m.GeoJSON"
    data = json.loads(geojson.read_text())
    tid = data["features"][2]["properties"]["IMG_ID"]
    ring = data["features"][2]["geometry"]["coordinates"][0]
    data["features"][2]["geometry"]["coordinates"] = [[[x + 100.0, y] for x, y in ring]]
    geojson.write_text(json.dumps(data))
    aerial = root / "aerial" / f"{tid}.tif"
    build_fails(TSAI, root, tmp_path / "a", f"tile '{tid}': {aerial}: not co-registered with its footprint in "
                f"{geojson}: bounds 100.40 m apart (tolerance 5.00 m")
    build_skips(TSAI, root, tmp_path / "b", {tid: [str(aerial), str(geojson), "100.40 m apart"]})
    assert assert_others_unchanged(TSAI, tmp_path / "b", treesat, {tid}) == 3


def test_treesat_lonlat_footprints_are_reprojected(treesat, tmp_path):
    """A bb_60m.GeoJSON written as RFC 7946 (lon/lat, no crs member) describes the same squares."""
    root = damaged_copy(treesat, tmp_path / "treesatai-ts")
    geojson = root / "geojson" / "bb_60m.GeoJSON"
    data = json.loads(geojson.read_text())
    to_lonlat = Transformer.from_crs("EPSG:25832", "OGC:CRS84", always_xy=True)
    for feat in data["features"]:
        feat["geometry"]["coordinates"] = [[list(to_lonlat.transform(x, y)) for x, y in ring]
                                           for ring in feat["geometry"]["coordinates"]]
    del data["crs"]
    geojson.write_text(json.dumps(data))
    src = open_source(TSAI, root)
    for ref in src.list_tiles():
        assert src.read(ref).grids == open_source(TSAI, treesat).read(ref).grids
    tid = data["features"][0]["properties"]["IMG_ID"]
    feat = data["features"][0]
    feat["geometry"]["coordinates"] = [[[x + 0.001, y] for x, y in ring] for ring in feat["geometry"]["coordinates"]]
    geojson.write_text(json.dumps(data))  # ~70 m east at 52.5 N
    ref = next(r for r in open_source(TSAI, root).list_tiles() if r.tile_id == tid)
    with pytest.raises(SourceError, match=r"not co-registered with its footprint .* m apart"):
        open_source(TSAI, root).read(ref)
