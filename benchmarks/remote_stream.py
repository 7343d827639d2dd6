"""Streaming FLAIR-HUB-shaped shards from local files, HTTP and S3 side by side in ONE run: the same epochs of the
same loader (train mode, batch 8, one process, ``num_workers=0``) from

  local   the shard folder on disk;
  http    a local HTTP server (127.0.0.1, byte ranges), cold: no cache, every epoch reads the server;
  cached  the same server with ``cache_dir``: the first epoch fills the cache (not timed), later ones read it;
  s3      moto's S3 server (server mode, through s3fs), cold;
  faults  the HTTP server injecting a fault (503, reset, truncated body, short Content-Length, slow response) into
          every 2nd request: ``faults_exact`` is true when that epoch's batches equal the local epoch's bit for bit.

Rates are valid samples per wall-clock second over whole epochs after an untimed first epoch (at least
``--seconds`` per figure); loopback
servers share the machine's cores with the loader, so remote figures measure the access layer's overhead, not a
network. Tiles: aerial 4x512² uint8, DEM 2x512² float32, S2 T=50 + mask, S1 asc/desc T=70, COSIA labels.
The LAST line printed is one JSON object.

    python benchmarks/remote_stream.py [--tiles 32] [--seconds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the servers the tests start

from faultserver import Faults, FaultServer, moto_s3  # noqa: E402

from maestro_data.build.pipeline import BuildOptions, build_store  # noqa: E402
from maestro_data.build.shards import ShardOptions, write_shards  # noqa: E402
from maestro_data.manifest import load_manifest  # noqa: E402
from maestro_data.stream.loader import StreamConfig, make_loader  # noqa: E402
from maestro_data.synthetic.flair import generate  # noqa: E402

MANIFEST = load_manifest("flair-hub")


def prepare(work: Path, tiles: int) -> Path:
    shards = work / "shards"
    if not (shards / "index.json").is_file():
        raw = generate(work / "raw", tiles=tiles, t_s2=50, t_s1=70, spot=False)
        build_store(MANIFEST, raw, work / "out", BuildOptions(workers=2, quiet=True, overwrite=True))
        write_shards(work / "out", shards, ShardOptions(shard_bytes=24 << 20, quiet=True))
    return shards


def loader(index: str, **options):
    return make_loader(StreamConfig(index, "train", batch_size=8, seed=0, **options), MANIFEST)


def epoch(stream, epoch_no: int) -> list[dict]:
    stream.set_epoch(epoch_no)
    return list(stream)


def rate(stream, seconds: float) -> tuple[float, list[dict]]:
    """Valid samples per second over whole epochs (1, 2, ...) of one loader lasting at least ``seconds``, after an
    untimed epoch 0 (the process's first-use costs; for the cached loader, the fill); epoch 1's batches are
    returned for comparison."""
    epoch(stream, 0)
    n, e, first, start = 0, 1, None, time.perf_counter()
    while time.perf_counter() - start < seconds or first is None:
        batches = epoch(stream, e)
        first = first or batches
        n += sum(int(b["valid"].sum()) for b in batches)
        e += 1
    return n / (time.perf_counter() - start), first


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["tile_id"] == y["tile_id"] and all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))
        for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="remote_bench_"))
    shards = prepare(work, args.tiles)
    torch.set_num_threads(1)
    local, reference = rate(loader(str(shards)), args.seconds)
    s3 = moto_s3()
    try:
        with FaultServer(shards.parent) as http:
            url = f"{http.url}/shards"
            cold, cold_batches = rate(loader(url), args.seconds)
            cached_loader = loader(url, cache_dir=str(work / "cache"))
            epoch(cached_loader, 0)  # fills the cache
            filled = sum(http.bytes_sent.values())
            cached, cached_batches = rate(cached_loader, args.seconds)
            cached_remote_bytes = sum(http.bytes_sent.values()) - filled
            faulty_loader = loader(url, retries=8, timeout_s=0.5, backoff_s=0.05)
            http.faults = Faults(every=2, slow_s=1.0)
            faulty = epoch(faulty_loader, 1)
            injected = dict(http.faults.injected)
        s3_url = s3.upload(shards, "bench", "flair-hub/shards")
        s3_rate, s3_batches = rate(loader(s3_url, storage_options=s3.storage_options), args.seconds)
    finally:
        s3.stop()
    exact = {"http": same(cold_batches, reference), "cached": same(cached_batches, reference),
             "s3": same(s3_batches, reference), "faults": same(faulty, reference)}
    size = sum(p.stat().st_size for p in shards.rglob("*.tar"))
    print(f"{args.tiles} FLAIR-HUB-shaped tiles, {size / 1e6:.0f} MB of shards; samples/s (wall):")
    for name, value in (("local", local), ("http cold", cold), ("http cached", cached), ("s3 (moto) cold", s3_rate)):
        print(f"  {name:16s} {value:8.1f}   {value / local:5.2f}x local")
    print(f"cached epochs read {cached_remote_bytes} remote bytes; faults injected {injected}; "
          f"batches equal to local: {exact}")
    print(json.dumps({"local_samples_per_s": round(local, 1), "http_cold_samples_per_s": round(cold, 1),
                      "http_cached_samples_per_s": round(cached, 1), "s3_cold_samples_per_s": round(s3_rate, 1),
                      "faults_exact": exact["faults"], "all_backends_exact": all(exact.values()),
                      "cached_remote_bytes": cached_remote_bytes, "faults_injected": sum(injected.values())}))


if __name__ == "__main__":
    main()
