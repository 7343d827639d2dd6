"""FPS subset time at FLAIR-HUB scale (241 100 tiles -> 48 220 = 20 %) on synthetic, clustered coordinates.

FLAIR-HUB tiles are 102.4 m patches grouped in ROIs inside ~74 French départements; the synthetic layout mimics
that clustering (it is what makes pruning matter). Also times a brute-force full update (every point, every step)
over the first ``--naive-steps`` steps and extrapolates it, so the speed-up is measured in the same run.
Prints one JSON object as its LAST line: fps_seconds, points, selected, and the comparison figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from maestro_data.build.subsets import fps_subsets, furthest_point_order, geocentric, subset_count

METRES_PER_DEGREE = 111_320.0


def synthetic_tiles(n: int, seed: int, domains: int = 74, tile_m: float = 102.4) -> tuple[list[str], np.ndarray,
                                                                                           np.ndarray]:
    """``n`` tile ids and lon/lat: square ROIs of adjacent tiles scattered inside départements over France."""
    rng = np.random.default_rng(seed)
    centre_lon, centre_lat = rng.uniform(-4.5, 7.5, domains), rng.uniform(42.5, 50.5, domains)
    ids, lon, lat = [], np.empty(n), np.empty(n)
    k = 0
    while k < n:
        d = int(rng.integers(domains))
        side = int(rng.integers(5, 40))  # ROI of side x side tiles
        roi_lat = centre_lat[d] + rng.normal(0, 0.25)
        roi_lon = centre_lon[d] + rng.normal(0, 0.35)
        r, c = np.divmod(np.arange(min(side * side, n - k)), side)
        m = len(r)
        lat[k:k + m] = roi_lat + r * tile_m / METRES_PER_DEGREE
        lon[k:k + m] = roi_lon + c * tile_m / (METRES_PER_DEGREE * np.cos(np.radians(roi_lat)))
        ids.extend(f"D{d:03d}-2021_ROI{k:07d}_{ri}-{ci}" for ri, ci in zip(r, c, strict=True))
        k += m
    return ids, lon, lat


def naive_seconds(points: np.ndarray, steps: int, start: int) -> float:
    """Time ``steps`` steps of the full update (every point, every step), in its fast numpy form
    (one contiguous array per axis, preallocated buffers, in-place ufuncs)."""
    cols = [np.ascontiguousarray(points[:, a]) for a in range(points.shape[1])]
    best = np.full(len(points), np.inf)
    d2, tmp = np.empty(len(points)), np.empty(len(points))
    i = start
    t0 = time.perf_counter()
    for _ in range(steps):
        np.subtract(cols[0], cols[0][i], out=d2)
        np.multiply(d2, d2, out=d2)
        for col in cols[1:]:
            np.subtract(col, col[i], out=tmp)
            np.multiply(tmp, tmp, out=tmp)
            d2 += tmp
        np.minimum(best, d2, out=best)
        best[i] = -1.0
        i = int(np.argmax(best))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=241_100)
    parser.add_argument("--percent", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naive-steps", type=int, default=300)
    args = parser.parse_args()

    ids, lon, lat = synthetic_tiles(args.points, args.seed)
    t0 = time.perf_counter()
    subsets = fps_subsets(ids, lon, lat, (5, args.percent))
    fps_s = time.perf_counter() - t0
    selected = len(subsets[args.percent])
    assert selected == subset_count(args.points, args.percent)
    assert subsets[args.percent][: len(subsets[5])] == subsets[5]

    t0 = time.perf_counter()
    pts = geocentric(lon, lat)
    geo_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    order = furthest_point_order(pts, selected)
    order_s = time.perf_counter() - t0
    naive_s = naive_seconds(pts, args.naive_steps, int(order[0])) * selected / max(args.naive_steps, 1)

    result = {
        "fps_seconds": round(fps_s, 3),
        "points": args.points,
        "selected": selected,
        "percent": args.percent,
        "geocentric_seconds": round(geo_s, 3),
        "fps_order_seconds": round(order_s, 3),
        "naive_full_update_seconds_estimate": round(naive_s, 1),
        "speedup_vs_naive": round(naive_s / order_s, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }
    print(f"FPS {args.points} -> {selected} tiles: {fps_s:.2f} s end to end "
          f"(brute force estimated {naive_s:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
