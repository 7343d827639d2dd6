"""Issue #11: the same --on-error rule in all four readers. A split file the layout promises is required under fail
and recorded under skip; a bad row of a split or label table fails its tile only; a folder standing where a file
is expected is said to be one. Every message names the exact file (and tile); every other tile survives a skip."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from sourcekit import assert_others_unchanged, build_fails, build_skips, damaged_copy

from maestro_data.build.pipeline import BuildOptions, build_store
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import SourceError
from maestro_data.manifest import load_manifest
from maestro_data.sources import SourceOptions, open_source
from maestro_data.sources.flair import split_patch_id
from maestro_data.synthetic import generate

DIRECTORY = "is a directory, expected a file"
LAYOUTS = {  # dataset -> (generator options, the val split file it promises)
    "treesatai-ts csv": ("treesatai-ts", {"layout": "csv", "tiles": 5}, "val.csv"),
    "treesatai-ts release": ("treesatai-ts", {"layout": "release", "tiles": 5}, "split/val_filenames.lst"),
    "flair2": ("flair2", {"tiles": 6, "t_s2": 4, "t_s1": 4, "spot": False}, "val_flair2.csv"),
    "pastis-hd": ("pastis-hd", {"tiles": 5, "maestro_csvs": True}, "val.csv"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One undamaged dataset per layout, generated on first use."""
    made: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in made:
            dataset, options, _ = LAYOUTS[key]
            made[key] = generate(dataset, tmp_path_factory.mktemp(key.replace(" ", "-")), seed=7, **options)
        return made[key]

    return get


# ----- promised split files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(LAYOUTS))
def test_missing_split_file_fails_or_is_recorded(clean, tmp_path, key):
    dataset, _, name = LAYOUTS[key]
    manifest, reference = load_manifest(dataset), clean(key)
    val = {r.tile_id for r in open_source(manifest, reference).list_tiles() if r.split == "val"}
    assert val
    root = damaged_copy(reference, tmp_path / reference.name)
    (root / name).unlink()
    build_fails(manifest, root, tmp_path / "a", f"{root / name}: split file for 'val' not found",
                "--on-error skip to build with the 'val' split empty")
    with pytest.warns(UserWarning, match=re.escape(f"{root / name}: split file for 'val' not found")):
        report = build_skips(manifest, root, tmp_path / "b", {})
    assert "val" not in TileStore(tmp_path / "b").summary()["splits"] and report["tiles_written"] > 0
    assert_others_unchanged(manifest, tmp_path / "b", reference, val)
    source = open_source(manifest, root, SourceOptions(on_error="skip"))
    with pytest.warns(UserWarning):
        source.list_tiles()
    assert source.layout_notes == [{"kind": "missing_split", "split": "val", "file": str(root / name),
                                    "reason": "not found; the 'val' split is empty"}]
    (root / name).mkdir()
    with pytest.raises(SourceError, match=re.escape(f"{root / name}: split file for 'val' {DIRECTORY}")):
        open_source(manifest, root).list_tiles()


def test_empty_split_file_is_an_empty_split(clean, tmp_path):
    reference = clean("treesatai-ts csv")
    root = damaged_copy(reference, tmp_path / "treesatai-ts")
    header = (root / "val.csv").read_text().splitlines()[0]
    (root / "val.csv").write_text(header + "\n")
    refs = open_source(load_manifest("treesatai-ts"), root).list_tiles()
    assert refs and all(r.split != "val" for r in refs)


# ----- a bad table row fails its tile only -------------------------------------------------------------------------
def edit_first_fraction(root: Path, value: str) -> tuple[str, str]:
    path = root / "train.csv"
    rows = [line.split(",") for line in path.read_text().splitlines()]
    rows[1][3] = value  # the first genus column (Betula in MAESTRO's order)
    path.write_text("\n".join(",".join(r) for r in rows))
    return rows[1][0].removesuffix(".tif"), f"{path}:2"


def test_treesat_fraction_out_of_range_skips_that_tile(clean, tmp_path):
    manifest, reference = load_manifest("treesatai-ts"), clean("treesatai-ts csv")
    root = damaged_copy(reference, tmp_path / "treesatai-ts")
    tid, where = edit_first_fraction(root, "1.5")
    message = f"tile '{tid}': {where}: genus fractions [('Betula', 1.5)] are outside [0, 1]"
    build_fails(manifest, root, tmp_path / "a", message)
    report = build_skips(manifest, root, tmp_path / "b", {tid: [message]})
    assert report["skipped"][0]["stage"] == "probe"
    assert_others_unchanged(manifest, tmp_path / "b", reference, {tid})


def test_treesat_release_tile_without_year_skips_that_tile(clean, tmp_path):
    manifest, reference = load_manifest("treesatai-ts"), clean("treesatai-ts release")
    root = damaged_copy(reference, tmp_path / "treesatai-ts")
    geojson = root / "geojson" / "bb_60m.GeoJSON"
    data = json.loads(geojson.read_text())
    tid = data["features"].pop(1)["properties"]["IMG_ID"]
    geojson.write_text(json.dumps(data))
    message = f"tile '{tid}': {geojson}: no YEAR for this IMG_ID in geojson/bb_60m.GeoJSON"
    build_fails(manifest, root, tmp_path / "a", message)
    build_skips(manifest, root, tmp_path / "b", {tid: [message]})
    assert_others_unchanged(manifest, tmp_path / "b", reference, {tid})


def test_pastis_bad_fold_skips_that_tile(clean, tmp_path):
    manifest, reference = load_manifest("pastis-hd"), clean("pastis-hd")
    root = damaged_copy(reference, tmp_path / "pastis-hd")
    for csv in root.glob("*.csv"):  # the Fold rule
        csv.unlink()
    meta = root / "metadata.geojson"
    data = json.loads(meta.read_text())
    data["features"][2]["properties"]["Fold"] = "x"
    tid = str(data["features"][2]["properties"]["ID_PATCH"])
    meta.write_text(json.dumps(data))
    message = f"tile '{tid}': {meta}: Fold 'x' is not an integer"
    build_fails(manifest, root, tmp_path / "a", message)
    build_skips(manifest, root, tmp_path / "b", {tid: [message]})
    folds = damaged_copy(reference, tmp_path / "folds" / "pastis-hd")
    for csv in folds.glob("*.csv"):
        csv.unlink()
    assert_others_unchanged(manifest, tmp_path / "b", folds, {tid})


def test_flair_malformed_patch_id_skips_that_tile(clean, tmp_path):
    manifest, reference = load_manifest("flair2"), clean("flair2")
    root = damaged_copy(reference, tmp_path / "flair-hub")
    path = root / "train_flair2.csv"
    lines = path.read_text().splitlines()
    tid, lines[1] = lines[1], lines[1].replace("_", "-", 1)  # no longer <DOM>-<YEAR>_<ROI>_<R>-<C>
    path.write_text("\n".join(lines) + "\n")
    bad = lines[1]
    message = f"tile '{bad}': {path}: malformed patch id"
    build_fails(manifest, root, tmp_path / "a", message)
    build_skips(manifest, root, tmp_path / "b", {bad: [message]})
    assert_others_unchanged(manifest, tmp_path / "b", reference, {tid})


# ----- a folder where a file is expected ---------------------------------------------------------------------------
def as_directory(path: Path) -> Path:
    path.unlink()
    path.mkdir()
    return path


def tile_error(manifest, root: Path, tile_id: str, call: str = "read", **options) -> str:
    source = open_source(manifest, root, SourceOptions(**options))
    ref = next(r for r in source.list_tiles() if r.tile_id == tile_id)
    with pytest.raises(SourceError) as info:
        getattr(source, call)(ref)
    return str(info.value)


def test_treesat_directories_are_named_as_such(clean, tmp_path):
    manifest = load_manifest("treesatai-ts")
    root = damaged_copy(clean("treesatai-ts csv"), tmp_path / "treesatai-ts")
    refs = open_source(manifest, root).list_tiles()
    tif = as_directory(root / "aerial" / refs[0].keys["aerial_name"])
    h5 = as_directory(root / "sentinel-ts" / refs[1].keys["sen_name"])
    for call in ("probe", "read"):
        assert f"tile '{refs[0].tile_id}': {tif}: aerial: {DIRECTORY}" in tile_error(manifest, root, refs[0].tile_id,
                                                                                    call)
        assert f"tile '{refs[1].tile_id}': {h5}: time series: {DIRECTORY}" in tile_error(manifest, root,
                                                                                         refs[1].tile_id, call)
    release = damaged_copy(clean("treesatai-ts release"), tmp_path / "release" / "treesatai-ts")
    labels = as_directory(release / "labels" / "TreeSatBA_v9_60m_multi_labels.json")
    with pytest.raises(SourceError, match=re.escape(f"{labels}: {DIRECTORY}: the release layout needs")):
        open_source(manifest, release).list_tiles()


def test_flair_directories_are_named_as_such(clean, tmp_path):
    manifest = load_manifest("flair2")
    root = damaged_copy(clean("flair2"), tmp_path / "flair-hub")
    pid = open_source(manifest, root).list_tiles()[0].tile_id
    s2 = as_directory(root / manifest.modalities["s2"].source.format(**split_patch_id(pid, "")))
    assert f"tile '{pid}': {s2}: modality s2: {DIRECTORY}" in tile_error(manifest, root, pid)
    gpkg = as_directory(root / "GLOBAL_ALL_MTD" / "GLOBAL_SENTINEL2_MTD_DATES.gpkg")
    with pytest.raises(SourceError, match=re.escape(f"{gpkg.parent}: date table(s) {gpkg.name} ({DIRECTORY})")):
        open_source(manifest, root).check_layout()


def test_pastis_directories_are_named_as_such(clean, tmp_path):
    manifest = load_manifest("pastis-hd")
    root = damaged_copy(clean("pastis-hd"), tmp_path / "pastis-hd")
    refs = open_source(manifest, root).list_tiles()
    npy = as_directory(root / manifest.modalities["s2"].source.replace("{id}", refs[0].tile_id))
    spot = as_directory(root / manifest.modalities["spot"].source.replace("{id}", refs[1].tile_id))
    for call in ("probe", "read"):
        assert f"tile '{refs[0].tile_id}': {npy}: npy: {DIRECTORY}" in tile_error(manifest, root, refs[0].tile_id,
                                                                                  call)
        assert f"tile '{refs[1].tile_id}': {spot}: spot: {DIRECTORY}" in tile_error(manifest, root,
                                                                                    refs[1].tile_id, call)
    report = build_store(manifest, root, tmp_path / "out", BuildOptions(quiet=True, on_error="skip"))
    assert {s["tile_id"] for s in report["skipped"]} == {refs[0].tile_id, refs[1].tile_id}
    as_directory(root / "metadata.geojson")
    with pytest.raises(SourceError, match=f"metadata.geojson {DIRECTORY}"):
        open_source(manifest, root).check_layout()


def test_sqlite_split_table_directory(clean, tmp_path):
    """The FLAIR-HUB split GeoPackage replaced by a folder is named as one, not 'not found'."""
    manifest = load_manifest("flair-hub")
    root = damaged_copy(clean("flair2"), tmp_path / "flair-hub")
    for csv in root.glob("*_flair2.csv"):
        csv.unlink()
    gpkg = root / "GLOBAL_ALL_MTD" / "GLOBAL_ALL_MTD_SPLIT.gpkg"
    with sqlite3.connect(gpkg) as con:  # still a GeoPackage before the damage
        assert con.execute("SELECT count(*) FROM gpkg_contents").fetchone()[0] >= 1
    as_directory(gpkg)
    with pytest.raises(SourceError, match=re.escape(f"{gpkg}: GeoPackage: {DIRECTORY}")):
        open_source(manifest, root).list_tiles()
