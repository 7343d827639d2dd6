"""Reader of the published TreeSatAI-TS layout: ``aerial/<IMG_ID>.tif``, ``sentinel-ts/<IMG_ID>_<YYYY>.h5``.

Splits and genus fractions come from MAESTRO-style ``{train,val,test}.csv`` in the root or, when no CSV
exists, from the original release (``*_filenames.lst``, the labels JSON, ``geojson/bb_60m.GeoJSON`` years).
Every time step is kept in file order (duplicated S1 frames included) so the stream sees what the official
reader sees. Facts and quirks: ``reference/datasets.md`` §2.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from maestro_data.dates import dates_array, parse_date
from maestro_data.errors import ManifestError, SourceError
from maestro_data.geo import bounds_centre_lonlat
from maestro_data.manifest import Manifest, ModalitySpec
from maestro_data.sources.base import (
    Source,
    SourceOptions,
    check_series,
    check_unique,
    to_stored_dtype,
    warn_missing_split,
)
from maestro_data.tile import Series, Tile, TileRef

AERIAL_FILE_PX = 304  # published aerial GeoTIFFs are 304 px; MAESTRO centre-crops them to the manifest tile
KEY_COLUMNS = ("aerial_name", "sen_name", "aerial_date")
FRACTIONS_KEY = "fractions"  # reader-private TileRef key: genus fractions in the label class order
LABELS_JSON = Path("labels") / "TreeSatBA_v9_60m_multi_labels.json"
YEARS_GEOJSON = Path("geojson") / "bb_60m.GeoJSON"
TS_DIR = "sentinel-ts"
LOCATION_PATTERN = "aerial/{aerial_name}"  # the only georeferenced file of a tile (the HDF5 has none)
# HDF5 dataset prefix -> index of the sensing time in the product name split on "_" (S2 L2A / S1 GRD names)
DATE_TOKEN = {"sen-2": 2, "sen-1": 4}
_STAMP = re.compile(r"\d{8}T\d{6}")
_READ_ERRORS = (RasterioError, OSError, RuntimeError)  # what rasterio/h5py raise on truncated or corrupt files


@dataclass(frozen=True)
class _Plan:
    """How one modality is read: a GeoTIFF (``dataset`` None) or an HDF5 dataset with its product names."""

    spec: ModalitySpec
    pattern: str
    dataset: str | None = None
    products: str = ""
    token: int = 0
    mask: str | None = None


def _plan(spec: ModalitySpec, origin: str) -> _Plan:
    pattern, _, dataset = spec.source.partition("#")
    if not dataset:
        return _Plan(spec, pattern)
    where = f"{origin}: modalities.{spec.name}"
    stem = dataset.removesuffix("-data")
    token = next((t for prefix, t in DATE_TOKEN.items() if stem.startswith(prefix)), None)
    if stem == dataset or token is None:
        raise ManifestError(f"{where}.source: HDF5 dataset {dataset!r} is not '<sen-1|sen-2...>-data'")
    mask = None
    if spec.cloud_mask is not None:
        mask_pattern, _, mask = spec.cloud_mask.source.partition("#")
        if not mask or mask_pattern != pattern:
            raise ManifestError(f"{where}.cloud_mask.source: expected '{pattern}#<dataset>', "
                                f"got {spec.cloud_mask.source!r}")
    return _Plan(spec, pattern, dataset, f"{stem}-products", token, mask)


def _centre_lonlat(src: rasterio.DatasetReader) -> tuple[float, float]:
    return bounds_centre_lonlat(src.bounds, src.crs.to_wkt())


class TreeSatAITSSource(Source):
    """TreeSatAI-TS as published (HF ``IGNF/TreeSatAI-Time-Series``), with MAESTRO's split CSVs if present."""

    dataset = "treesatai-ts"

    def __init__(self, manifest: Manifest, root: str | Path, options: SourceOptions | None = None):
        super().__init__(manifest, root, options)
        origin = f"manifest {manifest.name!r}"
        self._plans = {name: _plan(spec, origin) for name, spec in manifest.modalities.items()}
        tifs = [p for p in self._plans.values() if p.dataset is None]
        for p in tifs:
            if p.spec.tile_size > AERIAL_FILE_PX or (AERIAL_FILE_PX - p.spec.tile_size) % 2:
                raise ManifestError(f"{origin}: modalities.{p.spec.name}: a {p.spec.tile_size} px tile cannot "
                                    f"be centre-cropped from the {AERIAL_FILE_PX} px TreeSatAI-TS GeoTIFF")
        self._location_pattern = tifs[0].pattern if tifs else LOCATION_PATTERN
        targets = list(manifest.targets.values())
        for t in targets:
            if t.type != "multilabel" or not np.issubdtype(np.dtype(t.dtype), np.floating):
                raise ManifestError(f"{origin}: targets.{t.name}: TreeSatAI-TS only has genus area fractions "
                                    "(a multilabel target of a float dtype)")
            if set(t.classes) != set(targets[0].classes):
                raise ManifestError(f"{origin}: targets.{t.name}: classes differ from targets.{targets[0].name}")
        self._classes: tuple[str, ...] = targets[0].classes if targets else ()
        self._folders = sorted({p.pattern.split("/")[0] for p in self._plans.values()} | {"aerial"})

    # ----- layout and split tables -------------------------------------------------------------------------
    def _split_tables(self) -> tuple[str, dict[str, Path | None]]:
        """('csv' | 'release', split -> table or None); MAESTRO CSVs win over the release lists."""
        names = self.manifest.splits.names
        csvs = {s: self.root / f"{s}.csv" for s in names}
        if any(p.is_file() for p in csvs.values()):
            return "csv", {s: p if p.is_file() else None for s, p in csvs.items()}
        lists: dict[str, Path | None] = {}
        for s in names:
            found = [p for p in (self.root / f"{s}_filenames.lst", self.root / "split" / f"{s}_filenames.lst")
                     if p.is_file()]
            lists[s] = found[0] if found else None
        if not any(lists.values()):
            expected = ", ".join(p.name for p in csvs.values())
            raise SourceError(f"not TreeSatAI-TS: no split table (expected {expected} in the root, or "
                              f"{names[0]}_filenames.lst... in the root or in split/)", path=str(self.root))
        return "release", lists

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise SourceError("not a folder (expected the TreeSatAI-TS root)", path=str(self.root))
        missing = [f"{d}/" for d in self._folders if not (self.root / d).is_dir()]
        if missing:
            raise SourceError(f"not TreeSatAI-TS: missing {', '.join(missing)} (expected the folders "
                              f"{', '.join(f'{d}/' for d in self._folders)} and split tables)", path=str(self.root))
        self._split_tables()

    def list_tiles(self) -> list[TileRef]:
        kind, tables = self._split_tables()
        if kind == "release":
            return check_unique(self._read_release(tables), str(self.root))
        refs: list[TileRef] = []
        for split, path in tables.items():
            if path is None:
                warn_missing_split(self.root / f"{split}.csv", split)
            else:
                refs.extend(self._read_csv(path, split))
        return check_unique(refs, str(self.root))

    def _ref(self, split: str, aerial_name: str, sen_name: str, aerial_date: str, fractions: list[float],
             where: str) -> TileRef:
        if not aerial_name.endswith(".tif"):
            raise SourceError(f"aerial_name {aerial_name!r} is not '<IMG_ID>.tif'", path=where)
        tile_id = aerial_name.removesuffix(".tif")
        try:
            parse_date(aerial_date)
        except ValueError as exc:
            raise SourceError(f"aerial_date: {exc}", tile_id=tile_id, path=where) from None
        bad = [(c, v) for c, v in zip(self._classes, fractions, strict=True) if not 0.0 <= v <= 1.0]
        if bad:  # NaN fails the comparison too
            raise SourceError(f"genus fractions {bad} are outside [0, 1]", tile_id=tile_id, path=where)
        keys = {"aerial_name": aerial_name, "sen_name": sen_name, "aerial_date": aerial_date,
                FRACTIONS_KEY: ",".join(repr(float(v)) for v in fractions)}
        return TileRef(tile_id=tile_id, split=split, keys=keys)

    def _read_csv(self, path: Path, split: str) -> list[TileRef]:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        header = [h.strip() for h in rows[0]] if rows else []
        genera = [h for h in header if h not in KEY_COLUMNS]
        missing = [c for c in KEY_COLUMNS + self._classes if c not in header]
        unknown = [g for g in genera if g not in self._classes] if self._classes else []
        if missing or unknown:
            raise SourceError(f"columns do not match the manifest: missing {missing}, unknown genus columns "
                              f"{unknown} (expected {', '.join(KEY_COLUMNS)} + the {len(self._classes)} "
                              "target classes, in any order)", path=str(path))
        col = {h: i for i, h in enumerate(header)}
        refs = []
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{line}"
            if len(row) != len(header):
                raise SourceError(f"{len(row)} fields, expected {len(header)}", path=where)
            try:
                fractions = [float(row[col[c]]) for c in self._classes]
            except ValueError as exc:
                raise SourceError(f"genus fraction is not a number ({exc})", tile_id=row[col["aerial_name"]],
                                  path=where) from None
            refs.append(self._ref(split, *(row[col[c]].strip() for c in KEY_COLUMNS), fractions, where))
        return refs

    def _read_release(self, lists: dict[str, Path | None]) -> list[TileRef]:
        labels, years, series = self._load_json(LABELS_JSON), self._release_years(), self._h5_index()
        refs = []
        for split, path in lists.items():
            if path is None:
                warn_missing_split(self.root / f"{split}_filenames.lst", split)
                continue
            for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                aerial_name = text.strip()
                tile_id = aerial_name.removesuffix(".tif")
                if not aerial_name:
                    continue
                if tile_id not in years:
                    raise SourceError(f"no YEAR for this IMG_ID in {YEARS_GEOJSON}", tile_id=tile_id,
                                      path=str(self.root / YEARS_GEOJSON))
                fractions = self._release_fractions(labels, aerial_name, tile_id)
                found = series.get(tile_id, [])
                # a missing or ambiguous time series fails this tile only: probe/read re-glob and name it
                sen_name = found[0] if len(found) == 1 else ""
                refs.append(self._ref(split, aerial_name, sen_name, f"{years[tile_id]}0701", fractions,
                                      f"{path}:{line}"))
        return refs

    def _load_json(self, rel: Path) -> object:
        path = self.root / rel
        if not path.is_file():
            raise SourceError(f"missing: the release layout needs {rel} beside *_filenames.lst", path=str(path))
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise SourceError(f"not readable JSON: {exc}", path=str(path)) from None

    def _release_years(self) -> dict[str, int]:
        data = self._load_json(YEARS_GEOJSON)
        try:
            return {str(f["properties"]["IMG_ID"]): int(f["properties"]["YEAR"]) for f in data["features"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"expected a FeatureCollection with properties IMG_ID and YEAR ({exc!r})",
                              path=str(self.root / YEARS_GEOJSON)) from None

    def _release_fractions(self, labels: object, aerial_name: str, tile_id: str) -> list[float]:
        path = str(self.root / LABELS_JSON)
        if not isinstance(labels, dict) or aerial_name not in labels:
            raise SourceError(f"no labels for {aerial_name!r}", tile_id=tile_id, path=path)
        values = dict.fromkeys(self._classes, 0.0)
        try:
            pairs = [(str(g), float(v)) for g, v in labels[aerial_name]]
        except (TypeError, ValueError):
            raise SourceError(f"labels must be [[genus, fraction], ...], got {labels[aerial_name]!r}",
                              tile_id=tile_id, path=path) from None
        for genus, value in pairs:
            if genus not in values:
                raise SourceError(f"genus {genus!r} is outside the manifest's classes", tile_id=tile_id,
                                  path=path)
            values[genus] = value
        return list(values.values())

    def _h5_index(self) -> dict[str, list[str]]:
        """IMG_ID -> its ``<IMG_ID>_<year>.h5`` files, from one listing (a glob per tile is quadratic)."""
        index: dict[str, list[str]] = {}
        folder = self.root / TS_DIR
        if not folder.is_dir():
            raise SourceError(f"not TreeSatAI-TS: missing {TS_DIR}/ (the Sentinel time-series HDF5 files)",
                              path=str(self.root))
        for name in sorted(p.name for p in folder.iterdir()):
            if name.endswith(".h5") and "_" in name:
                index.setdefault(name.rsplit("_", 1)[0], []).append(name)
        return index

    # ----- one tile ----------------------------------------------------------------------------------------
    def _path(self, pattern: str, ref: TileRef) -> Path:
        if "{sen_name}" in pattern and not ref.keys.get("sen_name"):
            found = sorted(p.name for p in (self.root / TS_DIR).glob(f"{ref.tile_id}_*.h5"))
            raise SourceError(f"expected exactly one time series {TS_DIR}/{ref.tile_id}_*.h5, found "
                              f"{len(found)}: {found}", tile_id=ref.tile_id, path=str(self.root / TS_DIR))
        try:
            return self.root / pattern.format(**ref.keys)
        except KeyError as exc:
            raise SourceError(f"source pattern {pattern!r} needs key {exc}", tile_id=ref.tile_id) from None

    @staticmethod
    def _open_h5(path: Path, ref: TileRef) -> h5py.File:
        if not path.is_file():
            raise SourceError("missing Sentinel time-series HDF5", tile_id=ref.tile_id, path=str(path))
        try:
            return h5py.File(path, "r")
        except _READ_ERRORS as exc:
            raise SourceError(f"cannot open HDF5 (truncated or corrupt?): {exc}", tile_id=ref.tile_id,
                              path=str(path)) from None

    @staticmethod
    def _dataset(f: h5py.File, name: str, ndim: int, ref: TileRef, path: Path) -> h5py.Dataset:
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != ndim:
            got = "absent" if ds is None else f"shape {getattr(ds, 'shape', 'group')}"
            raise SourceError(f"expected a {ndim}-D dataset {name!r} ({got}; file has {sorted(f)})",
                              tile_id=ref.tile_id, path=str(path))
        return ds

    def _each(self, ref: TileRef, fn: Callable) -> dict:
        """Call ``fn(name, plan, h5 file or None, path)`` per modality, opening each HDF5 once."""
        files: dict[Path, h5py.File] = {}
        out = {}
        try:
            for name, plan in self._plans.items():
                path = self._path(plan.pattern, ref)
                if plan.dataset is None:
                    out[name] = fn(name, plan, None, path)
                    continue
                f = files[path] = files.get(path) or self._open_h5(path, ref)
                try:
                    out[name] = fn(name, plan, f, path)
                except _READ_ERRORS as exc:
                    raise SourceError(f"{name}: cannot read HDF5 (truncated or corrupt?): {exc}",
                                      tile_id=ref.tile_id, path=str(path)) from None
        finally:
            for f in files.values():
                f.close()
        return out

    def probe(self, ref: TileRef) -> TileRef:
        def count(name: str, plan: _Plan, f: h5py.File | None, path: Path) -> int:
            if f is None:
                if not path.is_file():
                    raise SourceError(f"{name}: missing GeoTIFF", tile_id=ref.tile_id, path=str(path))
                return 1
            steps = self._dataset(f, plan.dataset, 4, ref, path).shape[0]
            names = self._dataset(f, plan.products, 1, ref, path).shape[0]
            if steps != names or steps == 0:
                raise SourceError(f"{name}: {plan.dataset} has {steps} steps and {plan.products} {names} "
                                  "names (expected equal and > 0)", tile_id=ref.tile_id, path=str(path))
            return steps

        return replace(ref, keys=dict(ref.keys), counts=self._each(ref, count))

    def _read_tif(self, plan: _Plan, ref: TileRef, path: Path) -> tuple[Series, tuple[float, float]]:
        spec, tid, px = plan.spec, ref.tile_id, AERIAL_FILE_PX
        if not path.is_file():
            raise SourceError(f"{spec.name}: missing GeoTIFF", tile_id=tid, path=str(path))
        margin = (px - spec.tile_size) // 2
        try:
            with rasterio.open(path) as src:
                if (src.height, src.width, src.count) != (px, px, spec.stored_channels):
                    raise SourceError(f"{spec.name}: {src.count} bands of {src.height}x{src.width} px, "
                                      f"expected {spec.stored_channels} bands of {px}x{px} px", tile_id=tid,
                                      path=str(path))
                if src.crs is None:
                    raise SourceError(f"{spec.name}: GeoTIFF has no CRS", tile_id=tid, path=str(path))
                # raw read of every band: GDAL flags band 4 as alpha, so no mask may ever be applied
                data = src.read(window=Window(margin, margin, spec.tile_size, spec.tile_size))
                lonlat = _centre_lonlat(src)
        except _READ_ERRORS as exc:
            raise SourceError(f"{spec.name}: cannot read GeoTIFF (truncated or corrupt?): {exc}", tile_id=tid,
                              path=str(path)) from None
        if not all(math.isfinite(v) for v in lonlat):
            raise SourceError(f"{spec.name}: bounds do not map to lon/lat", tile_id=tid, path=str(path))
        data = to_stored_dtype(data, spec.dtype, tile_id=tid, path=path, what=spec.name)[None]
        dates = dates_array([ref.keys["aerial_date"]])
        return check_series(spec, Series(data, dates), tile_id=tid, path=path), lonlat

    def _location(self, ref: TileRef) -> tuple[float, float]:
        """lon/lat of the aerial GeoTIFF centre, for manifests that do not read the aerial modality."""
        path = self._path(self._location_pattern, ref)
        try:
            with rasterio.open(path) as src:
                return _centre_lonlat(src)
        except (*_READ_ERRORS, AttributeError) as exc:
            raise SourceError(f"cannot read the georeferenced GeoTIFF: {exc}", tile_id=ref.tile_id,
                              path=str(path)) from None

    def _dates(self, f: h5py.File, plan: _Plan, ref: TileRef, path: Path) -> np.ndarray:
        ds = self._dataset(f, plan.products, 1, ref, path)
        if h5py.check_string_dtype(ds.dtype) is None:
            raise SourceError(f"{plan.products} has dtype {ds.dtype}, expected product-name strings",
                              tile_id=ref.tile_id, path=str(path))
        stamps = []
        for i, raw in enumerate(ds[()]):
            name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            parts = name.split("_")
            if len(parts) <= plan.token or not _STAMP.fullmatch(parts[plan.token]):
                raise SourceError(f"{plan.products}[{i}] = {name!r} is not a product name with its sensing "
                                  f"time YYYYMMDDTHHMMSS as token {plan.token}", tile_id=ref.tile_id,
                                  path=str(path))
            stamps.append(parts[plan.token])
        try:
            return dates_array(stamps)
        except ValueError as exc:
            raise SourceError(f"{plan.products}: {exc}", tile_id=ref.tile_id, path=str(path)) from None

    def _read_h5(self, f: h5py.File, plan: _Plan, ref: TileRef, path: Path) -> Series:
        spec, tid = plan.spec, ref.tile_id
        data = self._dataset(f, plan.dataset, 4, ref, path)[()]
        dates = self._dates(f, plan, ref, path)
        if len(dates) != len(data):
            raise SourceError(f"{spec.name}: {len(data)} steps in {plan.dataset} but {len(dates)} names in "
                              f"{plan.products}", tile_id=tid, path=str(path))
        data = to_stored_dtype(data, spec.dtype, tile_id=tid, path=path, what=f"{spec.name} ({plan.dataset})")
        mask = None
        if plan.mask is not None:
            cm = spec.cloud_mask
            # snow, cloud are the first channels; some real files carry 8 more, all-zero channels.
            raw = self._dataset(f, plan.mask, 4, ref, path)[:, : len(cm.bands)]
            if np.dtype(cm.dtype).kind in "ui":
                # Real masks hold resampling residues (1e-22..1e-8): for a manifest that stores integers, ceil
                # keeps "value > integer threshold" exactly as the official reader decides it.
                raw = np.ceil(raw)
            mask = to_stored_dtype(raw, cm.dtype, tile_id=tid, path=path, what=f"{spec.name} mask {plan.mask}")
        return check_series(spec, Series(data, dates, mask), tile_id=tid, path=path)

    def read(self, ref: TileRef) -> Tile:
        located: list[tuple[float, float]] = []

        def one(name: str, plan: _Plan, f: h5py.File | None, path: Path) -> Series:
            if f is not None:
                return self._read_h5(f, plan, ref, path)
            series, lonlat = self._read_tif(plan, ref, path)
            located.append(lonlat)
            return series

        series = self._each(ref, one)
        lon, lat = located[0] if located else self._location(ref)
        values = ref.keys[FRACTIONS_KEY].split(",") if self._classes else []
        fractions = dict(zip(self._classes, map(float, values), strict=True))
        targets = {t.name: np.asarray([fractions[c] for c in t.classes], dtype=t.dtype)
                   for t in self.manifest.targets.values()}
        ref_date = self.manifest.reference_date_tuple() or parse_date(ref.keys["aerial_date"])
        return Tile(tile_id=ref.tile_id, split=ref.split, fold=ref.fold, lon=float(lon), lat=float(lat),
                    ref_date=np.asarray(ref_date, dtype=np.int16), series=series, targets=targets)
