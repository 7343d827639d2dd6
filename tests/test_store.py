"""Tile store: plan arithmetic, bit-exact round trip with ragged time axes, skip policy, resume and refusal to
overwrite. Uses an in-memory source so these tests do not depend on any raw layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from fakes import MemorySource

from maestro_data.build.pipeline import BuildOptions, build_store
from maestro_data.build.store import make_plan, steps_per_chunk
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import SourceError, StoreError
from maestro_data.manifest import load_manifest

MANIFEST = load_manifest("treesatai-ts")


def test_plan_aligns_tiles_to_chunks_and_blocks_to_shards():
    counts = {m: [1 if s.temporal_bins == 1 else c for c in (5, 130, 1, 64)] for m, s in MANIFEST.modalities.items()}
    plan = make_plan(MANIFEST, list("abcd"), ["train"] * 4, [0] * 4, counts, block_tiles=3)
    s2 = plan.modalities["s2"]
    k = steps_per_chunk(MANIFEST.modalities["s2"])
    assert s2.chunk_steps == k and np.all(s2.offsets[:-1] % k == 0)
    assert s2.offsets[3] == s2.shard_steps  # block 1 starts at shard 1
    assert s2.offsets[-1] == 2 * s2.shard_steps
    assert plan.num_blocks == 2 and list(plan.block_range(1)) == [3]
    ends = s2.offsets[:-1] + s2.counts
    assert np.all(ends[:2] <= s2.offsets[1:3])  # no overlap


def test_round_trip_is_bit_exact(tmp_path, memory_source):
    (tmp_path / "raw").mkdir()
    report = build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(block_tiles=3, quiet=True))
    assert report["tiles_written"] == 7 and report["blocks"] == 3
    assert report["nan_values"]["s1_asc"] == 7 and report["nan_values"]["s2"] == 0
    store = TileStore(tmp_path / "out")
    src = MemorySource(MANIFEST, tmp_path / "raw")
    for ref in src.list_tiles():
        expected = src.read(src.probe(ref))
        got = store.read_tile(ref.tile_id)
        assert got.tile_id == ref.tile_id and got.split == ref.split and got.fold == ref.fold
        assert got.lon == expected.lon and np.array_equal(got.ref_date, expected.ref_date)
        for name, s in expected.series.items():
            g = got.series[name]
            assert g.data.dtype == s.data.dtype and np.array_equal(g.data, s.data, equal_nan=True), name
            assert np.array_equal(g.dates, s.dates)
            assert (s.mask is None) == (g.mask is None) and (s.mask is None or np.array_equal(g.mask, s.mask))
        assert np.array_equal(got.targets["treesat_mlc_thresh"], expected.targets["treesat_mlc_thresh"])
    summary = store.summary()
    assert summary["splits"] == {"train": 3, "val": 2, "test": 2}
    assert summary["modalities"]["s2"]["dates_max"] >= summary["modalities"]["s2"]["dates_min"]


def test_existing_output_is_never_overwritten_silently(tmp_path, memory_source):
    (tmp_path / "raw").mkdir()
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(quiet=True))
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(StoreError, match="already exists; pass --resume .* or --overwrite"):
        build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(quiet=True))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    report = build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(quiet=True, overwrite=True))
    assert report["tiles_written"] == 7


def test_skip_policy_records_bad_tiles(tmp_path, memory_source):
    (tmp_path / "raw").mkdir()
    memory_source.update(bad={"tile/2:é"}, missing={"tile/4:é"})
    with pytest.raises(SourceError, match=r"tile 'tile/4:é': aerial/x.tif: aerial GeoTIFF is missing"):
        build_store(MANIFEST, tmp_path / "raw", tmp_path / "a", BuildOptions(quiet=True))
    report = build_store(MANIFEST, tmp_path / "raw", tmp_path / "b", BuildOptions(quiet=True, on_error="skip"))
    assert report["tiles_written"] == 5 and report["tiles_skipped"] == 2
    reasons = {s["tile_id"]: s["reason"] for s in report["skipped"]}
    assert "truncated HDF5" in reasons["tile/2:é"] and "missing" in reasons["tile/4:é"]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["tiles_skipped"] == 2
    store = TileStore(tmp_path / "b")
    assert len(store) == 6 and store.summary()["skipped"] == 1
    with pytest.raises(StoreError, match="tile/2:é.*skipped"):
        store.read_tile("tile/2:é")


def _snapshot(path):
    root = zarr.open_group(str(path / "store.zarr"), mode="r")
    out = {}
    for name, arr in root.arrays():
        out[name] = arr[:]
    for gname, group in root.groups():
        for name, arr in group.arrays():
            out[f"{gname}/{name}"] = arr[:]
    attrs = dict(root.attrs)
    attrs.pop("provenance")
    return out, attrs


def test_resume_after_lost_blocks_equals_uninterrupted(tmp_path, memory_source):
    (tmp_path / "raw").mkdir()
    opts = dict(block_tiles=2, quiet=True)
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "full", BuildOptions(**opts))
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "cut", BuildOptions(**opts))
    # simulate a crash after two blocks: the other blocks' markers are gone and their shards half-written
    root = zarr.open_group(str(tmp_path / "cut" / "store.zarr"), mode="r+")
    root.attrs["complete"] = False
    (tmp_path / "cut" / "report.json").unlink()
    for marker in sorted((tmp_path / "cut" / "_build" / "blocks").glob("*.json"))[2:]:
        marker.unlink()
    root["s2"]["data"][-1] = 0
    with pytest.raises(StoreError, match="did not finish"):
        TileStore(tmp_path / "cut")
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "cut", BuildOptions(resume=True, **opts))
    full, cut = _snapshot(tmp_path / "full"), _snapshot(tmp_path / "cut")
    assert full[1] == cut[1]
    assert full[0].keys() == cut[0].keys()
    for key in full[0]:
        assert np.array_equal(full[0][key], cut[0][key], equal_nan=True), key


def test_resume_with_other_arguments_is_refused(tmp_path, memory_source):
    (tmp_path / "raw").mkdir()
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(block_tiles=2, quiet=True))
    with pytest.raises(StoreError, match="planned from another source"):
        build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(block_tiles=3, resume=True,
                                                                               quiet=True))


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a tile store"):
        TileStore(tmp_path)
