"""Loader throughput on FLAIR-HUB-shaped tiles at real sizes: the same work side by side in ONE run on ONE core.

Every reader below delivers what the model needs (float32 normalised rasters, D4 applied, int64 training labels)
for FLAIR-HUB pretraining samples (train mode: random time steps, D4), in one process pinned to one core with
``torch.set_num_threads(1)``:

(a) ``gpu_path``: the host's work when normalisation, D4 and label mapping run on the accelerator: our stream
    (``make_loader``, num_workers=0, default options) yielding stored-dtype batches with ``batch["d4"]``; timed:
    shard reads, tar parsing, crops, temporal selection, collation. Not timed (no accelerator here): the host ->
    device copy and the device's ``to_model_batch`` work (on a CUDA machine the host only issues the copy).
(b) ``host_same_work``: (a) followed by ``to_model_batch(batch, manifest, "cpu")`` on every batch: the same work as
    (c), entirely on the host. ``host_all_in_loader`` is the other host-only option: the loader normalises and
    applies D4 itself (``normalize_on_device=False, d4_on_device=False``), ``to_model_batch`` widens the labels.
    ``to_model_batch_cpu`` times ``to_model_batch`` alone, on one epoch of (a)'s batches (output dropped each call,
    as a training loop does).
(c) ``official_style``: per sample, rasterio reads of every modality GeoTIFF, the S2 cloud mask and the label,
    time-major reshape, temporal selection, band selection, float32 / log / norm, D4 copies and label mapping, as
    IGNF/MAESTRO's ``__getitem__`` does (its crop window is the whole 102.4 m tile for FLAIR-HUB);
(d) ``raw_read``: a plain sequential read of the shard bytes (the I/O floor, no parsing).
(e) our stream with 0, 1 and 2 worker processes on every core the process may use: the wall rate after an epoch's
    first batch, that first batch's latency (epoch 1: worker start; later epochs: with the consumer at 2/3 of the
    loader's rate, as a training step slower than the loader leaves it), samples per worker CPU-second and the peak
    RSS of each worker (issue 16 targets: 1 worker >= 85 % of the in-process wall rate, epochs >= 2 first batch
    <= 0.1 s, <= 1.5 GB per worker, on a shard set of >= 30 batches per epoch: ``--tiles 320``).

Never timed: building the raw tiles, the store and the shards; each stream's warm-up epoch (the one-off header scan
of every shard); the model. Every file read of (a)-(d) comes from the page cache (the files were just written), so
both sides of each ratio read warm files. Targets (issue 14): (b) >= 15x (c), (a) >= 50 % of (d),
``to_model_batch_cpu`` >= 250 samples/s. Tiles: aerial 4x512² uint8, DEM 2x512² float32, COSIA 512² uint8, S2 T~50 x
10 x 10² uint16 + 2-band mask, S1 asc/desc T~70 x 2 x 10² float32.

    python benchmarks/loader_throughput.py [--tiles 64] [--seconds 3] [--workdir DIR] [--only-workers]

Rates of (a)-(d) are samples per CPU-second of the (single-core-pinned) process, i.e. per core, which stays
meaningful when other jobs share the machine; the wall-clock rates are printed beside them (``*_wall``). (e) uses
only public loader options, so the same script measures an older checkout (``PYTHONPATH=<its root>``).

The LAST line printed is one JSON object with the figures: ``gpu_path_samples_per_s`` (a, also
``stream_samples_per_s``), ``host_same_work_samples_per_s`` (b), ``official_style_samples_per_s`` (c),
``raw_read_samples_per_s`` (d), ``to_model_batch_cpu_samples_per_s``, ``ratio_vs_official_same_work`` = (b)/(c),
``ratio_vs_official_gpu_path`` = (a)/(c) and ``gpu_path_vs_raw_read`` = (a)/(d).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from maestro_data.build.pipeline import BuildOptions, build_store
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.build.tile_store import TileStore
from maestro_data.manifest import load_manifest
from maestro_data.sources.flair import split_patch_id
from maestro_data.stream.augment import d4_apply, random_d4
from maestro_data.stream.index_format import all_entries
from maestro_data.stream.loader import StreamConfig, make_loader, to_model_batch
from maestro_data.stream.temporal import apply_selection, normalise, select_steps
from maestro_data.synthetic.flair import generate

MANIFEST = load_manifest("flair-hub")


class Clock:
    """Samples per CPU-second of this process (the per-core rate, robust on a shared machine) and per wall second."""

    def __init__(self) -> None:
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall

    def rates(self, n: int) -> tuple[float, float]:
        return n / (time.process_time() - self.cpu), n / (time.perf_counter() - self.wall)


def prepare(work: Path, tiles: int) -> tuple[Path, Path]:
    """Raw FLAIR-HUB layout -> store -> shards (in a child process, so its memory is not counted below)."""
    out, shards = work / "out", work / "shards"
    raw = Path((work / "raw_root.txt").read_text()) if (work / "raw_root.txt").is_file() else None
    if raw is None or not (shards / "index.json").is_file():
        raw = generate(work / "raw", tiles=tiles, t_s2=50, t_s1=70, spot=False)
        (work / "raw_root.txt").write_text(str(raw))
        build_store(MANIFEST, raw, out, BuildOptions(workers=2, quiet=True, overwrite=True))
        write_shards(out, shards, ShardOptions(quiet=True))
    return raw, out


def official_style(raw: Path, store: TileStore, mode: str, seconds: float) -> tuple[float, float]:
    """(c) samples/s of a per-sample raw-file reader in the official style (see the module docstring)."""
    rng = np.random.default_rng(0)
    dates = {m: [store.read_series(i, m).dates for i in range(len(store))] for m in MANIFEST.modalities}
    n, clock = 0, Clock()
    while clock.elapsed() < seconds:
        i = n % len(store)
        keys = split_patch_id(store.tile_ids[i], str(raw))
        k = random_d4(rng)
        out = {}
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
            for m, spec in MANIFEST.modalities.items():
                size = spec.tile_size
                window = Window(0, 0, size, size)
                with rasterio.open(raw / spec.source.format(**keys)) as src:
                    data = src.read(window=window).reshape(-1, spec.stored_channels, size, size)
                mask = None
                if spec.cloud_mask is not None:
                    with rasterio.open(raw / spec.cloud_mask.source.format(**keys)) as src:
                        mask = src.read(window=window).reshape(-1, len(spec.cloud_mask.bands), size, size)
                t, d = data.shape[0], spec.temporal_bins
                idx = select_steps(data, d, mask=mask, threshold=spec.cloud_mask.threshold if mask is not None else 0,
                                   mode=mode, rng=rng if mode == "train" else None,
                                   channels=spec.select) if t != d else np.arange(t)
                x, _ = apply_selection(data, dates[m][i], idx)
                x = normalise(x[:, list(spec.select)], spec.log_scale, spec.norm_factor)
                out[m] = np.ascontiguousarray(d4_apply(x, k))  # the official flips/transposes copy
            for name, t in MANIFEST.targets.items():
                with rasterio.open(raw / t.source.format(**keys)) as src:
                    labels = src.read(1).astype(np.int64)
                labels[np.isin(labels, t.ignore)] = t.missing_value
                out[name] = np.ascontiguousarray(d4_apply(labels, k))
        n += 1
    return clock.rates(n)


def stream_rate(shards: Path, split: str, mode: str, seconds: float, to_model: bool = False,
                all_in_loader: bool = False) -> tuple[float, float, int]:
    """(a) samples/s of our loader (one process, num_workers=0) and its batch count per epoch; ``to_model``: (b),
    each batch also through ``to_model_batch`` on the CPU; ``all_in_loader``: the loader normalises and applies D4
    on the host itself."""
    config = StreamConfig(str(shards), split, mode=mode, batch_size=8, normalize_on_device=not all_in_loader,
                          d4_on_device=not all_in_loader)
    loader = make_loader(config, MANIFEST)
    for _ in loader:  # warm-up epoch: the one-off header scan of every shard
        pass
    n, epoch, clock = 0, 1, Clock()
    while clock.elapsed() < seconds:
        loader.set_epoch(epoch)
        for batch in loader:
            if to_model:
                to_model_batch(batch, MANIFEST, "cpu")
            n += int(batch["valid"].sum())
        epoch += 1
    return (*clock.rates(n), len(loader))


def to_model_rate(shards: Path, seconds: float) -> tuple[float, float]:
    """samples/s of ``to_model_batch(batch, manifest, "cpu")`` alone on one epoch of (a)'s pretraining batches
    (copied out of the loader first; the output is dropped at each call, as a training loop drops its batch)."""
    loader = make_loader(StreamConfig(str(shards), "pretrain", mode="train", batch_size=8), MANIFEST)
    batches = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loader]
    to_model_batch(batches[0], MANIFEST, "cpu")  # warm-up: label table, reused buffers
    n, clock = 0, Clock()
    while clock.elapsed() < seconds:
        for batch in batches:
            to_model_batch(batch, MANIFEST, "cpu")
            n += int(batch["valid"].sum())
    return clock.rates(n)


def raw_read_rate(shards: Path, seconds: float) -> tuple[float, float]:
    """(d) samples/s of reading every shard's bytes in order (1 MiB reads, no parsing)."""
    index = json.loads((shards / "index.json").read_text())
    entries = all_entries(index)
    n, clock = 0, Clock()
    while clock.elapsed() < seconds:
        for e in entries:
            with open(shards / e["url"], "rb") as f:
                while f.read(1 << 20):
                    pass
            n += e["samples"]
    return clock.rates(n)


def _children() -> list[int]:
    """This process's child processes (loader workers), without multiprocessing's resource tracker."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            pids += [int(p) for p in (task / "children").read_text().split()]
    out = []
    for pid in pids:
        try:
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def _cpu_s_and_peak_mb(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(hwm.split()[1]) / 1024


def worker_run(shards: Path, workers: int, seconds: float) -> dict:
    """(e) One loader with ``workers`` processes: epoch 1 cold, then loader-bound epochs for ``seconds`` (the wall
    rate after each epoch's first batch), then 3 epochs with a consumer at 2/3 of that rate (first-batch latency)."""
    loader = make_loader(StreamConfig(str(shards), "pretrain", batch_size=8, num_workers=workers), MANIFEST)
    seen: dict[int, float] = {}
    usage = {"cpu": 0.0, "rss": 0.0}

    def observe() -> None:  # while the workers live (an older loader stopped its workers at each epoch's end)
        for pid in _children():
            try:
                cpu, peak = _cpu_s_and_peak_mb(pid)
            except (OSError, StopIteration):
                continue
            usage["cpu"] += cpu - seen.get(pid, 0.0)
            seen[pid] = cpu
            usage["rss"] = max(usage["rss"], peak)

    def epoch(e: int, pace: float = 0.0) -> tuple[float, int, float]:
        loader.set_epoch(e)
        start = time.perf_counter()
        it = iter(loader)
        next(it)  # not kept: a held batch's memory is not reused
        first = time.perf_counter()
        n = 0
        for i, batch in enumerate(it):
            n += int(batch["valid"].sum())
            if i == len(loader) - 3:
                observe()
            if pace:
                time.sleep(pace)
        return first - start, n, time.perf_counter() - first

    cold, _, _ = epoch(0)
    observe()
    cpu0, worker_cpu0 = time.process_time(), usage["cpu"]
    e, n, spent, bound = 1, 0, 0.0, []
    while spent < seconds or e < 3:
        latency, k, t = epoch(e)
        bound.append(latency)
        n, spent, e = n + k, spent + t, e + 1
    observe()
    cpu = (usage["cpu"] - worker_cpu0) if workers else time.process_time() - cpu0
    pace = 1.5 * spent / n * 8  # seconds per batch of 8: the consumer at 2/3 of the loader's rate
    paced = [epoch(e + i, pace)[0] for i in range(3)][1:]  # the first one follows a loader-bound epoch
    observe()
    if hasattr(loader, "close"):  # an older loader has none
        loader.close()
    return {"first_batch_s": cold, "samples_per_s_wall": n / spent, "samples_per_cpu_s": n / max(cpu, 1e-9),
            "epoch_first_batch_s": max(paced), "epoch_first_batch_s_loader_bound": max(bound[1:]),
            "rss_mb": usage["rss"]}


def workers_section(shards: Path, seconds: float) -> dict:
    """(e) side by side: in-process, 1 worker, 2 workers, on every core this process may use."""
    res: dict = {}
    for workers, name in ((0, "inprocess"), (1, "1worker"), (2, "2workers")):
        for key, value in worker_run(shards, workers, seconds).items():
            if key == "rss_mb":
                if workers:
                    res[f"rss_mb_per_worker_{name}"] = round(value, 1)
            else:
                res[f"stream_{name}_{key}"] = value
    res["stream_1worker_vs_inprocess_wall"] = (res["stream_1worker_samples_per_s_wall"]
                                               / res["stream_inprocess_samples_per_s_wall"])
    res["epoch_first_batch_s"] = max(res["stream_1worker_epoch_first_batch_s"],
                                     res["stream_2workers_epoch_first_batch_s"])
    return res


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per measurement")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only-workers", action="store_true", help="measure (e) only")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loader_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        raw, out = pool.submit(prepare, work, args.tiles).result()
    shards = work / "shards"
    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    # (e) first, on every core: the single-core pin below would put the workers on one core with the consumer
    res: dict = {"tiles": args.tiles, "batch_size": 8, "cores_workers_section": len(cores),
                 **workers_section(shards, args.seconds)}
    if args.only_workers:
        return report(res)
    os.sched_setaffinity(0, {cores[0]})  # one core for every other measurement
    res.update({"cores": 1, "torch_threads": torch.get_num_threads(),
                "rates": "samples per CPU-second (wall in *_wall)"})
    # the stream first: the peak RSS then covers imports + the stream only (train mode, default settings)
    for mode, split in (("train", "pretrain"), ("eval", "test")):
        for name, kw in (("gpu_path", {}), ("host_same_work", {"to_model": True}),
                         ("host_all_in_loader", {"to_model": True, "all_in_loader": True})):
            cpu, wall, batches = stream_rate(shards, split, mode, args.seconds, **kw)
            res[f"{name}_{mode}_samples_per_s"], res[f"{name}_{mode}_samples_per_s_wall"] = cpu, wall
            if (name, mode) == ("gpu_path", "train"):
                res["rss_mb_per_worker"] = round(peak_rss_mb(), 1)
                res["train_batches_per_epoch"] = batches
    res["to_model_batch_cpu_samples_per_s"], res["to_model_batch_cpu_samples_per_s_wall"] = \
        to_model_rate(shards, args.seconds)
    store = TileStore(out)
    for mode in ("train", "eval"):
        res[f"official_style_{mode}_samples_per_s"], res[f"official_style_{mode}_samples_per_s_wall"] = \
            official_style(raw, store, mode, args.seconds)
    res["raw_read_samples_per_s"], res["raw_read_samples_per_s_wall"] = raw_read_rate(shards, args.seconds)
    res["shard_mb_per_sample"] = round(sum(p.stat().st_size for p in shards.rglob("*.tar")) / 2**20 / args.tiles, 2)
    # the headline figures: FLAIR-HUB pretraining samples (train mode)
    for name in ("gpu_path", "host_same_work", "host_all_in_loader", "official_style"):
        res[f"{name}_samples_per_s"] = res[f"{name}_train_samples_per_s"]
    res["stream_samples_per_s"] = res["gpu_path_samples_per_s"]
    official = res["official_style_samples_per_s"]
    res["ratio_vs_official_same_work"] = res["host_same_work_samples_per_s"] / official
    res["ratio_vs_official_gpu_path"] = res["gpu_path_samples_per_s"] / official
    res["ratio_vs_official_same_work_eval"] = (res["host_same_work_eval_samples_per_s"]
                                               / res["official_style_eval_samples_per_s"])
    res["ratio_vs_official_gpu_path_eval"] = (res["gpu_path_eval_samples_per_s"]
                                              / res["official_style_eval_samples_per_s"])
    res["gpu_path_vs_raw_read"] = res["gpu_path_samples_per_s"] / res["raw_read_samples_per_s"]
    res["target_same_work_ge_15x_official"] = res["ratio_vs_official_same_work"] >= 15
    res["target_gpu_path_ge_half_raw_read"] = res["gpu_path_vs_raw_read"] >= 0.5
    res["target_to_model_batch_cpu_ge_250"] = res["to_model_batch_cpu_samples_per_s"] >= 250
    report(res)


def report(res: dict) -> None:
    res = {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}
    for k, v in res.items():
        print(f"{k:48s} {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
