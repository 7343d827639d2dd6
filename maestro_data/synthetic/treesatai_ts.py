"""Tiny TreeSatAI-TS in the REAL published layout (``reference/datasets.md`` §2), quirks included.

Aerial GeoTIFFs as the real files (4 x uint8, 304 px of 0.2 m, EPSG:25832, uncompressed pixel-interleaved
strips, band 4 flagged alpha), one HDF5 per tile with the seven real datasets (float32 rasters, UTF-8 vlen
product names carrying the sensing times), MAESTRO split CSVs and/or the original release tables.
Quirks reproduced: S1 NaNs and exact zeros, bit-identical duplicated descending S1 frames, a 10-channel
``sen-2-masks``, CSV genus columns in MAESTRO's non-alphabetical order.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import h5py
import numpy as np
import rasterio
from rasterio.transform import Affine

from maestro_data.manifest import load_manifest
from maestro_data.synthetic import smooth_fields

AERIAL_PX = 304
_MANIFEST = load_manifest("treesatai-ts")
AERIAL_RES = _MANIFEST.modalities["aerial"].resolution_m
GRID_PX = _MANIFEST.modalities["s2"].tile_size  # the HDF5 rasters cover the central 60 m at 10 m
FIRST_TS_YEAR = 2017  # time series year = max(aerial year, 2017)
# (genus, species) as in the real IMG_IDs; "Cleared" appears only as a label fraction
SPECIES = (("Abies", "alba"), ("Acer", "pseudoplatanus"), ("Alnus", "spec."), ("Betula", "spec."),
           ("Fagus", "sylvatica"), ("Fraxinus", "excelsior"), ("Larix", "decidua"), ("Larix", "kaempferi"),
           ("Picea", "abies"), ("Pinus", "sylvestris"), ("Pinus", "nigra"), ("Populus", "spec."),
           ("Prunus", "spec."), ("Pseudotsuga", "menziesii"), ("Quercus", "robur"), ("Quercus", "petraea"),
           ("Quercus", "rubra"), ("Tilia", "spec."))
# genus columns of MAESTRO's CSVs, in their (non-alphabetical) file order
MAESTRO_GENERA = ("Betula", "Cleared", "Quercus", "Larix", "Fraxinus", "Alnus", "Pseudotsuga", "Prunus", "Fagus",
                  "Acer", "Abies", "Pinus", "Tilia", "Picea", "Populus")
CSV_KEYS = ("aerial_name", "sen_name", "aerial_date")
# typical values: aerial NIR,G,B,R means; S2 B02..B12 vegetation reflectance x 1e4; S1 VV, VH linear power
AERIAL_MEAN = np.array([170.0, 85.0, 82.0, 70.0])
S2_MEAN = np.array([300, 450, 400, 800, 1500, 1800, 2000, 2100, 1400, 800], dtype=np.float64)
S1_MEAN = np.array([0.12, 0.025])
S2_TILES = ("T32UMD", "T32UNC", "T32UND", "T32UNE", "T32UPC", "T32UPD")
S2_BASELINE = {2017: "N0206", 2018: "N0207", 2019: "N0212", 2020: "N0214"}
# the real files' CRS: ETRS89 / UTM 32N written without authority codes ("unknown"); to_epsg() finds 25832
AERIAL_CRS_WKT = (
    'PROJCS["unknown",GEOGCS["unknown",DATUM["Unknown based on GRS80 ellipsoid",SPHEROID["GRS 1980",6378137,'
    '298.257222101004,AUTHORITY["EPSG","7019"]]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433,'
    'AUTHORITY["EPSG","9122"]]],PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],'
    'PARAMETER["central_meridian",9],PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],'
    'PARAMETER["false_northing",0],UNIT["metre",1,AUTHORITY["EPSG","9001"]],AXIS["Easting",EAST],'
    'AXIS["Northing",NORTH]]')
CENTRE_25832 = (470_000.0, 5_840_000.0)  # Lower Saxony; tiles spread +-40 km around it
LAYOUTS = ("csv", "release", "both")


def _stamp(t: datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%S")


def _days(rng: np.random.Generator, year: int, n: int, hour: int) -> list[datetime]:
    """n distinct acquisition times of ``year`` in chronological order, around ``hour`` UTC."""
    start = datetime(year, 1, 1, hour)
    ndays = (datetime(year + 1, 1, 1) - datetime(year, 1, 1)).days
    days = np.sort(rng.choice(ndays, size=min(n, ndays), replace=False))
    secs = rng.integers(0, 40 * 60, size=len(days))
    return [start + timedelta(days=int(d), seconds=int(s)) for d, s in zip(days, secs, strict=True)]


def _s2(rng: np.random.Generator, year: int, ten_mask_channels: bool) -> dict[str, np.ndarray]:
    times = _days(rng, year, int(rng.integers(40, 61)), 10)
    t = len(times)
    tile, orbits = S2_TILES[int(rng.integers(len(S2_TILES)))], ("R008", "R108")
    products = [f"S2{'AB'[int(rng.integers(2))]}_MSIL2A_{_stamp(tm)}_{S2_BASELINE.get(year, 'N0213')}_"
                f"{orbits[int(rng.integers(2))]}_{tile}_{_stamp(tm + timedelta(hours=int(rng.integers(1, 4))))}"
                for tm in times]
    doy = np.array([tm.timetuple().tm_yday for tm in times])
    season = 0.75 + 0.35 * np.sin((doy - 100) / 365 * 2 * np.pi)  # greener summer
    field = 1 + 0.15 * smooth_fields(rng, (1,), GRID_PX, 2)  # per-pixel brightness shared by bands and dates
    data = S2_MEAN[None, :, None, None] * season[:, None, None, None] * field[:, None]
    cloud = np.zeros((t, GRID_PX, GRID_PX))
    cloudy = rng.random(t) < 0.5
    cloud[cloudy] = np.clip(rng.uniform(10, 110, (cloudy.sum(), 1, 1))
                            + 25 * smooth_fields(rng, (int(cloudy.sum()),), GRID_PX, 2), 0, 100)
    data = data + cloud[:, None] * 110 + 40 * rng.standard_normal(data.shape)
    snow = np.zeros_like(cloud)
    winter = (doy < 60) & (rng.random(t) < 0.3)
    snow[winter] = rng.integers(0, 60, (int(winter.sum()), GRID_PX, GRID_PX))
    masks = np.zeros((t, 10 if ten_mask_channels else 2, GRID_PX, GRID_PX), np.float32)
    masks[:, 0], masks[:, 1] = snow, np.round(cloud)
    return {"sen-2-data": np.clip(np.round(data), 1, 18000).astype(np.float32), "sen-2-masks": masks,
            "sen-2-products": np.array(products, dtype=object)}


def _s1_products(rng: np.random.Generator, times: list[datetime], dup: np.ndarray) -> tuple[list[str], list[int]]:
    """GRD product names (sensing time = token 4) and, per product, the index of its pass (frame source)."""
    names, source = [], []
    for k, (tm, twice) in enumerate(zip(times, dup, strict=True)):
        sat = "AB"[int(rng.integers(2))]
        orbit = (25287 if sat == "A" else 14318) + (tm - datetime(2019, 1, 1)).days * 175 // 12
        take = f"{(orbit * 7) % 0xFFFFFF:06X}"
        for j in range(2 if twice else 1):  # a pass split into two consecutive slices of one datatake
            start = tm + timedelta(seconds=5 * j)
            names.append(f"S1{sat}_IW_GRDH_1SDV_{_stamp(start)}_{_stamp(start + timedelta(seconds=25))}_"
                         f"{orbit:06d}_{take}_{int(rng.integers(0x10000)):04X}")
            source.append(k)
    return names, source


def _s1(rng: np.random.Generator, year: int, hour: int, passes: int, dup_rate: float, nans: bool) -> tuple:
    times = _days(rng, year, passes, hour)
    t = len(times)
    frames = S1_MEAN[None, :, None, None] * np.exp(0.35 * smooth_fields(rng, (1, 2), GRID_PX, 2)
                                                   + 0.3 * rng.standard_normal((t, 2, GRID_PX, GRID_PX)))
    frames = frames.astype(np.float32)
    zeros = rng.integers(0, [t, 2, GRID_PX, GRID_PX], size=(2, 4))
    frames[tuple(zeros.T)] = 0.0  # isolated exact zeros, as in the real files
    if nans:
        k, y, x = int(rng.integers(t)), int(rng.integers(GRID_PX)), int(rng.integers(GRID_PX))
        frames[k : k + 2, :, y, x] = np.nan  # both channels of a pixel on consecutive passes
    names, source = _s1_products(rng, times, rng.random(t) < dup_rate)
    return frames[source], np.array(names, dtype=object)  # duplicated slices: bit-identical frames


def _fractions(rng: np.random.Generator, genus: str) -> dict[str, float]:
    main = float(rng.uniform(0.5, 0.95))
    out = {genus: round(main, 5)}
    others = [g for g in MAESTRO_GENERA if g != genus]
    for g in rng.choice(others, size=int(rng.integers(0, 3)), replace=False):
        out[str(g)] = round(float(rng.uniform(0.0, (1 - main) / 2)), 5)  # some fall below the 0.07 threshold
    return out


def _write_aerial(path: Path, rng: np.random.Generator, left: float, top: float) -> None:
    img = AERIAL_MEAN[:, None, None] + 30 * smooth_fields(rng, (4,), AERIAL_PX, 12) + 6 * rng.standard_normal(
        (4, AERIAL_PX, AERIAL_PX))
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    profile = dict(driver="GTiff", width=AERIAL_PX, height=AERIAL_PX, count=4, dtype="uint8", crs=AERIAL_CRS_WKT,
                   transform=Affine(AERIAL_RES, 0.0, left, 0.0, -AERIAL_RES, top), photometric="RGB", alpha="YES",
                   interleave="pixel", tiled=False, blockysize=6, compress="none")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(img)
        for b in range(4):  # Arc-made statistics tags of the real files (mean/stddev never computed)
            dst.update_tags(b + 1, STATISTICS_MINIMUM=str(img[b].min()), STATISTICS_MAXIMUM=str(img[b].max()),
                            STATISTICS_MEAN="1.#SNAN", STATISTICS_STDDEV="1.#SNAN")


def _write_h5(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with h5py.File(path, "w") as f:
        for name in sorted(arrays):
            value = arrays[name]
            if value.dtype == object:
                f.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
            else:
                f.create_dataset(name, data=value)


def _splits(rng: np.random.Generator, n: int) -> list[str]:
    held = max(1, round(0.2 * n)) if n >= 3 else 0
    names = ["val"] * held + ["test"] * held + ["train"] * (n - 2 * held)
    return [names[i] for i in rng.permutation(n)]


def _write_tables(root: Path, rows: list[dict], layout: str) -> None:
    if layout in ("csv", "both"):
        for split in ("train", "val", "test"):
            lines = [",".join(CSV_KEYS + MAESTRO_GENERA)]
            lines += [",".join([r["aerial_name"], r["sen_name"], f"{r['year']}0701"]
                               + [repr(r["fractions"].get(g, 0.0)) for g in MAESTRO_GENERA])
                      for r in rows if r["split"] == split]
            (root / f"{split}.csv").write_text("\n".join(lines), encoding="utf-8")  # real CSVs: no final newline
    if layout in ("release", "both"):
        for sub in ("split", "labels", "geojson"):
            (root / sub).mkdir(exist_ok=True)
        for split in ("train", "val", "test"):
            names = [r["aerial_name"] + "\n" for r in rows if r["split"] == split]
            (root / "split" / f"{split}_filenames.lst").write_text("".join(names), encoding="utf-8")
        labels = {r["aerial_name"]: sorted(([g, v] for g, v in r["fractions"].items()), key=lambda p: -p[1])
                  for r in rows}
        (root / "labels" / "TreeSatBA_v9_60m_multi_labels.json").write_text(json.dumps(labels), encoding="utf-8")
        features = []
        for r in rows:
            left, top = r["origin"]
            right, bottom = left + AERIAL_PX * AERIAL_RES, top - AERIAL_PX * AERIAL_RES
            ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
            features.append({"type": "Feature", "properties": {"IMG_ID": r["tile_id"], "YEAR": r["year"]},
                             "geometry": {"type": "Polygon", "coordinates": [ring]}})
        crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::25832"}}
        collection = {"type": "FeatureCollection", "name": "bb_60m", "crs": crs, "features": features}
        (root / "geojson" / "bb_60m.GeoJSON").write_text(json.dumps(collection), encoding="utf-8")


def generate(out: str | Path, tiles: int = 8, seed: int = 0, dataset: str = "treesatai-ts",
             layout: str = "both", release_aerial: bool = False, ts_name_year: bool = True) -> Path:
    """Write ``tiles`` synthetic tiles under ``<out>/treesatai-ts`` and return that root.

    ``layout``: "csv" (MAESTRO split CSVs), "release" (``split/*_filenames.lst`` + labels JSON + GeoJSON
    years and footprints) or "both". ``release_aerial``: aerial tiles in ``aerial/60m/`` as the Zenodo release
    ships them (not MAESTRO's flat ``aerial/``); ``ts_name_year=False`` names the HDF5 ``<IMG_ID>.h5`` as a public
    copy does (the CSVs still name ``<IMG_ID>_<YYYY>.h5``). Tile 0 has duplicated descending S1 passes and S1 NaNs;
    tile 1 (when present) a 10-channel S2 mask; the same seed writes the same values whatever the options.
    """
    if dataset != "treesatai-ts":
        raise ValueError(f"this generator writes TreeSatAI-TS, not {dataset!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    rng = np.random.default_rng(seed)
    root = Path(out) / "treesatai-ts"
    aerial_dir = root / "aerial" / ("60m" if release_aerial else "")
    for folder in (aerial_dir, root / "sentinel-ts"):
        folder.mkdir(parents=True, exist_ok=True)
    numbers = rng.choice(np.arange(1000, 100_000), size=tiles, replace=False)
    splits = _splits(rng, tiles)
    rows = []
    for i in range(tiles):
        genus, species = SPECIES[int(rng.integers(len(SPECIES)))]
        tile_id = f"{genus}_{species}_{int(rng.integers(1, 10))}_{int(numbers[i])}_WEFL_NLF"
        year = int(rng.integers(2011, 2021))
        ts_year = max(year, FIRST_TS_YEAR)
        east, north = (c + rng.uniform(-40_000, 40_000) for c in CENTRE_25832)
        origin = (round(east / AERIAL_RES) * AERIAL_RES, round(north / AERIAL_RES) * AERIAL_RES)
        _write_aerial(aerial_dir / f"{tile_id}.tif", rng, *origin)
        arrays = _s2(rng, ts_year, ten_mask_channels=i == 1)
        arrays["sen-1-asc-data"], arrays["sen-1-asc-products"] = _s1(
            rng, ts_year, 17, int(rng.integers(40, 80)), 0.0, nans=False)
        dup_rate = 0.9 if i % 2 == 0 else 0.0
        arrays["sen-1-des-data"], arrays["sen-1-des-products"] = _s1(
            rng, ts_year, 5, int(rng.integers(30, 60)), dup_rate, nans=i % 3 == 0)
        sen_name = f"{tile_id}_{ts_year}.h5"
        _write_h5(root / "sentinel-ts" / (sen_name if ts_name_year else f"{tile_id}.h5"), arrays)
        rows.append({"tile_id": tile_id, "aerial_name": f"{tile_id}.tif", "sen_name": sen_name, "year": year,
                     "split": splits[i], "fractions": _fractions(rng, genus), "origin": origin})
    _write_tables(root, rows, layout)
    return root
