"""`maestro-model predict`: maps on the source label grid, equal to the model's argmax, TTA, mosaic, unlabelled data.

FLAIR-HUB synthetic layout (real GeoTIFFs with CRS/transform) and an untrained tiny model: what is checked is where
and how predictions are written, not their quality. The real TreeSatAI-TS tile checks the classification footprint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from accelerate import Accelerator
from rasterio.windows import from_bounds

from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.manifest import load_manifest
from maestro_data.stream.collate import BatchBuffer, SampleTransform, TransformOptions
from maestro_data.stream.device import to_model_batch
from maestro_data.stream.shard_read import open_index
from maestro_data.stream.shard_table import ShardReader, load_table
from maestro_data.synthetic import generate
from maestro_model import predict as predict_mod
from maestro_model.checkpoints import save_model
from maestro_model.model import build_model
from maestro_model.predict import PredictOptions, predict
from maestro_model.predict_model import export_file

FLAIR = load_manifest("flair-hub")
TINY = dict(inter_depth=1, embed_dim=24, depth=2, heads=2, dim_head=8, mlp_ratio=2, decoder_dim=24, decoder_depth=1,
            decoder_heads=2, decoder_dim_head=8, decoder_mlp_ratio=2)


def _build(manifest, raw: Path, out: Path, **kw) -> Path:
    build_store(manifest, raw, out, BuildOptions(quiet=True, **kw))
    compute_subsets(out, (50,))
    write_shards(out, out / "shards", ShardOptions(quiet=True))
    return out / "shards"


def tiny_model(manifest, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(manifest, "tiny", "inter-group", **TINY).eval()


@pytest.fixture(scope="module")
def flair(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("predict-flair")
    raw = generate("flair-hub", tmp / "raw", tiles=4, seed=0)
    shards = _build(FLAIR, raw, tmp / "built")
    model = tiny_model(FLAIR)
    save_model(model, tmp / "tiny.safetensors")
    out = tmp / "pred"
    summary = predict(PredictOptions(str(tmp / "tiny.safetensors"), str(shards), out, split="all",
                                     probabilities=True, batch_size=3, quiet=True), Accelerator(cpu=True))
    return {"raw": raw, "shards": shards, "model": model, "out": out, "summary": summary, "tmp": tmp}


def _label_file(raw: Path, tile_id: str) -> Path:
    domain, zone_tile = tile_id.split("_", 1)
    matches = list(raw.glob(f"{domain}_AERIAL_LABEL-COSIA/*/*_{zone_tile}.tif"))
    assert len(matches) == 1, (tile_id, matches)
    return matches[0]


def test_cogs_lie_exactly_on_the_source_label_rasters(flair):
    cogs = sorted((flair["out"] / "cosia").glob("*.tif"))
    assert len(cogs) == flair["summary"]["tiles"] == 4
    for cog in cogs:
        record = json.loads((flair["out"] / "_tiles" / f"{cog.stem}.json").read_text())
        with rasterio.open(cog) as got, rasterio.open(_label_file(flair["raw"], record["tile_id"])) as src:
            assert got.crs == src.crs and got.transform == src.transform
            assert (got.width, got.height, got.nodata) == (src.width, src.height, src.nodata)
            assert got.dtypes == ("uint8",) and got.colormap(1)[0][:3] != (0, 0, 0)
            cosia = FLAIR.targets["cosia"]
            assert json.loads(got.tags(1)["CLASS_NAMES"]) == list(cosia.classes[:cosia.num_classes])
            assert got.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        with rasterio.open(flair["out"] / "cosia_probabilities" / cog.name) as p:
            assert p.count == FLAIR.targets["cosia"].num_classes and p.transform == got.transform
    metrics = json.loads((flair["out"] / "metrics.json").read_text())
    assert 0 <= metrics["cosia/miou"] <= 1 and metrics["cosia/tiles"] == 4 and "per_class_iou" in str(metrics)


def test_predictions_are_the_argmax_of_the_models_forward(flair):
    index, loc = open_index(flair["shards"])
    table = load_table(index, loc, FLAIR, "train", 100)
    transform = SampleTransform(FLAIR, TransformOptions(mode="eval", d4=False))
    buf = BatchBuffer(transform.output_spec(), table.num_tiles, d4_key=True)
    for row, (_, _, sample, error) in enumerate(ShardReader(table, FLAIR).read(list(range(table.num_tiles)))):
        assert error is None
        buf.fill(row, transform, sample, 0, 0, sample["meta"]["tile_id"])
    batch = buf.as_dict()
    with torch.no_grad():
        logits = flair["model"](to_model_batch({k: v for k, v in batch.items() if k != "tile_id"}, FLAIR, "cpu"),
                                "finetune")["cosia"]
    from maestro_data.stream.index_format import sample_key

    for row, tile_id in enumerate(batch["tile_id"]):
        with rasterio.open(flair["out"] / "cosia" / f"{sample_key(tile_id)}.tif") as got:
            np.testing.assert_array_equal(got.read(1), logits[row].argmax(0).numpy())


def test_vrt_opens_and_covers_the_union_of_the_tiles(flair):
    with rasterio.open(flair["out"] / "cosia.vrt") as vrt:
        bounds = []
        for cog in sorted((flair["out"] / "cosia").glob("*.tif")):
            with rasterio.open(cog) as tile:
                bounds.append(tile.bounds)
                window = from_bounds(*tile.bounds, vrt.transform).round_offsets().round_lengths()
                np.testing.assert_array_equal(vrt.read(1, window=window), tile.read(1))
        b = np.array(bounds)
        assert np.allclose(vrt.bounds, (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()))
        assert vrt.crs == "EPSG:2154" and vrt.colormap(1)[0][:3] != (0, 0, 0)


def test_rerun_skips_written_tiles(flair, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in (flair["out"] / "cosia").glob("*.tif")}
    monkeypatch.setattr(predict_mod.Predictor, "_predict", lambda self, todo: iter(()) if not todo else 1 / 0)
    predict(PredictOptions(str(flair["tmp"] / "tiny.safetensors"), str(flair["shards"]), flair["out"], split="all",
                           quiet=True), Accelerator(cpu=True))
    assert {p.name: p.stat().st_mtime_ns for p in (flair["out"] / "cosia").glob("*.tif")} == before


class PointwiseModel(torch.nn.Module):
    """A 1x1 convolution of the aerial image: commutes with every flip and rotation (D4-equivariant)."""

    def __init__(self, manifest):
        super().__init__()
        self.manifest = manifest
        torch.manual_seed(1)
        spec = manifest.modalities["aerial"]
        self.conv = torch.nn.Conv2d(spec.channels, manifest.targets["cosia"].num_classes, 1)
        self.rows = 0

    def forward(self, batch: dict, phase: str) -> dict:
        x = batch["aerial"][:, 0]
        self.rows += x.shape[0]
        return {"cosia": self.conv(x)}


def test_tta_d4_with_an_equivariant_model_equals_no_tta(flair, tmp_path, monkeypatch):
    model = PointwiseModel(FLAIR)
    monkeypatch.setattr(predict_mod, "load_predictor", lambda *a, **k: (model, "pointwise"))
    runs = {}
    for tta in (False, True):
        out = tmp_path / f"tta-{tta}"
        predict(PredictOptions("x", str(flair["shards"]), out, split="test", tta=tta, probabilities=True,
                               quiet=True), Accelerator(cpu=True))
        cog = next((out / "cosia").glob("*.tif"))
        with rasterio.open(cog) as c, rasterio.open(out / "cosia_probabilities" / cog.name) as p:
            runs[tta] = (c.read(1), p.read())
    assert model.rows == 1 + 8  # one row without TTA, the 8 D4 elements with it
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    assert np.abs(runs[True][1].astype(int) - runs[False][1]).max() <= 1  # uint8 rounding of equal float sums


def test_no_targets_build_then_predict(tmp_path):
    raw = generate("flair-hub", tmp_path / "raw", tiles=2, seed=3)
    for labels in raw.glob("*LABEL*"):
        shutil.rmtree(labels)
    shards = _build(FLAIR, raw, tmp_path / "built", labelled=False)
    index, _ = open_index(shards)
    assert index["labelled"] is False
    save_model(tiny_model(FLAIR), tmp_path / "m.safetensors")
    out = tmp_path / "pred"
    summary = predict(PredictOptions(str(tmp_path / "m.safetensors"), str(shards), out, split="all", quiet=True),
                      Accelerator(cpu=True))
    assert summary["tiles"] == 2 and not (out / "metrics.json").exists()
    from maestro_model.config import load_config
    from maestro_model.train import Trainer, TrainError

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
    cfg = load_config(demo, {"data.manifest": "flair-hub", "data.index": str(shards),
                             "train.output_dir": str(tmp_path / "run"), "train.quiet": True})
    with pytest.raises(TrainError, match="--no-targets"):
        Trainer(cfg)
    for cog in (out / "cosia").glob("*.tif"):
        tile_id = json.loads((out / "_tiles" / f"{cog.stem}.json").read_text())["tile_id"]
        domain, zone_tile = tile_id.split("_", 1)
        aerial = next(raw.glob(f"{domain}_AERIAL_RGBI/*/*_{zone_tile}.tif"))
        with rasterio.open(cog) as got, rasterio.open(aerial) as src:  # the label grid is the aerial's
            assert (got.crs, got.transform, got.shape) == (src.crs, src.transform, src.shape)


def _inside(ring: list[list[float]], x: float, y: float) -> bool:
    """Ray casting: whether (x, y) lies inside the closed ``ring``."""
    inside = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def test_real_treesatai_tile_geojson_footprint_contains_its_lonlat(real_sample, tmp_path):
    manifest = load_manifest("treesatai-ts")
    shards = _build(manifest, real_sample, tmp_path / "built", on_error="skip")
    save_model(tiny_model(manifest), tmp_path / "t.safetensors")
    out = tmp_path / "pred"
    predict(PredictOptions(str(tmp_path / "t.safetensors"), str(shards), out, split="all", quiet=True),
            Accelerator(cpu=True))
    target = next(iter(manifest.targets))
    collection = json.loads((out / f"{target}.geojson").read_text())
    index, loc = open_index(shards)
    table = load_table(index, loc, manifest, "train", 100)
    (_, _, sample, _), = ShardReader(table, manifest).read([0])
    feature = collection["features"][0]
    assert feature["properties"]["tile_id"] == sample["meta"]["tile_id"]
    ring = feature["geometry"]["coordinates"][0]
    assert _inside(ring, sample["meta"]["lon"], sample["meta"]["lat"])
    assert not _inside(ring, sample["meta"]["lon"] + 0.01, sample["meta"]["lat"])  # 60 m: ~0.0008 degrees
    classes = manifest.targets[target].classes
    assert set(feature["properties"]) >= {"predicted", *classes}
    assert (out / f"{target}.csv").read_text().splitlines()[0].startswith("tile_id,split,lon,lat,predicted")


def test_two_processes_write_every_tile_once_and_the_same_maps(flair, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "maestro_cli.model",
           "predict", "--checkpoint", str(flair["tmp"] / "tiny.safetensors"), "--index", str(flair["shards"]),
           "--split", "all", "--out", str(out), "--cpu", "--quiet", "--probabilities"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2  # two real ranks, not one process
    records = [json.loads(p.read_text()) for p in (out / "_tiles").glob("*.json")]
    assert sorted(r["tile_id"] for r in records) == sorted({r["tile_id"] for r in records})
    assert len(records) == 4 and {r["rank"] for r in records} == {0, 1}
    for cog in (flair["out"] / "cosia").glob("*.tif"):
        with rasterio.open(cog) as one, rasterio.open(out / "cosia" / cog.name) as two:
            np.testing.assert_array_equal(one.read(), two.read())
    assert json.loads((out / "metrics.json").read_text()) == json.loads((flair["out"] / "metrics.json").read_text())


def test_pastis_crops_are_stitched_back_on_the_128_px_tile(tmp_path):
    manifest = load_manifest("pastis-hd")
    raw = generate("pastis-hd", tmp_path / "raw", tiles=2, seed=0)
    shards = _build(manifest, raw, tmp_path / "built", on_error="skip")
    save_model(tiny_model(manifest), tmp_path / "p.safetensors")
    out = tmp_path / "pred"
    summary = predict(PredictOptions(str(tmp_path / "p.safetensors"), str(shards), out, split="all", batch_size=32,
                                     quiet=True), Accelerator(cpu=True))
    from maestro_data.build.tile_store import TileStore

    store = TileStore(tmp_path / "built")
    assert summary["tiles"] == int(store.valid.sum()) >= 1
    for cog in (out / "pastis_seg").glob("*.tif"):
        tile_id = json.loads((out / "_tiles" / f"{cog.stem}.json").read_text())["tile_id"]
        grid = store.read_tile(tile_id).grids["pastis_seg"]
        with rasterio.open(cog) as got:
            assert (got.width, got.height) == (grid.width, grid.height) == (128, 128)
            assert tuple(got.transform)[:6] == grid.transform and got.crs == grid.crs
            classes = got.read(1)
        assert len(np.unique(classes[:16, :16])) >= 1 and classes.max() < manifest.targets["pastis_seg"].num_classes


def test_tile_sum_averages_overlapping_crops_in_logit_space():
    from maestro_model.predict_tiles import TileSum, rank_tiles

    ts = TileSum("k", {}, expected=2)
    ts.add("t", torch.ones(2, 4, 4), (0, 0, 4), 6)
    ts.add("t", 3 * torch.ones(2, 4, 4), (2, 2, 4), 6)
    mean = ts.mean("t")
    assert mean[0, 0, 0] == 1 and mean[0, 3, 3] == 2 and mean[0, 5, 5] == 3 and mean[0, 0, 5] == 0
    assert sorted(rank_tiles(7, 0, 3) + rank_tiles(7, 1, 3) + rank_tiles(7, 2, 3)) == list(range(7))


def test_a_run_folder_predicts_with_the_weights_its_metrics_measured(tmp_path):
    def touch(*names):
        for n in names:
            (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / n).touch()

    touch("probe/model.safetensors", "probe/model-ema.safetensors")
    assert export_file(tmp_path, ema=True) == tmp_path / "probe/model.safetensors"  # probing evaluates raw weights
    touch("finetune/model.safetensors")
    assert export_file(tmp_path, ema=True) == tmp_path / "finetune/model.safetensors"  # train.ema = false
    touch("finetune/model-ema.safetensors")
    assert export_file(tmp_path, ema=True) == tmp_path / "finetune/model-ema.safetensors"
    assert export_file(tmp_path, ema=False) == tmp_path / "finetune/model.safetensors"
