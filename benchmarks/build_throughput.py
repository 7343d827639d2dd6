"""Build throughput on FLAIR-HUB-shaped tiles at real sizes: convert (tiles/s/core), store size vs raw bytes,
compression candidates side by side, and shard writing MB/s.

Tiles: aerial 4x512² uint8, elevation 2x512² float32, COSIA 512² uint8, S2 T~50 x 10 x 10² uint16 + mask,
S1 asc/desc T~70 x 2 x 10² float32 (synthetic, real layout, smooth fields). Targets (issue): >= 60 tiles/s/core,
store <= 0.8x raw bytes (lossless).

Engines side by side (issue 15): the same build (store, subsets, shards) on the local pool of 2 processes and on a
Dask LocalCluster of 2 single-threaded workers, runs interleaved, best of ``--repeat``, wall clock; the cluster's
start is timed apart (paid once per cluster, not per build). Target: Dask within 15 % of the pool. ``--s3`` also
times the build written to moto's S3 server (server mode, its own process, through s3fs): request latency, not
bandwidth, is what it measures.

    python benchmarks/build_throughput.py [--tiles 64] [--workdir DIR] [--repeat 3] [--s3]

Timed for ``build_tiles_per_s_per_core`` (= ``tiles_per_s_per_core``): ``build_store`` alone on one process
(``workers=1``): listing, probing, planning and creating the store, reading every GeoTIFF, writing every shard with
its integrity record, and the commit. Not timed there: generating the synthetic tiles, subsets, shard (tar)
writing, the codec comparison and the engines, each reported apart. CPU is process time (all threads: zarr's event
loop and codec/I-O threads included), the least of ``--repeat`` builds, so the figure is per core and robust to a
shared machine. Beside the build it times the parts no store change can remove: rasterio opening every GeoTIFF,
opening + reading every band, and the FLAIR reader alone.

Floor on a shared 2-core VM (Nov 2026; other jobs kept the load average at 3-5, which inflates process time ~1.5-2x
over a quiet machine). rasterio.open spent ~2/3 of its time having GDAL rebuild the CRS from the PROJ database and
export it as WKT for every file: the reader now resolves each GeoKey set once per process (``sources/geotiff.py``)
and opens later files with GDAL's georeferencing off (7 files: ~9 -> ~2.5 ms/tile under that load), and parses each
date cell once. zarr-python's per-chunk machinery cost more than blosc itself: ``build/zarr_shards.py`` encodes a
block's shard in one pass from the tiles' own arrays, byte for byte what zarr wrote (write_block ~16 -> ~12 ms/tile
under that load). Interleaved old/new builds under a load of ~4: 20-22 -> 36-38 tiles/s/core (1.7-1.9x); the final
code at a load of ~2.5: 48 tiles/s/core with the reader alone at 126 tiles/s (before: ~40-45 tiles/s/core on a quiet
machine, not measured quiet since). What is left per tile: blosc-lz4 of ~4 MB (the stored codec: part of the store
schema, kept), GDAL reads (pixel- to band-interleaved copies), sha256 of the ~2 MB written for the integrity record,
rasterio's per-band attributes (and per-band debug logging) of 7 files, and per-build store creation and commit
(~0.1 s).

The LAST line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

from maestro_data.build.executors import DaskExecutor, Executor, LocalExecutor
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.build.tile_store import TileStore, tree_bytes
from maestro_data.location import Location
from maestro_data.manifest import load_manifest
from maestro_data.synthetic.flair import generate

SHARD_BYTES = 64 << 20


def _tif_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.tif"))


def compare_codecs(store: TileStore, tiles: int) -> dict:
    """Ratio and encode speed of candidate codecs on the same tiles (the store's default is blosc-lz4)."""
    candidates = {
        "blosc-zstd3-shuffle": lambda it: Blosc("zstd", 3, Blosc.BITSHUFFLE if it == 1 else Blosc.SHUFFLE),
        "blosc-lz4-shuffle (default)": lambda it: Blosc("lz4", 5, Blosc.BITSHUFFLE if it == 1 else Blosc.SHUFFLE),
        "blosc-lz4-1-shuffle": lambda it: Blosc("lz4", 1, Blosc.BITSHUFFLE if it == 1 else Blosc.SHUFFLE),
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


def geotiff_floors(src: Path, tiles: int) -> dict[str, float]:
    """Tiles/s of CPU for (a) opening every GeoTIFF with rasterio and (b) opening and reading all its bands with
    the FLAIR reader's GDAL options and read call, through rasterio's plain open (the reader skips GDAL's CRS
    parsing of files whose GeoKeys it has seen: ``sources/geotiff.py``)."""
    import rasterio

    from maestro_data.sources.base import GDAL_READ_OPTIONS
    from maestro_data.sources.geotiff import read_all_bands

    files = sorted(src.rglob("*.tif"))
    out = {}
    with rasterio.Env(**GDAL_READ_OPTIONS):
        t0 = time.process_time()
        for path in files:
            with rasterio.open(path):
                pass
        out["open_only"] = tiles / (time.process_time() - t0)
        t0 = time.process_time()
        for path in files:
            with rasterio.open(path) as ds:
                read_all_bands(ds, path.name, "", path)
        out["open_and_read"] = tiles / (time.process_time() - t0)
    return out


def reader_rate(src: Path) -> float:
    """Tiles/s of CPU of the FLAIR-HUB reader alone (probe + read of every tile, as one build worker does)."""
    import rasterio

    from maestro_data.sources import open_source
    from maestro_data.sources.base import GDAL_READ_OPTIONS

    source = open_source(load_manifest("flair-hub"), src)
    refs = source.list_tiles()
    t0 = time.process_time()
    with rasterio.Env(**GDAL_READ_OPTIONS):
        for ref in refs:
            source.read(source.probe(ref))
    return len(refs) / (time.process_time() - t0)


def full_build(src: Path, out: Location, executor: Executor) -> float:
    """Seconds of wall clock for store + subsets + shards on ``executor``."""
    t0 = time.perf_counter()
    build_store(load_manifest("flair-hub"), src, out, BuildOptions(quiet=True, overwrite=True), executor=executor)
    with warnings.catch_warnings():  # small trial sets have empty 5 % subsets: said once by the tests, not here
        warnings.simplefilter("ignore", UserWarning)
        compute_subsets(out)
    write_shards(out, out.child("shards"), ShardOptions(shard_bytes=SHARD_BYTES, quiet=True), executor=executor)
    return time.perf_counter() - t0


def engines(src: Path, tmp: Path, tiles: int, repeat: int) -> dict:
    """Tiles/s of the same build on the local pool (2 processes) and a Dask LocalCluster (2 workers)."""
    t0 = time.perf_counter()
    dask = DaskExecutor(workers=2)
    start_s = time.perf_counter() - t0
    pool = LocalExecutor(2)
    runs: dict[str, list[float]] = {"local": [], "dask": []}
    try:
        for _ in range(max(1, repeat)):  # interleaved: a shared machine's load hits both alike
            runs["local"].append(full_build(src, Location.of(tmp / "pool"), pool))
            runs["dask"].append(full_build(src, Location.of(tmp / "dask"), dask))
    finally:
        dask.close()
    same = all((tmp / "pool" / "shards" / p.relative_to(tmp / "dask" / "shards")).read_bytes() == p.read_bytes()
               for p in (tmp / "dask" / "shards").rglob("*") if p.is_file())
    local_rate, dask_rate = tiles / min(runs["local"]), tiles / min(runs["dask"])
    print(f"engines (store + subsets + shards, wall clock, best of {len(runs['local'])}): local pool of 2 "
          f"{local_rate:.1f} tiles/s, Dask LocalCluster of 2 {dask_rate:.1f} tiles/s ({dask_rate / local_rate:.2f}x; "
          f"cluster start {start_s:.1f} s, once); shards identical: {same}")
    return {"local_pool_2_tiles_per_s": round(local_rate, 2), "dask_localcluster_2_tiles_per_s": round(dask_rate, 2),
            "dask_over_local": round(dask_rate / local_rate, 3), "dask_cluster_start_s": round(start_s, 2),
            "engines_same_shards": same}


def s3_build(src: Path, tiles: int) -> dict:
    """Seconds of the same build written to moto's S3 server (its own process), on the local pool of 2."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the servers the tests start
    import s3fs
    from faultserver import moto_s3

    server = moto_s3(own_process=True)
    try:
        s3fs.S3FileSystem(**server.storage_options).mkdir("bench")
        seconds = full_build(src, Location("s3://bench/flair-hub", server.storage_options), LocalExecutor(2))
    finally:
        server.stop()
    print(f"s3 (moto, own process): store + subsets + shards of {tiles} tiles in {seconds:.1f} s "
          f"({tiles / seconds:.1f} tiles/s)")
    return {"s3_moto_build_s": round(seconds, 2), "s3_moto_tiles_per_s": round(tiles / seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="builds to run; the least CPU counts (shared machines)")
    ap.add_argument("--s3", action="store_true", help="also time the build written to moto's S3 server")
    ap.add_argument("--no-engines", action="store_true", help="skip the local pool vs Dask comparison")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        src = generate(tmp / "raw", tiles=args.tiles, seed=0, t_s2=50, t_s1=70, spot=False)
        gen_s = time.perf_counter() - t0
        raw_tif = _tif_bytes(src)
        manifest = load_manifest("flair-hub")
        # process_time counts every thread of the process (zarr's event loop and codec/I-O threads, GDAL), so the
        # figure is CPU per core however the work is spread over threads
        runs = []
        for k in range(max(1, args.repeat)):
            cpu0 = time.process_time()
            report = build_store(manifest, src, tmp / f"out{k}", BuildOptions(workers=1, quiet=True))
            runs.append((time.process_time() - cpu0, k, report))
        cpu, best, report = min(runs, key=lambda r: r[0])
        out = tmp / f"out{best}"
        store = TileStore(out)
        store_bytes = tree_bytes(store.path)
        print(f"generated {args.tiles} tiles in {gen_s:.1f} s; raw GeoTIFFs {raw_tif / 1e6:.1f} MB")
        print(f"convert: {report['seconds']:.2f} s wall, {cpu:.2f} s CPU (one process, least of {len(runs)}) -> "
              f"{args.tiles / cpu:.1f} tiles/s/core; store {store_bytes / 1e6:.1f} MB")
        floors = geotiff_floors(src, args.tiles)
        reader = reader_rate(src)
        print(f"reading the GeoTIFFs alone (no conversion): {floors['open_and_read']:.1f} tiles/s of CPU, of which "
              f"rasterio.open alone {floors['open_only']:.1f} tiles/s; the FLAIR reader (probe + read, dtype and "
              f"label checks, dates, location) {reader:.1f} tiles/s: a build cannot beat that (store write, "
              f"planning and commit add ~{1000 * (cpu / args.tiles - 1 / reader):.1f} ms/tile)")
        codecs = compare_codecs(store, args.tiles)
        for name, r in codecs.items():
            print(f"  codec {name:32s} ratio {r['ratio']:.3f}  encode {r['encode_MB_per_s']:.0f} MB/s")
        t1 = time.perf_counter()
        index = write_shards(out, tmp / "shards", ShardOptions(shard_bytes=256 << 20, quiet=True))
        shard_s = time.perf_counter() - t1
        shard_bytes = sum(sum(t["bytes"]) for s in index["splits"].values() for t in s["tiers"].values())
        print(f"shards: {shard_bytes / 1e6:.1f} MB in {shard_s:.2f} s")
        result = {
            "tiles": args.tiles,
            "tiles_per_s_per_core": round(args.tiles / cpu, 2),
            "build_tiles_per_s_per_core": round(args.tiles / cpu, 2),
            "tiles_per_s_wall_one_process": round(args.tiles / report["seconds"], 2),
            "geotiff_read_only_tiles_per_s": round(floors["open_and_read"], 2),
            "geotiff_open_only_tiles_per_s": round(floors["open_only"], 2),
            "reader_only_tiles_per_s": round(reader, 2),
            "cpu_seconds_per_tile": round(cpu / args.tiles, 4),
            "store_to_raw_bytes": round(store_bytes / raw_tif, 4),
            "raw_mb": round(raw_tif / 1e6, 1),
            "store_mb": round(store_bytes / 1e6, 1),
            "shard_write_mb_per_s": round(shard_bytes / shard_s / 1e6, 1),
            "codecs": codecs,
            "cpu_count": os.cpu_count(),
        }
        if not args.no_engines:
            result.update(engines(src, tmp, args.tiles, args.repeat))
        if args.s3:
            result.update(s3_build(src, args.tiles))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
