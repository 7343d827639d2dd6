"""Prediction throughput (tiles/s, CPU, one process) of `maestro-model predict` for the tiny and base models, on
synthetic real-layout tiles: FLAIR-HUB (segmentation: one 512 px crop per tile -> COG) and TreeSatAI-TS
(classification -> GeoJSON). Untrained weights: the work is the same as a trained model's.

    python benchmarks/predict_throughput.py [--tiles 6] [--sizes tiny,base] [--workdir DIR]

Time is wall time of the whole predict call (loading the checkpoint, reading shards, model forward, writing COGs /
records, then the VRT or GeoJSON): a few tiles include the start-up cost, so the figure is a floor.
The LAST line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.manifest import load_manifest
from maestro_data.synthetic import generate
from maestro_model.checkpoints import save_model
from maestro_model.model import build_model
from maestro_model.predict import PredictOptions, predict

TINY = dict(inter_depth=1, embed_dim=24, depth=2, heads=2, dim_head=8, mlp_ratio=2, decoder_dim=24, decoder_depth=1,
            decoder_heads=2, decoder_dim_head=8, decoder_mlp_ratio=2)


def _shards(dataset: str, tiles: int, work: Path) -> Path:
    manifest = load_manifest(dataset)
    raw = generate(dataset, work / "raw" / dataset, tiles=tiles, seed=0)
    out = work / dataset
    build_store(manifest, raw, out, BuildOptions(quiet=True))
    compute_subsets(out, (50,))
    write_shards(out, out / "shards", ShardOptions(quiet=True))
    return out / "shards"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=6)
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="predict-bench-"))
    results = {}
    acc = Accelerator(cpu=True)
    for dataset in ("treesatai-ts", "flair-hub"):
        shards = _shards(dataset, args.tiles, work)
        manifest = load_manifest(dataset)
        for size in args.sizes.split(","):
            model = build_model(manifest, size, "inter-group", **(TINY if size == "tiny" else {}))
            ckpt = work / f"{dataset}-{size}.safetensors"
            save_model(model, ckpt)
            out = work / f"pred-{dataset}-{size}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = predict(PredictOptions(str(ckpt), str(shards), out, split="all", batch_size=4, quiet=True),
                              acc)
            seconds = time.perf_counter() - t0
            results[f"{dataset}/{size}"] = {"tiles": summary["tiles"], "seconds": round(seconds, 2),
                                            "tiles_per_s": round(summary["tiles"] / seconds, 3)}
            print(f"{dataset:13s} {size:5s} {summary['tiles']} tiles in {seconds:6.1f} s: "
                  f"{summary['tiles'] / seconds:.2f} tiles/s ({torch.get_num_threads()} threads)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
