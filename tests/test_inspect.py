"""`maestro-data stats` and `maestro-data show` on built stores of the four synthetic layouts and the real
TreeSatAI-TS tiles: stats.json against numpy on the decoded store arrays, band groups recovered from planted
correlated blocks, `--sample` against the loader's own rows, deterministic PNGs and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REAL_MINI
from fakes import MemorySource
from streamkit import rows

import maestro_data.build.pipeline as build_mod
from maestro_cli.data import main
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.build.tile_store import TileStore
from maestro_data.inspect.commands import SampleOptions, tile_figure
from maestro_data.manifest import load_manifest
from maestro_data.stream.loader import StreamConfig, make_loader, to_model_batch
from maestro_data.synthetic import generate

DATASETS = ["treesatai-ts", "pastis-hd", "flair-hub", "flair2", "real"]
PNG = b"\x89PNG\r\n\x1a\n"


def _build(root: Path, manifest, raw: Path, on_error: str = "fail") -> Path:
    build_store(manifest, raw, root / "out", BuildOptions(block_tiles=8, quiet=True, on_error=on_error))
    compute_subsets(root / "out", (5, 20))
    write_shards(root / "out", root / "shards", ShardOptions(quiet=True))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """dataset -> folder holding out/ (the store) and shards/ (its index); "real" = the real TreeSatAI-TS tiles."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            if name == "real":
                # a fresh clone's real sample is one tile with train.csv only: its val/test split files are absent
                cache[name] = _build(root, load_manifest("treesatai-ts"), REAL_MINI, on_error="skip")
            else:
                tiles = 2 if name == "pastis-hd" else 3  # a PASTIS-HD tile holds 1280 x 1280 SPOT pixels
                cache[name] = _build(root, load_manifest(name), generate(name, root / "raw", tiles=tiles, seed=4))
        return cache[name]

    return get


def _counted(store: TileStore, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(C, N) every stored value of a modality as stats counts it, NaN where excluded, and the NaN stored per
    band: numpy on the decoded store."""
    spec = store.manifest.modalities[name]
    parts, nan = [], np.zeros(spec.stored_channels, np.int64)
    for i in range(len(store)):
        s = store.read_series(i, name)
        x = s.data.astype(np.float64)
        nan += np.isnan(x).sum(axis=(0, 2, 3))
        if spec.log_scale:
            x = np.log(np.maximum(x, 1e-10))
        bad = ~np.isfinite(x)
        if s.mask is not None:
            bad |= (s.mask > spec.cloud_mask.threshold).any(axis=1)[:, None]
        x[bad] = np.nan
        parts.append(x.transpose(1, 0, 2, 3).reshape(spec.stored_channels, -1))
    return np.concatenate(parts, axis=1), nan


@pytest.mark.parametrize("dataset", DATASETS)
def test_stats_json_equals_numpy_on_the_decoded_store(built, dataset, tmp_path):
    result = CliRunner().invoke(main, ["stats", str(built(dataset) / "out"), "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "band groups" in result.output and "proposed" in result.output
    stats = json.loads((tmp_path / "stats.json").read_text())
    store = TileStore(built(dataset) / "out")
    for name, spec in store.manifest.modalities.items():
        got, (x, nan) = stats["modalities"][name], _counted(store, name)
        assert (tmp_path / f"hist_{name}.png").read_bytes().startswith(PNG)
        for c, band in enumerate(spec.bands):
            b, v = got["bands"][band], x[c][~np.isnan(x[c])]
            assert b["count"] == v.size and b["nan"] == nan[c]
            assert np.isclose(b["mean"], v.mean(), rtol=1e-9) and np.isclose(b["std"], v.std(), rtol=1e-9)
            assert b["min"] == v.min() and b["max"] == v.max()
            expected = np.percentile(v, stats["percentiles"], method="inverted_cdf")
            pct = np.array([b["percentiles"][str(q)] for q in stats["percentiles"]])
            assert np.all(np.abs(pct - expected) <= b["resolution"] + 1e-9), band
            assert b["resolution"] == 0 or np.dtype(spec.dtype).kind == "f"
        joint = x[:, ~np.isnan(x).any(axis=0)]
        assert got["correlation"]["pixels"] == joint.shape[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(joint)
        assert np.allclose(np.array(got["correlation"]["matrix"], dtype=float), corr, atol=1e-9, equal_nan=True)
    _check_classes(store, stats)
    _check_cloud(store, stats)
    assert (tmp_path / "correlation.png").read_bytes().startswith(PNG)


def _check_classes(store: TileStore, stats: dict) -> None:
    for name, t in store.manifest.targets.items():
        for split, got in stats["classes"][name]["per_split"].items():
            values = [store.read_target(i, name) for i in store.split_indices(split)]
            if t.type == "segmentation":
                counts = np.bincount(np.concatenate([v.ravel() for v in values]), minlength=len(t.classes))
                assert list(got["pixels"].values()) == counts[:len(t.classes)].tolist()
            else:
                positive = (np.stack(values) > np.float32(t.threshold)).sum(axis=0)
                assert list(got["positive"].values()) == positive.tolist() and got["tiles"] == len(values)


def _check_cloud(store: TileStore, stats: dict) -> None:
    for name, spec in store.manifest.modalities.items():
        if spec.cloud_mask is None:
            assert stats["modalities"][name]["cloud"] is None
            continue
        shares: dict[tuple[int, int], list[float]] = {}
        for i in range(len(store)):
            s = store.read_series(i, name)
            for ymd, m in zip(s.dates, (s.mask > spec.cloud_mask.threshold).any(axis=1), strict=True):
                shares.setdefault((int(ymd[0]), int(ymd[1])), []).append(float(m.mean()))
        per_date = stats["modalities"][name]["cloud"]["per_date"]
        assert sum(d["steps"] for d in per_date.values()) == sum(len(v) for v in shares.values())
        assert sorted(round(d["cloud_share"], 9) for d in per_date.values()) == \
            sorted(round(float(np.mean(v)), 9) for v in shares.values())


class PlantedSource(MemorySource):
    """TreeSat-shaped tiles whose Sentinel-2 bands are three correlated blocks, B02-B04 | B05-B8A | B11-B12
    (not the manifest's [4, 4, 2]), with no cloud mask set."""

    def read(self, ref):
        tile = super().read(ref)
        s2 = tile.series["s2"]
        rng = np.random.default_rng(len(ref.tile_id) + s2.data.shape[0])
        t, _, h, w = s2.data.shape
        latent = rng.normal(size=(3, t, h, w))
        owner = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
        bands = [3000 + 800 * latent[o] + 100 * rng.normal(size=(t, h, w)) for o in owner]
        s2.data = np.clip(np.stack(bands, axis=1), 0, 65535).astype(np.uint16)
        s2.mask = np.zeros_like(s2.mask)
        return tile


def test_band_groups_recover_planted_blocks_and_write_a_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "open_source", lambda m, r, o=None: PlantedSource(m, r, o, n=4))
    (tmp_path / "raw").mkdir()
    build_store(load_manifest("treesatai-ts"), tmp_path / "raw", tmp_path / "out", BuildOptions(quiet=True))
    written = tmp_path / "proposed.toml"
    result = CliRunner().invoke(main, ["stats", str(tmp_path / "out"), "--out", str(tmp_path / "stats"),
                                       "--write-manifest", str(written), "--quiet"])
    assert result.exit_code == 0, result.output
    s2 = json.loads((tmp_path / "stats" / "stats.json").read_text())["modalities"]["s2"]
    assert s2["groups"]["proposed"]["bands"] == [["B02", "B03", "B04"], ["B05", "B06", "B07", "B08", "B8A"],
                                                 ["B11", "B12"]]
    assert s2["groups"]["manifest"]["norm_groups"] == [4, 4, 2] and "[3, 5, 2]" in result.output
    proposed = load_manifest(written)
    assert proposed.modalities["s2"].norm_groups == (3, 5, 2)
    assert proposed.modalities["s2"].norm_factor == s2["norm_factor"]["proposed"] == 5000.0
    assert proposed.storage_sha256 == TileStore(tmp_path / "out").manifest.storage_sha256


@pytest.mark.parametrize(("dataset", "mode", "epoch", "crop"), [
    ("treesatai-ts", "train", 2, 0), ("pastis-hd", "train", 1, 5), ("flair-hub", "eval", 0, 0),
    ("real", "train", 1, 0)])
def test_sample_shows_exactly_the_rows_the_loader_yields(built, dataset, mode, epoch, crop):
    index = built(dataset) / "shards"
    store = TileStore(built(dataset) / "out")
    tile = store.tile_ids[int(store.split_indices("train")[0])]
    manifest = store.manifest
    loader = make_loader(StreamConfig(str(index), "train", mode=mode, seed=7, batch_size=2), manifest, rank=0,
                         world_size=1)
    loader.set_epoch(epoch)
    expected = rows([to_model_batch(b, manifest, "cpu") for b in loader])[(tile, crop)]
    for location in (built(dataset) / "out", index):
        view = tile_figure(location, tile, SampleOptions(mode=mode, seed=7, epoch=epoch, crop=crop))
        for key, value in expected.items():
            if key not in ("valid", "crop_index"):
                assert view.arrays[key].dtype == value.dtype and np.array_equal(view.arrays[key], value,
                                                                                 equal_nan=True), key


@pytest.mark.parametrize("dataset", DATASETS)
def test_show_writes_a_deterministic_figure_of_every_dataset(built, dataset, tmp_path):
    store = TileStore(built(dataset) / "out")
    tile = store.tile_ids[0]
    args = ["show", str(built(dataset) / "out"), tile, "--out"]
    first = CliRunner().invoke(main, [*args, str(tmp_path / "a.png")])
    assert first.exit_code == 0, first.output
    assert first.output.strip() == str(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)
    if dataset == "treesatai-ts":
        again = CliRunner().invoke(main, ["show", str(built(dataset) / "shards"), tile, "--out",
                                          str(tmp_path / "b.png")])
        assert again.exit_code == 0, again.output
        assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # index = store, bytes fixed
    if dataset in ("pastis-hd", "real"):  # the arrays of every --sample view: test_sample_shows_exactly_...
        sample = CliRunner().invoke(main, [*args, str(tmp_path / "s.png"), "--sample", "--epoch", "2", "--seed", "3"])
        assert sample.exit_code == 0, sample.output
        assert (tmp_path / "s.png").read_bytes().startswith(PNG)


def test_show_marks_the_steps_the_official_rule_selects(built):
    store = TileStore(built("real") / "out")
    view = tile_figure(built("real") / "out", store.tile_ids[0])
    s2 = next(s for s in view.sections if s.title.startswith("s2:"))
    framed = [p for p in s2.panels if p.highlight]
    assert len(s2.panels) == store.read_series(0, "s2").data.shape[0] and len(framed) == 16
    assert all(p.overlay is not None for p in s2.panels)
    labels = view.sections[-1].panels[0]
    assert labels.kind == "bars" and np.array_equal(labels.data, store.read_target(0, "treesat_mlc_thresh"))


@pytest.mark.parametrize(("args", "message"), [
    (["show", "{store}", "nope", "--out", "{tmp}/x.png"], "no tile 'nope'"),
    (["show", "{index}", "nope", "--out", "{tmp}/x.png"], "no tile 'nope' in any shard"),
    (["show", "{store}", "{tile}", "--out", "{tmp}/x.png", "--sample", "--crop", "3"], "not one of the 1 crops"),
    (["show", "{store}", "{tile}", "--out", "{tmp}/x.png", "--manifest", "pastis-hd"], "other stored data"),
    (["stats", "{store}", "--out", "{tmp}", "--split", "bogus"], "no split 'bogus'"),
    (["stats", "{store}", "--out", "{tmp}", "--split", "train", "--subset", "50"], "no 50 % subset"),
])
def test_bad_inputs_are_one_line_errors(built, tmp_path, args, message):
    root = built("treesatai-ts")
    tile = TileStore(root / "out").tile_ids[0]
    args = [a.format(store=root / "out", index=root / "shards", tmp=tmp_path, tile=tile) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
