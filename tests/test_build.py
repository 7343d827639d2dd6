"""`maestro-data build` end to end: every dataset on its synthetic real layout, the real TreeSatAI-TS tiles through
store -> shards -> back unchanged, parallel workers, a SIGKILLed build resumed, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import real_split_counts

from maestro_cli.data import main
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.build.tile_store import TileStore
from maestro_data.manifest import load_manifest
from maestro_data.sources import SourceOptions, open_source
from maestro_data.stream.index_format import shard_entries
from maestro_data.stream.shard_read import open_index, read_shard, shard_url
from maestro_data.stream.verify import verify
from maestro_data.synthetic import generate


def _store_arrays(path):
    root = zarr.open_group(str(path / "store.zarr"), mode="r")
    out = {}
    for gname, group in root.groups():
        for name, arr in group.arrays():
            out[f"{gname}/{name}"] = arr[:]
        for sub, g2 in group.groups():
            for name, arr in g2.arrays():
                out[f"{gname}/{sub}/{name}"] = arr[:]
    return out


@pytest.mark.parametrize("dataset", ["treesatai-ts", "pastis-hd", "flair-hub", "flair2"])
def test_every_dataset_builds_from_its_synthetic_layout(tmp_path, dataset):
    src = generate(dataset, tmp_path / "raw", tiles=6, seed=3)
    manifest = load_manifest(dataset)
    report = build_store(manifest, src, tmp_path / "out", BuildOptions(quiet=True, block_tiles=4))
    source = open_source(manifest, src)
    refs = source.list_tiles()
    assert report["tiles_written"] == len(refs) > 0 and report["tiles_skipped"] == 0
    store = TileStore(tmp_path / "out")
    for ref in refs[:3]:
        expected = source.read(source.probe(ref))
        got = store.read_tile(ref.tile_id)
        assert got.split == ref.split and abs(got.lon - expected.lon) < 1e-12
        for name, series in expected.series.items():
            assert np.array_equal(got.series[name].data, series.data, equal_nan=True), name
            assert np.array_equal(got.series[name].dates, series.dates), name
            if series.mask is not None:
                assert np.array_equal(got.series[name].mask, series.mask)
        for name, target in expected.targets.items():
            assert np.array_equal(got.targets[name], target)
    counts = compute_subsets(tmp_path / "out")
    index = write_shards(tmp_path / "out", tmp_path / "out" / "shards", ShardOptions(quiet=True))
    assert verify(tmp_path / "out" / "shards", full=True) == []
    assert sum(s["samples"] for s in index["splits"].values()) == len(refs)
    assert set(counts) == set(manifest.splits.names)


def test_parallel_build_equals_serial_build(tmp_path):
    src = generate("pastis-hd", tmp_path / "raw", tiles=7, seed=1)
    manifest = load_manifest("pastis-hd")
    build_store(manifest, src, tmp_path / "one", BuildOptions(quiet=True, block_tiles=2))
    build_store(manifest, src, tmp_path / "two", BuildOptions(quiet=True, block_tiles=2, workers=2))
    a, b = _store_arrays(tmp_path / "one"), _store_arrays(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key


def test_fold_option_rotates_pastis_splits(tmp_path):
    src = generate("pastis-hd", tmp_path / "raw", tiles=5, seed=0)
    manifest = load_manifest("pastis-hd")
    build_store(manifest, src, tmp_path / "f1", BuildOptions(quiet=True))
    build_store(manifest, src, tmp_path / "f2", BuildOptions(quiet=True, source=SourceOptions(fold=2)))
    s1, s2 = TileStore(tmp_path / "f1"), TileStore(tmp_path / "f2")
    for i, tid in enumerate(s1.tile_ids):
        fold = int(s1.folds[i])
        assert s1.splits[i] == {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}[fold]
        assert s2.splits[s2.index(tid)] == {2: "train", 3: "train", 4: "train", 5: "val", 1: "test"}[fold]


@pytest.mark.filterwarnings("ignore:.*split file for")  # the committed one-tile folder has train.csv only
def test_real_treesat_tiles_come_back_unchanged_through_shards(tmp_path, real_mini):
    """The six tiles of ../shared, or the committed real tile on a fresh clone (train.csv only, so built with
    --on-error skip): counts come from the split CSVs."""
    tiles = sum(real_split_counts(real_mini).values())
    assert tiles >= 1
    manifest = load_manifest("treesatai-ts")
    report = build_store(manifest, real_mini, tmp_path / "out", BuildOptions(quiet=True, on_error="skip"))
    assert report["tiles_written"] == tiles and report["tiles_skipped"] == 0
    assert report["nan_values"]["s1_des"] > 0
    compute_subsets(tmp_path / "out")
    write_shards(tmp_path / "out", tmp_path / "shards", ShardOptions(quiet=True))
    source = open_source(manifest, real_mini, SourceOptions(on_error="skip"))
    expected = {ref.tile_id: source.read(source.probe(ref)) for ref in source.list_tiles()}
    index, loc = open_index(tmp_path / "shards")
    seen = 0
    for split in index["splits"]:
        for entry in shard_entries(index, split):
            for sample in read_shard(shard_url(loc, entry["url"])):
                tile = expected[sample["tile_id"]]
                assert sample["meta"]["split"] == tile.split
                for name, series in tile.series.items():
                    assert np.array_equal(sample[name], series.data, equal_nan=True)
                    assert np.array_equal(sample[f"{name}_dates"], series.dates)
                assert np.array_equal(sample["s2_mask"], tile.series["s2"].mask)
                assert np.array_equal(sample["treesat_mlc_thresh"], tile.targets["treesat_mlc_thresh"])
                seen += 1
    assert seen == tiles


def test_cli_refuses_the_real_sample_s_missing_splits_unless_skipped(tmp_path, real_sample):
    """The real sample folder holds train.csv only: the default --on-error fail names the missing split files; under
    skip it builds, warning about them."""
    args = ["build", "treesatai-ts", "--src", str(real_sample), "--quiet"]
    failed = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "failed")])
    assert failed.exit_code != 0 and "Traceback" not in failed.output
    assert f"{real_sample / 'val.csv'}: split file for 'val' not found" in failed.output
    assert f"{real_sample / 'test.csv'}: split file for 'test' not found" in failed.output
    assert "--on-error skip" in failed.output
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out"), "--on-error", "skip"])
    assert result.exit_code == 0, result.output
    assert "built 1 tiles of treesatai-ts" in result.output
    assert f"warning: {real_sample / 'val.csv'}: split file for 'val' not found" in result.output
    assert f"layout: {real_sample / 'test.csv'}: " in result.output
    notes = json.loads((tmp_path / "out" / "report.json").read_text())["layout_notes"]
    assert [(n["kind"], n["split"], n["file"]) for n in notes] == [
        ("missing_split", "val", str(real_sample / "val.csv")),
        ("missing_split", "test", str(real_sample / "test.csv"))]
    assert verify(tmp_path / "out" / "shards", full=True) == []
    info = CliRunner().invoke(main, ["info", str(tmp_path / "out" / "store.zarr"), "--json"])
    summary = json.loads(info.output)
    assert summary["splits"] == {"train": 1}
    assert summary["modalities"]["s2"]["dates_max"] == 146 and summary["modalities"]["s1_des"]["dates_max"] == 235
    lon = TileStore(tmp_path / "out").lon[0]
    assert abs(lon - 7.9353) < 1e-3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "pastis-hd", "--src", "{treesat}", "--out", "{tmp}/o"], "metadata.geojson"),
        (["build", "treesatai-ts", "--src", "{tmp}/nowhere", "--out", "{tmp}/o"], "does not exist"),
        (["info", "{tmp}"], "not a tile store"),
        (["verify", "{tmp}"], "no shard index"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, message):
    treesat = generate("treesatai-ts", tmp_path / "raw", tiles=2)
    args = [a.format(tmp=tmp_path, treesat=treesat) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_cli_refuses_existing_output_and_a_bad_manifest(tmp_path):
    src = generate("treesatai-ts", tmp_path / "raw", tiles=2)
    out = tmp_path / "out"
    ok = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(src), "--out", str(out), "--quiet"])
    assert ok.exit_code == 0, ok.output
    again = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(src), "--out", str(out), "--quiet"])
    assert again.exit_code != 0 and "already exists; pass --resume" in again.output
    assert TileStore(out).summary()["tiles"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text(load_manifest("treesatai-ts").text.replace("patch_size = 20", "patch_size = 7"))
    result = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(src), "--out", str(tmp_path / "o2"),
                                       "--manifest", str(bad)])
    assert result.exit_code != 0
    assert "modalities.aerial.image_size: 300 is not divisible by patch_size 7" in result.output


def _run_build(src, out, *extra):
    cmd = [sys.executable, "-m", "maestro_cli.data", "build", "flair-hub", "--src", str(src), "--out", str(out),
           "--block-tiles", "1", "--quiet", "--no-shards", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_build_killed_with_sigkill_resumes_to_the_uninterrupted_store(tmp_path):
    src = generate("flair-hub", tmp_path / "raw", tiles=8, seed=5, t_s2=12, t_s1=12)
    full = _run_build(src, tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()
    victim = _run_build(src, tmp_path / "cut")
    markers = tmp_path / "cut" / "_build" / "blocks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 2:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    done = len(list(markers.glob("*.json")))
    assert 0 < done < 8, "the build was not interrupted mid-way"
    assert not (tmp_path / "cut" / "report.json").exists()
    resumed = _run_build(src, tmp_path / "cut", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    a, b = _store_arrays(tmp_path / "full"), _store_arrays(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["tiles_written"] == 8


def test_on_error_skip_completes_and_reports_the_corrupt_tile(tmp_path):
    src = generate("treesatai-ts", tmp_path / "raw", tiles=5, seed=2)
    victim = sorted((src / "sentinel-ts").glob("*.h5"))[1]
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated HDF5
    args = ["build", "treesatai-ts", "--src", str(src), "--quiet"]
    failed = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert failed.exit_code != 0 and victim.name in failed.output and "Traceback" not in failed.output
    ok = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--on-error", "skip"])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["tiles_written"] == 4 and report["tiles_skipped"] == 1
    assert victim.name in report["skipped"][0]["reason"]
    assert verify(tmp_path / "b" / "shards", full=True) == []
