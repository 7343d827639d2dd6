"""Synthetic PASTIS-HD in the real published layout (reference/datasets.md §3).

``metadata.geojson`` (Lambert-93 squares with a ``crs`` member, ``ID_PATCH``, ``Fold``, ``dates-*`` written in
both forms seen in the wild: object and JSON string), ``DATA_<X>/<X>_<ID>.npy`` time series, the SPOT GeoTIFF
georeferenced on the polygon, ``ANNOTATIONS/TARGET_<ID>.npy`` and ``NORM_<X>_patch.json``. Shapes, dtypes and paths
come from the manifest; pixel values are smooth random fields.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from maestro_data.manifest import Manifest, ModalitySpec, TargetSpec, load_manifest
from maestro_data.synthetic import smooth_fields

FIRST_DAY, LAST_DAY = date(2018, 9, 1), date(2019, 11, 1)  # PASTIS acquisition window
STEPS = (20, 30)  # time steps per series (real: S2 38-61, S1 ~70), kept small for speed
S2_TILES = ("T30UXV", "T31TFJ", "T31TFM", "T32ULU")  # the four S2 tiles PASTIS covers
_X_RANGE, _Y_RANGE = (600_000, 1_000_000), (6_300_000, 6_900_000)  # Lambert-93 metres, southern/eastern France
# The release's own names (datasets.md §3), written here and not taken from the reader: a wrong name in the reader
# then fails the build tests instead of being generated the same way.
METADATA = "metadata.geojson"
DATES_OF = {"DATA_S2": "dates-S2", "DATA_S1A": "dates-S1A", "DATA_S1D": "dates-S1D"}  # series folder -> property
_RANGES = {"uint8": (0, 255), "uint16": (0, 5_000), "int16": (0, 5_000), "float32": (-30.0, 5.0)}


def _scale(field: np.ndarray, dtype: str) -> np.ndarray:
    lo, hi = _RANGES[dtype]
    values = np.clip(field, -1, 1, out=field)  # in place: these arrays are tens of MB
    values *= (hi - lo) / 2
    values += (hi + lo) / 2
    return values.astype(dtype) if dtype == "float32" else np.rint(values, out=values).astype(dtype)


def _series(rng: np.random.Generator, spec: ModalitySpec, steps: int) -> np.ndarray:
    """(T, C, H, W): a per-channel ground pattern plus slowly varying per-date fields."""
    c, s = spec.stored_channels, spec.tile_size
    field = smooth_fields(rng, (steps, c), s, 4)
    field *= 0.3
    field += smooth_fields(rng, (1, c), s, 8)
    field += np.sin(np.linspace(0, np.pi, steps, dtype=np.float32))[:, None, None, None] * 0.3
    return _scale(field, spec.dtype)


def _dates(rng: np.random.Generator, steps: int) -> list[int]:
    days = np.sort(rng.choice((LAST_DAY - FIRST_DAY).days + 1, steps, replace=False))
    return [int((FIRST_DAY + timedelta(days=int(d))).strftime("%Y%m%d")) for d in days]


def _dates_value(dates: list[int], form: int) -> dict | str:
    """The real file's quirks: an object, the same object as a JSON string, or an object of string dates."""
    table = {str(i): (str(d) if form == 2 else d) for i, d in enumerate(dates)}
    return json.dumps(table) if form == 1 else table


def _target(rng: np.random.Generator, spec: TargetSpec) -> tuple[np.ndarray, int, float]:
    """(3, H, W) uint8: ch0 semantic classes on Voronoi 'parcels' (void included), ch1 parcel index, ch2 borders."""
    s, parcels = spec.tile_size, 24
    seeds = rng.uniform(0, s, (parcels, 2))
    yy, xx = np.mgrid[0:s, 0:s]
    owner = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1)
    classes = rng.integers(0, len(spec.classes), parcels)
    classes[0] = spec.missing_value if 0 <= spec.missing_value < len(spec.classes) else len(spec.classes) - 1
    classes[1] = 0  # background
    semantic = classes[owner]
    border = (np.diff(owner, axis=0, prepend=owner[:1]) != 0) | (np.diff(owner, axis=1, prepend=owner[:, :1]) != 0)
    target = np.stack([semantic, owner + 1, border]).astype(np.uint8)
    return target, parcels, float((semantic != 0).mean())


def _write_spot(path: Path, data: np.ndarray, manifest: Manifest, spec: ModalitySpec, x0: float, y0: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t, c, h, w = data.shape
    transform = Affine(spec.resolution_m, 0.0, x0, 0.0, -spec.resolution_m, y0 + manifest.tile_m)  # north-up
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=t * c, dtype=data.dtype,
                       crs=manifest.location_crs, transform=transform) as dst:
        dst.write(data.reshape(t * c, h, w))


def _write_norms(root: Path, stats: dict[str, dict[int, list[np.ndarray]]]) -> None:
    """``NORM_<X>_patch.json``: per fold, per channel mean/std of the patches (as the release ships)."""
    for key, folds in stats.items():
        table = {}
        for fold, (total, squares, n) in sorted(folds.items()):
            mean = total / n
            std = np.sqrt(np.maximum(squares / n - mean**2, 0))
            table[f"Fold_{fold}"] = {"mean": mean.tolist(), "std": std.tolist()}
        (root / f"NORM_{key.removeprefix('dates-')}_patch.json").write_text(json.dumps(table))


def _write_split_csv(path: Path, ids: list[str]) -> None:
    """A MAESTRO split file: a pandas index column and ``image`` = ID_PATCH (``maestro/dataset/utils.py``)."""
    path.write_text(",image\n" + "".join(f"{i},{tid}\n" for i, tid in enumerate(ids)))


def _write_splits(root: Path, folds: dict[str, int], rng: np.random.Generator, maestro_csvs: bool,
                  fold_csvs: tuple[int, ...]) -> None:
    """MAESTRO's ``{stage}.csv`` (its own split, independent of ``Fold``: what the published files hold is not
    known) and ``{stage}_fold_{k}.csv`` (fold k of the paper's protocol: train folds k..k+2, val k+3, test k+4,
    modulo 5)."""
    stages = ("train", "val", "test")
    if maestro_csvs:
        ids = [str(t) for t in rng.permutation(sorted(folds))]
        cut = (len(ids) * 3 // 5, len(ids) * 4 // 5)
        for stage, part in zip(stages, (ids[:cut[0]], ids[cut[0]:cut[1]], ids[cut[1]:]), strict=True):
            _write_split_csv(root / f"{stage}.csv", part)
    for k in fold_csvs:
        shifted = {f: (f - k) % 5 for f in range(1, 6)}  # 0, 1, 2 -> train, 3 -> val, 4 -> test
        for stage, members in zip(stages, ((0, 1, 2), (3,), (4,)), strict=True):
            _write_split_csv(root / f"{stage}_fold_{k}.csv",
                             [t for t, f in folds.items() if shifted[f] in members])


def generate(out: str | Path, tiles: int = 8, seed: int = 0, dataset: str = "pastis-hd", maestro_csvs: bool = False,
             fold_csvs: tuple[int, ...] = ()) -> Path:
    """Write ``tiles`` PASTIS-HD patches (ids 10000, 10001, ...; folds 1..5 evenly, shuffled) to ``<out>/pastis-hd``;
    with ``maestro_csvs`` also MAESTRO's ``train.csv``/``val.csv``/``test.csv``, and ``{stage}_fold_{k}.csv`` for
    every k of ``fold_csvs``."""
    manifest = load_manifest(dataset)
    rng = np.random.default_rng(seed)
    root = Path(out) / "pastis-hd"
    root.mkdir(parents=True, exist_ok=True)
    folds = rng.permutation([i % 5 + 1 for i in range(tiles)])
    features, stats = [], {}
    for i in range(tiles):
        tile_id, fold = str(10_000 + i), int(folds[i])
        x0 = float(rng.integers(*_X_RANGE) // 10 * 10)
        y0 = float(rng.integers(*_Y_RANGE) // 10 * 10)
        props: dict = {"ID_PATCH": int(tile_id)}
        for j, spec in enumerate(manifest.modalities.values()):
            path = root / spec.source.replace("{id}", tile_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            if spec.source.endswith(".tif"):
                _write_spot(path, _scale(smooth_fields(rng, (1, spec.stored_channels), spec.tile_size, 40),
                                         spec.dtype), manifest, spec, x0, y0)
                continue
            dates = _dates(rng, int(rng.integers(STEPS[0], STEPS[1] + 1)))
            data = _series(rng, spec, len(dates))
            np.save(path, data)
            key = DATES_OF[spec.source.split("/", 1)[0]]
            props[key] = _dates_value(dates, (i + j) % 3)
            acc = stats.setdefault(key, {}).setdefault(fold, [0.0, 0.0, 0])
            sample = data[:, :, ::4, ::4].astype(np.float64)  # a 1/16 pixel sample is plenty for statistics
            acc[0] += sample.sum(axis=(0, 2, 3))
            acc[1] += (sample**2).sum(axis=(0, 2, 3))
            acc[2] += sample[:, 0].size
        for spec in manifest.targets.values():
            path = root / spec.source.replace("{id}", tile_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            target, parcels, cover = _target(rng, spec)
            np.save(path, target)
            props.update(N_Parcel=parcels, Parcel_Cover=round(cover, 4))
        props.update(TILE=S2_TILES[i % len(S2_TILES)], Fold=fold)
        ring = [[x0, y0], [x0 + manifest.tile_m, y0], [x0 + manifest.tile_m, y0 + manifest.tile_m],
                [x0, y0 + manifest.tile_m], [x0, y0]]
        features.append({"type": "Feature", "id": tile_id, "properties": props,
                         "geometry": {"type": "Polygon", "coordinates": [ring]}})
    epsg = manifest.location_crs.split(":")[-1]
    collection = {"type": "FeatureCollection", "name": "metadata",
                  "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}},
                  "features": features}
    (root / METADATA).write_text(json.dumps(collection))
    _write_norms(root, stats)
    # after every pixel draw: asking for split files leaves the tiles of a seed unchanged
    _write_splits(root, {f["id"]: f["properties"]["Fold"] for f in features}, rng, maestro_csvs, tuple(fold_csvs))
    return root
