"""Issue #11: TreeSatAI-TS as the original release ships it (aerial/60m/, split lists in split/ or the root) and with
time-series HDF5 named without the year; ambiguous candidates are errors listing them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sourcekit import assert_others_unchanged, build_fails, build_skips, damaged_copy

from maestro_data.errors import SourceError
from maestro_data.manifest import load_manifest
from maestro_data.sources import open_source
from maestro_data.synthetic.treesatai_ts import generate

MANIFEST = load_manifest("treesatai-ts")
SEED = 3


@pytest.fixture(scope="module")
def standard(tmp_path_factory) -> Path:
    """MAESTRO's layout (flat aerial/, <IMG_ID>_<YYYY>.h5): what every variant must read the same as."""
    return generate(tmp_path_factory.mktemp("std"), tiles=4, seed=SEED, layout="both")


@pytest.fixture(scope="module")
def zenodo(tmp_path_factory) -> Path:
    """The original release: split/*_filenames.lst, aerial/60m/, and HDF5 named <IMG_ID>.h5."""
    return generate(tmp_path_factory.mktemp("zenodo"), tiles=4, seed=SEED, layout="release", release_aerial=True,
                    ts_name_year=False)


def same_tiles(a: Path, b: Path) -> int:
    """Both folders list the same tiles with the same splits, and each reads to identical values."""
    src_a, src_b = open_source(MANIFEST, a), open_source(MANIFEST, b)
    refs_a, refs_b = src_a.list_tiles(), src_b.list_tiles()
    assert [(r.tile_id, r.split) for r in refs_a] == [(r.tile_id, r.split) for r in refs_b]
    for ra, rb in zip(refs_a, refs_b, strict=True):
        ta, tb = src_a.read(src_a.probe(ra)), src_b.read(src_b.probe(rb))
        for name, series in ta.series.items():
            assert np.array_equal(series.data, tb.series[name].data, equal_nan=True), name
            assert np.array_equal(series.dates, tb.series[name].dates), name
        for name, target in ta.targets.items():
            assert np.array_equal(target, tb.targets[name]), name
        assert (ta.lon, ta.lat, ta.grids) == (tb.lon, tb.lat, tb.grids)
    return len(refs_a)


def test_release_layout_reads_as_maestro_s(standard, zenodo):
    assert (zenodo / "aerial" / "60m").is_dir() and not list((zenodo / "aerial").glob("*.tif"))
    assert not list((zenodo / "sentinel-ts").glob("*_20??.h5"))
    open_source(MANIFEST, zenodo).check_layout()
    assert same_tiles(standard, zenodo) == 4


def test_split_lists_in_the_root_and_h5_without_year_in_the_csv_layout(standard, zenodo, tmp_path):
    root = damaged_copy(zenodo, tmp_path / "treesatai-ts")
    for lst in (root / "split").glob("*.lst"):
        lst.rename(root / lst.name)  # OmniSat/AnySat keep them in the root
    assert same_tiles(standard, root) == 4
    for csv in standard.glob("*.csv"):  # MAESTRO's CSVs name <IMG_ID>_<YYYY>.h5; the files have no year
        shutil.copy(csv, root / csv.name)
    assert same_tiles(standard, root) == 4


def test_two_different_split_lists_are_ambiguous(zenodo, tmp_path):
    root = damaged_copy(zenodo, tmp_path / "treesatai-ts")
    shutil.copy(root / "split" / "train_filenames.lst", root / "train_filenames.lst")
    assert len(open_source(MANIFEST, root).list_tiles()) == 4  # identical copies: no ambiguity
    (root / "train_filenames.lst").write_text("Abies_alba_1_1_WEFL_NLF.tif\n")
    with pytest.raises(SourceError) as info:
        open_source(MANIFEST, root).list_tiles()
    assert (f"two different split lists for 'train': {root / 'train_filenames.lst'} and "
            f"{root / 'split' / 'train_filenames.lst'}; keep one") in str(info.value)


def test_two_candidate_time_series_fail_that_tile_listing_both(zenodo, tmp_path):
    root = damaged_copy(zenodo, tmp_path / "treesatai-ts")
    tid = open_source(MANIFEST, root).list_tiles()[1].tile_id
    shutil.copy(root / "sentinel-ts" / f"{tid}.h5", root / "sentinel-ts" / f"{tid}_2019.h5")
    message = (f"tile '{tid}': {root / 'sentinel-ts'}: expected exactly one time series sentinel-ts/{tid}_<YYYY>.h5 "
               f"or sentinel-ts/{tid}.h5, found 2: ['{tid}.h5', '{tid}_2019.h5']")
    build_fails(MANIFEST, root, tmp_path / "a", message)
    build_skips(MANIFEST, root, tmp_path / "b", {tid: [message]})
    assert_others_unchanged(MANIFEST, tmp_path / "b", zenodo, {tid})
    for h5 in (root / "sentinel-ts").glob(f"{tid}*.h5"):
        h5.unlink()
    ref = next(r for r in open_source(MANIFEST, root).list_tiles() if r.tile_id == tid)
    with pytest.raises(SourceError, match=r"found 0: \[\]"):
        open_source(MANIFEST, root).probe(ref)


def test_two_candidate_aerial_tiles_fail_that_tile_listing_both(zenodo, tmp_path):
    root = damaged_copy(zenodo, tmp_path / "treesatai-ts")
    tid = open_source(MANIFEST, root).list_tiles()[2].tile_id
    flat, release = root / "aerial" / f"{tid}.tif", root / "aerial" / "60m" / f"{tid}.tif"
    shutil.copy(release, flat)
    message = f"tile '{tid}': {flat}: two candidate GeoTIFFs, {flat} and {release}"
    build_fails(MANIFEST, root, tmp_path / "a", message)
    build_skips(MANIFEST, root, tmp_path / "b", {tid: [message]})
    assert_others_unchanged(MANIFEST, tmp_path / "b", zenodo, {tid})
    release.unlink()  # one copy left, in MAESTRO's place: read from there
    ref = next(r for r in open_source(MANIFEST, root).list_tiles() if r.tile_id == tid)
    assert open_source(MANIFEST, root).read(ref).series["aerial"].data.shape == (1, 4, 300, 300)
