"""Furthest-point-sampled subsets (paper §6.1: 5 % and 20 % by FPS on geographic coordinates), or MAESTRO's CSVs.

Metric: tiles become 3-D geocentric points, ECEF metres on the WGS84 ellipsoid (pyproj EPSG:4326 -> EPSG:4978,
height 0) or the unit sphere; the distance is the Euclidean chord, a monotone function of the great-circle
distance on the sphere (and very nearly so on the ellipsoid), so FPS needs no trigonometry per step.

Determinism: tiles are sorted by id before sampling, so a subset depends only on the SET of (id, lon, lat).
The first tile is the one furthest from the points' centroid; every further tile maximises the distance to the
tiles already chosen; ties go to the lowest index, i.e. the smallest tile id. Counts are
``floor(p·N/100 + 1/2)`` computed exactly (half rounds UP, not Python's half-to-even). Because one greedy order
serves every percentage, the 5 % subset is a prefix of the 20 % one (nested).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from pyproj import Transformer

from maestro_data.errors import StoreError
from maestro_data.manifest import Manifest
from maestro_data.sources.base import read_csv_column

DEFAULT_PERCENTS = (5, 20)
KEY_COLUMNS = {"treesatai-ts": "aerial_name", "pastis-hd": "image", "flair-hub": "patch_id", "flair2": "patch_id"}
CSV_VERSIONS = {"flair2": "flair2"}
_SLAB_MARGIN = 1e-9  # relative widening of the pruning slab: far above float64 rounding, so pruning is exact


def geocentric(lon: Sequence[float] | np.ndarray, lat: Sequence[float] | np.ndarray, *,
               ellipsoid: bool = True) -> np.ndarray:
    """(N, 3) float64 points: ECEF metres on WGS84 at height 0 (default) or on the unit sphere."""
    lon = np.asarray(lon, dtype=np.float64).ravel()
    lat = np.asarray(lat, dtype=np.float64).ravel()
    if lon.shape != lat.shape:
        raise ValueError(f"{lon.size} longitudes for {lat.size} latitudes")
    if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
        raise ValueError("longitudes and latitudes must be finite")
    if (np.abs(lat) > 90).any() or (np.abs(lon) > 360).any():
        raise ValueError("latitudes must lie in [-90, 90] and longitudes in [-360, 360] degrees")
    if not ellipsoid:
        lo, la = np.radians(lon), np.radians(lat)
        return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)
    ecef = Transformer.from_crs("EPSG:4326", "EPSG:4978", always_xy=True)
    x, y, z = ecef.transform(lon, lat, np.zeros_like(lon))
    return np.stack([np.asarray(x), np.asarray(y), np.asarray(z)], axis=1).astype(np.float64)


def furthest_point_order(points: np.ndarray, count: int, start: int | None = None) -> np.ndarray:
    """Indices (int64, length ``count``) of greedy furthest point sampling on ``points`` (N, D) float.

    ``start`` defaults to the point furthest from the centroid. Each step takes the point with the largest
    squared distance to the chosen set (running minimum, float64); ties -> lowest index. Chosen points are
    never chosen again, so duplicates still give ``count`` distinct indices. A point can only get closer to
    the set if it lies within the current maximum distance of the new point along the widest axis, so each
    update touches only that slab of a sorted copy: the result is identical to the full O(N·k) update.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] < 1:
        raise ValueError(f"points must be (N, D), got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points must be finite")
    n = pts.shape[0]
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or not 0 <= count <= n:
        raise ValueError(f"count must be an integer in [0, {n}], got {count!r}")
    order = np.empty(int(count), dtype=np.int64)
    if count == 0:
        return order
    if start is None:
        start = int(np.argmax(((pts - pts.mean(axis=0)) ** 2).sum(axis=1)))
    elif isinstance(start, bool) or not isinstance(start, int | np.integer) or not 0 <= start < n:
        raise ValueError(f"start must be an index in [0, {n - 1}], got {start!r}")
    cols = [np.ascontiguousarray(pts[:, a]) for a in range(pts.shape[1])]
    axis = int(np.argmax(pts.max(axis=0) - pts.min(axis=0)))
    by_axis = np.argsort(cols[axis], kind="stable")
    sorted_axis = cols[axis][by_axis]
    dmin = np.full(n, np.inf)
    i = int(start)
    for j in range(int(count)):
        order[j] = i
        if j == count - 1:
            break
        reach = dmin[i]  # the largest running minimum of any unchosen point
        if np.isinf(reach):
            sel: slice | np.ndarray = slice(None)
        else:
            r = math.sqrt(reach) * (1 + _SLAB_MARGIN)
            c = cols[axis][i]
            sel = by_axis[np.searchsorted(sorted_axis, c - r, "left"):np.searchsorted(sorted_axis, c + r, "right")]
        d2 = (cols[0][sel] - cols[0][i]) ** 2
        for a in range(1, len(cols)):
            d2 += (cols[a][sel] - cols[a][i]) ** 2
        dmin[sel] = np.minimum(dmin[sel], d2)
        dmin[i] = -1.0  # chosen: never the maximum again
        i = int(np.argmax(dmin))
    return order


def subset_count(n: int, percent: float) -> int:
    """``floor(percent·n/100 + 1/2)`` in exact arithmetic (ties round up)."""
    p = Fraction(str(percent))
    if not 0 < p <= 100:
        raise ValueError(f"a subset percentage must lie in (0, 100], got {percent!r}")
    return math.floor(p * n / 100 + Fraction(1, 2))


def _check_percents(percents: Iterable[float]) -> tuple[float, ...]:
    ps = tuple(percents)
    if len(set(ps)) != len(ps):
        raise ValueError(f"duplicate subset percentages in {ps}")
    for p in ps:
        subset_count(0, p)
    return ps


def fps_subsets(tile_ids: Sequence[str], lon: Sequence[float] | np.ndarray, lat: Sequence[float] | np.ndarray,
                percents: Iterable[float] = DEFAULT_PERCENTS, *, ellipsoid: bool = True) -> dict[float, list[str]]:
    """Nested FPS subsets ``{p: [tile ids in FPS order]}`` of exactly ``subset_count(N, p)`` tiles each."""
    ps = _check_percents(percents)
    ids = [str(t) for t in tile_ids]
    if len(set(ids)) != len(ids):
        dup = sorted(t for t, c in Counter(ids).items() if c > 1)[:5]
        raise ValueError(f"duplicate tile ids: {dup}")
    if not (len(ids) == len(lon) == len(lat)):
        raise ValueError(f"{len(ids)} tile ids for {len(lon)} longitudes and {len(lat)} latitudes")
    if not ids:
        return {p: [] for p in ps}
    by_id = sorted(range(len(ids)), key=ids.__getitem__)
    pts = geocentric(np.asarray(lon, dtype=np.float64)[by_id], np.asarray(lat, dtype=np.float64)[by_id],
                     ellipsoid=ellipsoid)
    counts = {p: subset_count(len(ids), p) for p in ps}
    order = furthest_point_order(pts, max(counts.values()))
    ranked = [ids[by_id[k]] for k in order]
    return {p: ranked[:c] for p, c in counts.items()}


def split_csv_name(stage: str, *, version: str | None = None, percent: float | None = None,
                   fold: int | None = None) -> str:
    """MAESTRO's split file name ``{stage}[_{version}][_filtered_{p}][_fold_{k}].csv``."""
    name = stage + (f"_{version}" if version else "")
    if percent is not None:
        name += f"_filtered_{int(percent) if float(percent).is_integer() else percent}"
    return name + (f"_fold_{fold}" if fold is not None else "") + ".csv"


def _read_ids(path: Path, column: str) -> list[str]:
    ids = [v[:-4] if column == "aerial_name" and v.endswith(".tif") else v
           for v in read_csv_column(path, column, StoreError)]
    seen: set[str] = set()
    dups = [t for t in ids if t in seen or seen.add(t)]
    if dups:
        raise StoreError(f"{path}: duplicate tile ids {dups[:5]}")
    return ids


def read_split_csvs(directory: str | Path, dataset: str | Manifest, percents: Iterable[float] = DEFAULT_PERCENTS,
                    *, version: str | None = None, fold: int | None = None,
                    tiles: Mapping[str, str] | None = None) -> dict[str, dict[float, list[str]]]:
    """Import MAESTRO's published subset CSVs as ``{stage: {p: ids}}`` (pretraining on p % reads the p % lists
    of the manifest's pretrain stages, as the official reader concatenates train and val).

    ``tiles`` (tile id -> split of the store) turns unknown ids and ids listed under another split into
    StoreError. FLAIR#2 reads ``{stage}_flair2_filtered_{p}.csv`` unless ``version`` says otherwise.
    """
    name = dataset.name if isinstance(dataset, Manifest) else str(dataset)
    if name not in KEY_COLUMNS:
        raise StoreError(f"no split-CSV key column known for dataset {name!r} (known: {', '.join(KEY_COLUMNS)})")
    stages = dataset.splits.names if isinstance(dataset, Manifest) else ("train", "val", "test")
    version = CSV_VERSIONS.get(name) if version is None else version or None
    ps = _check_percents(percents)
    directory = Path(directory)
    out: dict[str, dict[float, list[str]]] = {stage: {} for stage in stages}
    for stage in stages:
        for p in ps:
            path = directory / split_csv_name(stage, version=version, percent=p, fold=fold)
            ids = _read_ids(path, KEY_COLUMNS[name])
            if tiles is not None:
                unknown = [t for t in ids if t not in tiles]
                if unknown:
                    raise StoreError(f"{path}: {len(unknown)} tile ids are not in the store, e.g. {unknown[:5]}")
                other = [t for t in ids if tiles[t] != stage]
                if other:
                    raise StoreError(f"{path}: {len(other)} tiles belong to another split in the store, e.g. "
                                     f"{[(t, tiles[t]) for t in other[:5]]}")
            out[stage][p] = ids
    return out
