"""Planning an epoch from a planet-scale shard index, one process: schema 2 (O(shards) index.json, per-shard
sidecars) beside schema 1 (every sample's key, tile id and member layout inline), on the same generated data.

Indexes are generated with real per-sample layouts of the FLAIR-HUB member set (every modality, its dates and
cloud masks, the targets and the metadata JSON; time-series lengths drawn per tile; tar headers and padding as the
shard writer lays them out) at 241,100 tiles / 900 shards, with one sidecar per shard, and at 10,000,000 tiles /
37,000 shards as index.json alone (planning never opens a sidecar; their digests are random there). Each figure is
measured in a fresh process: time from ``make_loader`` to the plan of rank 0 of 64, and the RSS that the opened
index, the table and the plan keep (VmRSS after minus before). Schema 1 is timed by parsing its index.json, which
its readers kept in every process. Last line: JSON.

    python benchmarks/index_scale.py [--small-tiles 241100 --small-shards 900 --large-tiles 10000000 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from maestro_data.manifest import load_manifest
from maestro_data.stream.index_format import INDEX_FORMAT, encode_sidecar, index_bytes, sample_key, sidecar_url

MANIFEST = load_manifest("flair-hub")
NPY_HEADER = 128
BLOCK = 512


def member_sizes(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """FLAIR-HUB fields in the writer's order and their byte sizes for ``n`` tiles (T drawn per tile)."""
    fields, columns = [], []
    for name, spec in MANIFEST.modalities.items():
        steps = np.ones(n, np.int64) if spec.temporal_bins == 1 else rng.integers(20, 121, n)
        pixels = spec.stored_channels * spec.tile_size ** 2 * np.dtype(spec.dtype).itemsize
        fields += [name, f"{name}_dates"]
        columns += [NPY_HEADER + steps * pixels, NPY_HEADER + steps * 6]
        if spec.cloud_mask is not None:
            mask = len(spec.cloud_mask.bands) * spec.tile_size ** 2 * np.dtype(spec.cloud_mask.dtype).itemsize
            fields.append(f"{name}_mask")
            columns.append(NPY_HEADER + steps * mask)
    for name, target in MANIFEST.targets.items():
        count = target.tile_size ** 2 if target.tile_size else target.num_classes
        fields.append(name)
        columns.append(np.full(n, NPY_HEADER + count * np.dtype(target.dtype).itemsize, np.int64))
    fields.append("json")
    columns.append(rng.integers(180, 260, n))
    return fields, np.stack(columns, axis=1)


def shard_layout(sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """The (samples, 1 + 2F) layout rows of consecutive samples (a 512-byte header before each member, data padded
    to whole blocks) and the shard's size (with tar's two end blocks, padded to a 10 KiB record)."""
    padded = -(-sizes // BLOCK) * BLOCK
    per_member = BLOCK + padded
    rel = np.cumsum(per_member, axis=1) - padded  # data offset of each member from the sample's start
    span = per_member.sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(span)[:-1]])
    rows = np.empty((len(sizes), 1 + 2 * sizes.shape[1]), np.int64)
    rows[:, 0], rows[:, 1::2], rows[:, 2::2] = starts, rel, sizes
    end = int(span.sum()) + 2 * BLOCK
    return rows, -(-end // 10240) * 10240


def tile_ids(first: int, n: int) -> list[str]:
    return [f"D{(first + i) % 95:03d}-2021_UU-S{(first + i) // 9000:04d}-{(first + i) % 9000}_1-2" for i in range(n)]


def generate(out: Path, tiles: int, shards: int, sidecars: bool, old_format: Path | None, seed: int = 0) -> int:
    """Write index.json (schema 2; with ``sidecars`` also every sidecar) and, with ``old_format``, the same set as
    a schema-1 index.json there. Returns index.json's size in bytes."""
    rng = np.random.default_rng(seed)
    counts = np.diff(np.linspace(0, tiles, shards + 1).astype(np.int64))
    splits = {"train": (0, int(0.8 * shards)), "val": (int(0.8 * shards), int(0.9 * shards)),
              "test": (int(0.9 * shards), shards)}
    columns = {s: {c: [] for c in ("url", "samples", "bytes", "sha256", "sidecar_bytes", "sidecar_sha256")}
               for s in splits}
    old = {s: [] for s in splits}
    first = 0
    for split, (lo, hi) in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for k in range(lo, hi):
            n = int(counts[k])
            url, sha = f"{split}/100-{k - lo:05d}.tar", rng.bytes(32).hex()
            fields, sizes = member_sizes(rng, n)
            rows, size = shard_layout(sizes)
            if sidecars or old_format is not None:
                ids = tile_ids(first, n)
                keys = [sample_key(t) for t in ids]
            if sidecars:
                body = encode_sidecar(sha, keys, ids, fields, rows.ravel().tolist())
                (out / sidecar_url(url)).write_bytes(body)
                side_bytes, side_sha = len(body), hashlib.sha256(body).hexdigest()
            else:  # planning never opens a sidecar: sized as the 241k ones are, digests random
                side_bytes, side_sha = 70 * n * len(fields) // 2, rng.bytes(32).hex()
            for name, value in zip(columns[split], (url, n, size, sha, side_bytes, side_sha), strict=True):
                columns[split][name].append(value)
            if old_format is not None:
                old[split].append({"url": url, "samples": n, "bytes": size, "sha256": sha, "keys": keys,
                                   "tile_ids": ids, "members": {"fields": fields, "samples": rows.tolist()}})
            first += n
    head = {"format": INDEX_FORMAT, "toolkit_version": "bench", "seed": 0,
            "manifest": {"name": MANIFEST.name, "sha256": MANIFEST.sha256, "text": MANIFEST.text}}
    index = {**head, "schema": 2, "splits": {s: {"tiers": {"100": c}, "subsets": {}, "samples": sum(c["samples"])}
                                             for s, c in columns.items()}}
    raw = index_bytes(index)
    (out / "index.json").write_bytes(raw)
    if old_format is not None:
        old_format.mkdir(parents=True, exist_ok=True)
        v1 = {**head, "schema": 1, "splits": {s: {"tiers": {"100": e}, "subsets": {},
                                                  "samples": sum(x["samples"] for x in e)} for s, e in old.items()}}
        (old_format / "index.json").write_text(json.dumps(v1, indent=1, sort_keys=True))
    return len(raw)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_plan(index: str, world: int) -> dict:
    """In a fresh process: plan rank 0's epoch; seconds, RSS kept, and one sidecar's fetch-and-check time."""
    import gc

    from maestro_data.stream.loader import StreamConfig, make_loader
    from maestro_data.stream.shard_table import shard_spans

    gc.collect()
    before = _rss_mb()
    start = time.perf_counter()
    loader = make_loader(StreamConfig(index, "train", batch_size=16), rank=0, world_size=world)
    plan = loader.plan(0)
    seconds = time.perf_counter() - start
    gc.collect()
    kept = _rss_mb() - before
    out = {"plan_s": seconds, "rss_mb": kept, "batches": plan.num_batches, "tiles": loader.table.num_tiles}
    if Path(index, "train", "100-00000.samples.json").exists():
        start = time.perf_counter()
        spans = shard_spans(loader.table, 0, loader.config.access())
        out["sidecar_ms"] = 1000 * (time.perf_counter() - start)
        out["sidecar_samples"] = len(spans)
    return out


def measure_old(index: str) -> dict:
    """In a fresh process: what every schema-1 reader did first, and kept: parse index.json."""
    import gc

    gc.collect()
    before = _rss_mb()
    start = time.perf_counter()
    parsed = json.loads(Path(index).read_bytes())
    seconds = time.perf_counter() - start
    gc.collect()
    return {"plan_s": seconds, "rss_mb": _rss_mb() - before, "shards": sum(
        len(t) for s in parsed["splits"].values() for t in s["tiers"].values())}


def in_fresh_process(fn, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-tiles", type=int, default=241_100)
    parser.add_argument("--small-shards", type=int, default=900)
    parser.add_argument("--large-tiles", type=int, default=10_000_000)
    parser.add_argument("--large-shards", type=int, default=37_000)
    parser.add_argument("--world", type=int, default=64)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="index_scale_"))
    start = time.perf_counter()
    small_bytes = generate(work / "small", args.small_tiles, args.small_shards, True, work / "small_v1")
    generate(work / "large", args.large_tiles, args.large_shards, False, None)
    print(f"generated in {time.perf_counter() - start:.0f} s under {work}")
    small = in_fresh_process(measure_plan, str(work / "small"), args.world)
    large = in_fresh_process(measure_plan, str(work / "large"), args.world)
    old = in_fresh_process(measure_old, str(work / "small_v1" / "index.json"))
    old_bytes = (work / "small_v1" / "index.json").stat().st_size
    large_bytes = (work / "large" / "index.json").stat().st_size
    print(f"{'':32s} {'index.json':>12s} {'plan rank 0/' + str(args.world):>16s} {'RSS kept':>10s}")
    print(f"{'schema 1, ' + format(args.small_tiles, ',') + ' tiles':32s} {old_bytes / 1e6:9.1f} MB "
          f"{old['plan_s']:14.2f} s {old['rss_mb']:7.0f} MB   (parse only)")
    print(f"{'schema 2, ' + format(args.small_tiles, ',') + ' tiles':32s} {small_bytes / 1e6:9.2f} MB "
          f"{small['plan_s']:14.2f} s {small['rss_mb']:7.1f} MB")
    print(f"{'schema 2, ' + format(args.large_tiles, ',') + ' tiles':32s} {large_bytes / 1e6:9.2f} MB "
          f"{large['plan_s']:14.2f} s {large['rss_mb']:7.1f} MB")
    print(f"one sidecar ({small['sidecar_samples']} samples) fetched and checked by the process that reads its "
          f"shard: {small['sidecar_ms']:.1f} ms; rank 0 plans {small['batches']} / {large['batches']} batches")
    print(json.dumps({"index_241k_plan_s": round(small["plan_s"], 3), "index_241k_rss_mb": round(small["rss_mb"], 1),
                      "index_10m_plan_s": round(large["plan_s"], 3), "index_10m_rss_mb": round(large["rss_mb"], 1),
                      "index_241k_bytes": small_bytes, "schema1_241k_bytes": old_bytes,
                      "schema1_241k_parse_s": round(old["plan_s"], 3), "schema1_241k_rss_mb": round(old["rss_mb"], 1)}))


if __name__ == "__main__":
    main()
