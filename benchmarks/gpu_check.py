"""Trainer compute path on one device: MAESTRO on FLAIR-HUB, pretrain and finetune optimizer steps, samples/s and
MFU, fed by the stream loader from built shards (workers, pinned slots, ``to_model_batch`` on the device) vs by
synthetic batches already on the device: the same model, batch size and step, side by side in one run.

Run by ``benchmarks/gpu_check.sh`` (which builds the shards first); on CUDA: bf16 autocast, MAESTRO-B, each phase
freezing what it does not train as the trainer does. ``--tiny``: a tiny model on the CPU in float32, to test the
script. The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from maestro_data.manifest import load_manifest
from maestro_data.stream.loader import StreamConfig, StreamLoader, load_table, to_model_batch
from maestro_data.stream.shard_read import open_index
from maestro_model.flops import example_batch, implementation_counts
from maestro_model.hardware import peak_bf16_flops
from maestro_model.model import build_model
from maestro_model.runtime import freeze_for
from maestro_model.train_loop import target_loss

TINY = dict(embed_dim=24, depth=2, heads=2, dim_head=8, mlp_ratio=2, decoder_dim=24, decoder_depth=1,
            decoder_heads=2, decoder_dim_head=8, decoder_mlp_ratio=2)


def make_step(model: torch.nn.Module, manifest: Any, phase: str, device: torch.device,
              amp: bool) -> Callable[[dict], None]:
    """One optimizer step of ``phase`` (forward, backward, AdamW) on a batch already on ``device``."""
    freeze_for(model, phase)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            if phase == "pretrain":
                loss = model(batch, "pretrain", generator=gen).loss
            else:
                loss = target_loss(manifest, model(batch, "finetune"), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def stream(args: argparse.Namespace, manifest: Any, split: str, batch: int, device: torch.device) -> Iterator[dict]:
    """Loader batches on ``device``, epoch after epoch."""
    sc = StreamConfig(index=args.shards, split=split, mode="train", batch_size=batch, seed=0,
                      num_workers=args.workers, pin_memory=device.type == "cuda")
    index, location = open_index(args.shards, sc.access_options())
    loader = StreamLoader(sc, manifest, load_table(index, location, manifest, split, 100), 0, 1)
    try:
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for b in loader:
                yield to_model_batch(b, manifest, device)
            epoch += 1
    finally:
        loader.close()


def timed(step: Callable[[dict], None], batches: Iterator[dict], warmup: int, steps: int,
          sync: Callable[[], None]) -> float:
    """Seconds per step over ``steps`` steps after ``warmup`` (each step takes the next batch)."""
    for _ in range(warmup):
        step(next(batches))
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    sync()
    return (time.perf_counter() - start) / steps


def fitting_batch(step: Callable[[dict], None], manifest: Any, batch: int, device: torch.device) -> int:
    """``batch``, halved until a synthetic step fits in the GPU's memory."""
    while batch >= 1:
        try:
            step(example_batch(manifest, batch, device, torch.Generator().manual_seed(1)))
            return batch
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    raise SystemExit("gpu_check: not even a batch of 1 fits on the GPU")


def run_phase(args: argparse.Namespace, model: torch.nn.Module, manifest: Any, phase: str, device: torch.device,
              flops: int, peak: float | None) -> dict[str, Any]:
    step = make_step(model, manifest, phase, device, amp=not args.tiny)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = fitting_batch(step, manifest, args.batch, device) if device.type == "cuda" else args.batch
    fixed = example_batch(manifest, batch, device, torch.Generator().manual_seed(1))
    synthetic = timed(step, iter(lambda: fixed, None), args.warmup, args.steps, sync)
    fed = stream(args, manifest, "pretrain" if phase == "pretrain" else "train", batch, device)
    try:
        loader = timed(step, fed, args.warmup, args.steps, sync)
    finally:
        fed.close()
    row: dict[str, Any] = {"batch": batch, "train_gflops_per_sample": round(flops / 1e9, 2)}
    for name, sec in (("synthetic", synthetic), ("loader", loader)):
        row[f"{name}_samples_per_s"] = round(batch / sec, 2)
        row[f"{name}_mfu"] = round(flops * batch / sec / peak, 4) if peak else None
    row["loader_over_synthetic"] = round(synthetic / loader, 3)
    print(f"{phase}: {json.dumps(row)}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="built FLAIR-HUB shards (folder or index.json)")
    p.add_argument("--size", default="base")
    p.add_argument("--fusion", default="inter-group")
    p.add_argument("--batch", type=int, default=16, help="per step (CUDA: halved until it fits)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=6, help="loader worker processes")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    p.add_argument("--tiny", action="store_true", help="tiny model, CPU, float32: tests the script")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    manifest = load_manifest("flair-hub")
    options = TINY if args.tiny else {}
    size = "tiny" if args.tiny else args.size
    inter = 1 if args.tiny else None
    model = build_model(manifest, size, args.fusion, inter_depth=inter, **options).to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(name) if device.type == "cuda" else None
    counts = implementation_counts(manifest, size, args.fusion, inter_depth=inter, phases=("pretrain", "finetune"),
                                   backward=True, **options)
    result: dict[str, Any] = {"device": name, "precision": "fp32" if args.tiny else "bf16", "dataset": "flair-hub",
                              "size": size, "fusion": args.fusion, "parameters_M": round(counts["parameters"] / 1e6, 1)
                              if isinstance(counts.get("parameters"), int | float) else None,
                              "peak_bf16_tflops": peak / 1e12 if peak else None, "workers": args.workers}
    for phase in ("pretrain", "finetune"):
        result[phase] = run_phase(args, model, manifest, phase, device, counts["flops"][phase], peak)
    if device.type == "cuda":
        result["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
