"""Synthetic FLAIR-HUB (and so FLAIR#2) in the real published layout (reference/datasets.md §4-5).

``<DOM>-<YEAR>_<MOD>/<ROI>/<DOM>-<YEAR>_<MOD>_<ROI>_<R>-<C>.tif`` GeoTIFFs in EPSG:2154, all modalities on the same
102.4 m square, time series stored time-major (band = t * C + c); ``GLOBAL_ALL_MTD/`` GeoPackages written with
sqlite3 (dates as JSON strings keyed from "1", aerial dates sometimes with day "00", split columns ``split_1..5``
and ``split_flairchallenge`` with NULLs so FLAIR#2 is a strict subset). Shapes, dtypes and file patterns come from
the flair-hub manifest; SPOT, absent from the manifest, follows datasets.md §4.2. Pixel values are smooth fields.
"""

from __future__ import annotations

import csv
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS

from maestro_data.manifest import Manifest, load_manifest
from maestro_data.synthetic import smooth_fields
from maestro_data.synthetic.gpkg_writer import polygon_blob, write_feature_gpkg

EPSG = 2154
# (domain-year, Lambert-93 x, y of the domain's first ROI, ground elevation m): departments of the official toy set
DOMAINS = (
    ("D006-2020", 1_040_000.0, 6_300_000.0, 650.0), ("D032-2019", 500_000.0, 6_290_000.0, 180.0),
    ("D038-2021", 900_000.0, 6_460_000.0, 420.0), ("D044-2020", 350_000.0, 6_690_000.0, 30.0),
    ("D051-2019", 780_000.0, 6_880_000.0, 120.0), ("D012-2019", 680_000.0, 6_360_000.0, 700.0),
    ("D068-2021", 1_020_000.0, 6_770_000.0, 300.0), ("D069-2020", 840_000.0, 6_520_000.0, 250.0),
    ("D083-2020", 980_000.0, 6_260_000.0, 200.0), ("D085-2019", 370_000.0, 6_620_000.0, 40.0),
)
LAND = ("AA", "AF", "AN", "AU", "FA", "FF", "FN", "FU", "NA", "NF", "NN", "NU", "UA", "UF", "UN", "UU")
PER_ROI = 2  # neighbouring patches per ROI: they get different date lists (the reader keys dates per patch)
SPOT = ("SPOT_RGBI", 4, 64, "uint16")  # MOD, bands, px, dtype (not in the manifest; datasets.md §4.2)
# The release's own names (datasets.md §4.1, §4.3), written here and not taken from the reader: a wrong name in the
# reader then fails the build tests instead of being generated the same way.
MTD_FOLDER = "GLOBAL_ALL_MTD"
SPLIT_TABLE = "GLOBAL_ALL_MTD_SPLIT"
# folder type (the MOD of <DOM>-<YEAR>_<MOD>/) -> the GLOBAL_<KEY>_MTD_DATES table that dates it: the aerial date
# stands for the DEM and the aerial-grid labels, the S2 mask shares the S2 dates
DATED_BY = {"AERIAL_RGBI": "AERIAL", "DEM_ELEV": "AERIAL", "AERIAL_LABEL-COSIA": "AERIAL",
            "ALL_LABEL-LPIS": "AERIAL", "SPOT_RGBI": "SPOT", "SENTINEL2_TS": "SENTINEL2",
            "SENTINEL2_MSK-SC": "SENTINEL2", "SENTINEL1-ASC_TS": "SENTINEL1-ASC",
            "SENTINEL1-DESC_TS": "SENTINEL1-DESC"}


def dates_table(key: str) -> str:
    return f"GLOBAL_{key}_MTD_DATES"


def folder_type(pattern: str) -> str:
    """``{domain}_SENTINEL2_TS/{roi}/...`` -> ``SENTINEL2_TS``."""
    head = pattern.split("/", 1)[0]
    if not head.startswith("{domain}_"):
        raise ValueError(f"{pattern!r} is not a FLAIR-HUB file pattern (<DOM>-<YEAR>_<MOD>/<ROI>/...)")
    return head.removeprefix("{domain}_")
SPLIT_CYCLE = ("train", "train", "valid", "train", "test")  # rotated per split set: five different sets


def patch_ids(n: int) -> list[str]:
    """``n`` distinct real-looking patch ids ``<DOM>-<YEAR>_<ROI>_<R>-<C>``, PER_ROI patches per ROI."""
    out = []
    for i in range(n):
        g, j = divmod(i, PER_ROI)
        d, k = g % len(DOMAINS), g // len(DOMAINS)
        roi = f"{LAND[(k + 5 * d) % len(LAND)]}-S{1 + (k // len(LAND)) % 2}-{k + 1 + 3 * d}"
        out.append(f"{DOMAINS[d][0]}_{roi}_{3 + g % 7}-{4 + j}")
    return out


def patch_square(patch_id: str) -> tuple[float, float, float]:
    """(left, top, side) in EPSG:2154 metres of the patch's 102.4 m square, derived from its id."""
    dom, roi, pos = patch_id.split("_")
    _, x, y, _ = next(d for d in DOMAINS if d[0] == dom)
    k = int(roi.rsplit("-", 1)[1])
    r, c = (int(v) for v in pos.split("-"))
    side = 102.4
    return x + 3_000.0 * k + (c - 1) * side, y - (r - 1) * side, side


def _steps(rng: np.random.Generator, mean: int) -> int:
    return max(1, int(round(mean * rng.uniform(0.8, 1.2))))


def _series_dates(rng: np.random.Generator, year: int, steps: int) -> list[str]:
    start = date(year, 1, 1)
    days = np.sort(rng.choice(365, size=min(steps, 365), replace=False))
    return [(start + timedelta(days=int(d))).strftime("%Y%m%d") for d in days]


def _rasters(rng: np.random.Generator, mod: str, steps: int, size: int, elev: float) -> np.ndarray:
    """Values of one file as written: (bands, size, size) in the file dtype, time-major for series."""
    if mod == "AERIAL_RGBI":
        f = smooth_fields(rng, (4,), size, 8) * 70 + rng.standard_normal((4, size, size), dtype=np.float32) * 6
        return np.clip(f + np.array([110, 115, 100, 140], np.float32)[:, None, None], 0, 255).round().astype("uint8")
    if mod == "DEM_ELEV":
        dtm = elev + smooth_fields(rng, (), size, 4) * 15
        dsm = dtm + 0.05 + np.clip(smooth_fields(rng, (), size, 16) * 12, 0, None)  # buildings/trees: DSM > DTM
        return np.round(np.stack([dsm, dtm]).astype(np.float64), 2).astype("float32")  # metres, rounded to cm
    if mod == "AERIAL_LABEL-COSIA":
        cls = np.argmax(smooth_fields(rng, (19,), size // 4, 6), axis=0).astype("uint8")
        return np.repeat(np.repeat(cls, 4, axis=0), 4, axis=1)[None]
    if mod == SPOT[0]:
        return (smooth_fields(rng, (SPOT[1],), size, 6) * 300 + 800).clip(1, None).round().astype(SPOT[3])
    season = np.sin(np.linspace(0, np.pi, steps, dtype=np.float32))[:, None, None, None]
    if mod == "SENTINEL2_TS":
        base = np.array([400, 650, 600, 1100, 2000, 2400, 2700, 2800, 1900, 1100], np.float32)[:, None, None]
        f = base * (1 + 0.25 * smooth_fields(rng, (steps, 10), size, 3) + 0.3 * season)
        cloudy = rng.random(steps) < 0.2
        f[cloudy] += 4000
        return f.clip(1, 18_000).round().astype("uint16").reshape(steps * 10, size, size)
    if mod == "SENTINEL2_MSK-SC":
        prob = np.clip(smooth_fields(rng, (steps, 2), size, 2) * 120 - 20, 0, 100)
        prob[rng.random(steps) < 0.5] = 0  # most dates clear
        return prob.round().astype("uint8").reshape(steps * 2, size, size)
    if mod.startswith("SENTINEL1"):
        db = np.array([-11.0, -18.0], np.float32)[:, None, None] + 2.5 * smooth_fields(rng, (steps, 2), size, 3)
        lin = (10.0 ** (db / 10)).astype("float32")
        lin[rng.random(lin.shape) < 0.01] = np.nan  # border/no-data pixels occur in real S1 tifs
        return lin.reshape(steps * 2, size, size)
    raise ValueError(f"no synthetic values for FLAIR-HUB folder type {mod!r}")


def _write_tif(path: Path, data: np.ndarray, left: float, top: float, side: float, crs: rasterio.crs.CRS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    count, h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=count, dtype=str(data.dtype), crs=crs,
                   transform=Affine(side / w, 0.0, left, 0.0, -side / h, top))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _files(manifest: Manifest, spot: bool) -> list[tuple[str, str, int]]:
    """(pattern, date-table key, px) of every file type written."""
    out = []
    for spec in manifest.modalities.values():
        out.append((spec.source, DATED_BY[folder_type(spec.source)], spec.tile_size))
        if spec.cloud_mask is not None:
            out.append((spec.cloud_mask.source, DATED_BY[folder_type(spec.source)], spec.tile_size))
    for t in manifest.targets.values():
        out.append((t.source, DATED_BY[folder_type(t.source)], t.tile_size))
    if spot:
        pattern = f"{{domain}}_{SPOT[0]}/{{roi}}/{{domain}}_{SPOT[0]}_{{roi}}_{{pos}}.tif"
        out.append((pattern, DATED_BY[SPOT[0]], SPOT[2]))
    return out


def generate(out: str | Path, tiles: int = 4, seed: int = 0, dataset: str = "flair-hub", *, t_s2: int = 24,
             t_s1: int = 30, flair2_csv: bool | None = None, flair_csv: bool = False, spot: bool = True) -> Path:
    """Write ``tiles`` patches of synthetic FLAIR-HUB under ``<out>/flair-hub/`` and return that root.

    ``t_s2``/``t_s1``: mean time steps per S2/S1 series (each patch draws within +-20 %; real data ~50/~70).
    ``flair2_csv`` (default: ``dataset == "flair2"``) also writes MAESTRO's ``{train,val,test}_flair2.csv``;
    ``flair_csv`` writes official-style split CSVs (``csv/FLAIR-HUB_SYNTHETIC_{TRAIN,VALID,TEST}.csv``).
    Patch ``i`` depends only on ``(seed, i)``, so benchmarks can ask for any number of tiles.
    """
    if dataset not in ("flair-hub", "flair2"):
        raise ValueError(f"dataset must be 'flair-hub' or 'flair2', got {dataset!r}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    root = Path(out) / "flair-hub"
    (root / MTD_FOLDER).mkdir(parents=True, exist_ok=True)
    manifest = load_manifest("flair-hub")
    files = _files(manifest, spot)
    crs = rasterio.crs.CRS.from_epsg(EPSG)
    ids = patch_ids(tiles)
    dates: dict[str, dict[str, list[str]]] = {k: {} for k in sorted({key for _, key, _ in files})}
    for i, pid in enumerate(ids):
        rng = np.random.default_rng((seed, i))
        dom, roi, pos = pid.split("_")
        year = int(dom.split("-")[1])
        elev = next(d[3] for d in DOMAINS if d[0] == dom)
        for key in dates:
            if key.startswith("SENTINEL"):
                # + the rank in the ROI: neighbours never share a time-step count (dates are per patch)
                steps = _steps(rng, t_s2 if key == "SENTINEL2" else t_s1) + i % PER_ROI
                dates[key][pid] = _series_dates(rng, year, steps)
            else:
                day = "00" if i % 3 == 0 else f"{rng.integers(1, 29):02d}"  # day 00 occurs in the release
                dates[key][pid] = [f"{year}{rng.integers(4, 10):02d}{day}"]
        left, top, side = patch_square(pid)
        for pattern, key, size in files:
            data = _rasters(rng, folder_type(pattern), len(dates[key][pid]), size, elev)
            _write_tif(root / pattern.format(domain=dom, roi=roi, pos=pos), data, left, top, side, crs)
    geoms = [_footprint(pid) for pid in ids]
    wkt = CRS.from_epsg(EPSG).to_wkt("WKT1_GDAL")
    for key, table in dates.items():
        series = key.startswith("SENTINEL")
        rows = [(pid, json.dumps({str(t + 1): d for t, d in enumerate(table[pid])}) if series else table[pid][0])
                for pid in ids]
        name = dates_table(key)
        write_feature_gpkg(root / MTD_FOLDER / f"{name}.gpkg", name,
                           [("patch_id", "TEXT"), ("acquisition_dates" if series else "date", "TEXT")], rows, geoms,
                           EPSG, wkt)
    splits = split_table(ids)
    cols = [f"split_{k}" for k in range(1, 6)] + ["split_flairchallenge"]
    write_feature_gpkg(root / MTD_FOLDER / f"{SPLIT_TABLE}.gpkg", SPLIT_TABLE,
                       [("patch_id", "TEXT"), *((c, "TEXT") for c in cols)],
                       [(pid, *(splits[pid][c] for c in cols)) for pid in ids], geoms, EPSG, wkt)
    if flair2_csv if flair2_csv is not None else dataset == "flair2":
        _write_flair2_csvs(root, ids, splits)
    if flair_csv:
        _write_official_csvs(root, ids, splits, files)
    return root


def _footprint(pid: str) -> bytes:
    left, top, side = patch_square(pid)
    return polygon_blob([(left, top), (left + side, top), (left + side, top - side), (left, top - side)], EPSG)


def split_table(ids: list[str]) -> dict[str, dict[str, str | None]]:
    """split_1..5 rotate SPLIT_CYCLE by the set number; split_flairchallenge is NULL for every
    third ROI (those patches are not FLAIR#2), so FLAIR#2 is a strict subset once there are two ROIs."""
    out = {}
    for i, pid in enumerate(ids):
        row: dict[str, str | None] = {f"split_{k}": SPLIT_CYCLE[(i + k) % 5] for k in range(1, 6)}
        g = i // PER_ROI
        row["split_flairchallenge"] = None if g % 3 == 1 else SPLIT_CYCLE[(i + g) % 5]
        out[pid] = row
    return out


def _write_flair2_csvs(root: Path, ids: list[str], splits: dict[str, dict[str, str | None]]) -> None:
    """MAESTRO-style ``{train,val,test}_flair2.csv``: the FLAIR#2 patches, split differently from the gpkg column
    (train/val/test by turns) so tests can tell which source the reader used."""
    members = [pid for pid in ids if splits[pid]["split_flairchallenge"] is not None]
    for j, stage in enumerate(("train", "val", "test")):
        with open(root / f"{stage}_flair2.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patch_id"])
            w.writerows([pid] for pid in members[j::3])


def _write_official_csvs(root: Path, ids: list[str], splits: dict[str, dict[str, str | None]],
                         files: list[tuple[str, str, int]]) -> None:
    """Official-style split CSVs (split_1): patch_id + one ``../<DOM>-<YEAR>_<MOD>/<ROI>/<file>.tif`` column per MOD."""
    (root / "csv").mkdir(exist_ok=True)
    patterns = sorted(((folder_type(p), p) for p, _, _ in files))
    for stage in ("train", "valid", "test"):
        with open(root / "csv" / f"FLAIR-HUB_SYNTHETIC_{stage.upper()}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patch_id", *(m for m, _ in patterns)])
            for pid in ids:
                if splits[pid]["split_1"] == stage:
                    dom, roi, pos = pid.split("_")
                    w.writerow([pid, *("../" + p.format(domain=dom, roi=roi, pos=pos) for _, p in patterns)])
