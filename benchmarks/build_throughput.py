"""Build throughput on FLAIR-HUB-shaped tiles at real sizes: convert (tiles/s/core), store size vs raw bytes,
compression candidates side by side, and shard writing MB/s.

Tiles: aerial 4x512² uint8, elevation 2x512² float32, COSIA 512² uint8, S2 T~50 x 10 x 10² uint16 + mask,
S1 asc/desc T~70 x 2 x 10² float32 (synthetic, real layout, smooth fields). Targets (issue): >= 60 tiles/s/core,
store <= 0.8x raw bytes (lossless).

    python benchmarks/build_throughput.py [--tiles 64] [--workdir DIR]

The LAST line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

from maestro_data.build import BuildOptions, build_store
from maestro_data.manifest import load_manifest
from maestro_data.shards import ShardOptions, write_shards
from maestro_data.store import TileStore
from maestro_data.synthetic.flair import generate


def _tree_bytes(path: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}") if p.is_file())


def compare_codecs(store: TileStore, tiles: int) -> dict:
    """Ratio and encode speed of candidate codecs on the same tiles (the store's default is blosc-lz4)."""
    candidates = {
        "blosc-zstd3-shuffle": lambda it: Blosc("zstd", 3, Blosc.BITSHUFFLE if it == 1 else Blosc.SHUFFLE),
        "blosc-lz4-shuffle (default)": lambda it: Blosc("lz4", 5, Blosc.BITSHUFFLE if it == 1 else Blosc.SHUFFLE),
        "blosc-zstd1-shuffle": lambda it: Blosc("zstd", 1, Blosc.BITSHUFFLE if it == 1 else Blosc.SHUFFLE),
        "zstd3 (no shuffle)": lambda it: Zstd(3),
    }
    arrays = []
    for i in range(min(tiles, 16)):
        tile = store.read_tile(i)
        arrays += [np.ascontiguousarray(s.data) for s in tile.series.values()]
        arrays += [np.ascontiguousarray(s.mask) for s in tile.series.values() if s.mask is not None]
        arrays += [np.ascontiguousarray(t) for t in tile.targets.values()]
    raw = sum(a.nbytes for a in arrays)
    out = {}
    for name, make in candidates.items():
        t0 = time.perf_counter()
        size = sum(len(make(a.dtype.itemsize).encode(a)) for a in arrays)
        dt = time.perf_counter() - t0
        out[name] = {"ratio": round(size / raw, 4), "encode_MB_per_s": round(raw / dt / 1e6, 1)}
    return out


def geotiff_read_floor(src: Path, tiles: int) -> float:
    """Tiles/s of merely opening and reading every GeoTIFF of the converted modalities (the rasterio/GDAL floor)."""
    import rasterio

    files = list(src.rglob("*.tif"))
    t0 = time.process_time()
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        for path in files:
            with rasterio.open(path) as ds:
                ds.read()
    return tiles / (time.process_time() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        src = generate(tmp / "raw", tiles=args.tiles, seed=0, t_s2=50, t_s1=70, spot=False)
        gen_s = time.perf_counter() - t0
        raw_tif = _tree_bytes(src, ".tif")
        manifest = load_manifest("flair-hub")
        cpu0 = time.process_time()
        report = build_store(manifest, src, tmp / "out", BuildOptions(workers=1, quiet=True))
        cpu = time.process_time() - cpu0
        store = TileStore(tmp / "out")
        store_bytes = _tree_bytes(store.path)
        print(f"generated {args.tiles} tiles in {gen_s:.1f} s; raw GeoTIFFs {raw_tif / 1e6:.1f} MB")
        print(f"convert: {report['seconds']:.2f} s wall, {cpu:.2f} s CPU (one process) -> "
              f"{args.tiles / cpu:.1f} tiles/s/core; store {store_bytes / 1e6:.1f} MB")
        floor = geotiff_read_floor(src, args.tiles)
        print(f"reading the GeoTIFFs alone (no conversion): {floor:.1f} tiles/s of CPU")
        codecs = compare_codecs(store, args.tiles)
        for name, r in codecs.items():
            print(f"  codec {name:32s} ratio {r['ratio']:.3f}  encode {r['encode_MB_per_s']:.0f} MB/s")
        t1 = time.perf_counter()
        index = write_shards(tmp / "out", tmp / "shards", ShardOptions(shard_bytes=256 << 20, quiet=True))
        shard_s = time.perf_counter() - t1
        shard_bytes = sum(e["bytes"] for s in index["splits"].values() for t in s["tiers"].values() for e in t)
        print(f"shards: {shard_bytes / 1e6:.1f} MB in {shard_s:.2f} s")
        result = {
            "tiles": args.tiles,
            "tiles_per_s_per_core": round(args.tiles / cpu, 2),
            "tiles_per_s_wall_one_process": round(args.tiles / report["seconds"], 2),
            "geotiff_read_only_tiles_per_s": round(floor, 2),
            "cpu_seconds_per_tile": round(cpu / args.tiles, 4),
            "store_to_raw_bytes": round(store_bytes / raw_tif, 4),
            "raw_mb": round(raw_tif / 1e6, 1),
            "store_mb": round(store_bytes / 1e6, 1),
            "shard_write_mb_per_s": round(shard_bytes / shard_s / 1e6, 1),
            "codecs": codecs,
            "cpu_count": os.cpu_count(),
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
