"""Reader of the published TreeSatAI-TS layouts: ``aerial/<IMG_ID>.tif``, ``sentinel-ts/<IMG_ID>_<YYYY>.h5``.

Splits and genus fractions come from MAESTRO-style ``{train,val,test}.csv`` in the root or, when no CSV
exists, from the original release (``*_filenames.lst``, the labels JSON, ``geojson/bb_60m.GeoJSON`` years);
where each file may sit is ``treesatai_layout``'s business. Every time step is kept in file order (duplicated S1
frames included) so the stream sees what the official reader sees. Georeference: the aerial GeoTIFF is the only
georeferenced file; the HDF5 rasters cover its central 60 m (its 300 px crop), which must match the tile's
``bb_60m.GeoJSON`` footprint where that file exists. Facts and quirks: ``reference/datasets.md`` §2.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
from pyproj.exceptions import ProjError
from rasterio.windows import Window

from maestro_data.dates import dates_array, parse_date
from maestro_data.errors import ManifestError, SourceError
from maestro_data.geo import bounds_centre_lonlat
from maestro_data.manifest import Manifest
from maestro_data.sources.base import (
    Source,
    SourceOptions,
    check_file,
    check_series,
    check_unique,
    defective,
    raise_defect,
    split_table_problems,
    to_stored_dtype,
)
from maestro_data.sources.geotiff import Header, read_geotiff
from maestro_data.sources.grids import (
    bounds_grid,
    footprint_bounds,
    footprint_misregistration,
    grid_bounds,
    pixel_size,
    window_grid,
)
from maestro_data.sources.treesatai_h5 import READ_ERRORS, Plan, dataset, open_h5, plan_of, read_series
from maestro_data.sources.treesatai_layout import (
    FOOTPRINTS_GEOJSON,
    LABELS_JSON,
    RELEASE_AERIAL,
    Row,
    aerial_candidates,
    footprints,
    h5_index,
    load_json,
    read_csv_rows,
    read_list,
    release_fractions,
    release_years,
    split_tables,
)
from maestro_data.tile import Grid, Series, Tile, TileRef

AERIAL_FILE_PX = 304  # published aerial GeoTIFFs are 304 px; MAESTRO centre-crops them to the manifest tile
FRACTIONS_KEY = "fractions"  # reader-private TileRef key: genus fractions in the label class order
TS_DIR = "sentinel-ts"
LOCATION_PATTERN = "aerial/{aerial_name}"  # the only georeferenced file of a tile (the HDF5 has none)


def _missing_tif(path: Path) -> str:
    return f"missing GeoTIFF (nor in the release's {path.parent.name}/{RELEASE_AERIAL}/)"


class TreeSatAITSSource(Source):
    """TreeSatAI-TS as published (HF ``IGNF/TreeSatAI-Time-Series``), with MAESTRO's split CSVs if present."""

    dataset = "treesatai-ts"

    def __init__(self, manifest: Manifest, root: str | Path, options: SourceOptions | None = None):
        super().__init__(manifest, root, options)
        origin = f"manifest {manifest.name!r}"
        self._plans = {name: plan_of(spec, origin) for name, spec in manifest.modalities.items()}
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
        self._footprints: tuple[dict[str, np.ndarray], str] | None = None  # bb_60m.GeoJSON, loaded on first use

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_footprints"] = None  # each build worker reloads the GeoJSON rather than receive a copy
        return state

    # ----- layout and split tables -------------------------------------------------------------------------
    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise SourceError("not a folder (expected the TreeSatAI-TS root)", path=str(self.root))
        missing = [f"{d}/" for d in self._folders if not (self.root / d).is_dir()]
        if missing:
            raise SourceError(f"not TreeSatAI-TS: missing {', '.join(missing)} (expected the folders "
                              f"{', '.join(f'{d}/' for d in self._folders)} and split tables)", path=str(self.root))
        split_tables(self.root, self.manifest.splits.names)

    def list_tiles(self) -> list[TileRef]:
        kind, tables = split_tables(self.root, self.manifest.splits.names)
        problems = split_table_problems(tables)
        self.report_split_tables(problems)
        usable = {s: p for s, p in tables.items() if s not in {b for b, _, _ in problems}}
        if kind == "csv":
            rows = [row for s, p in usable.items() for row in read_csv_rows(p, s, self._classes)]
        else:
            rows = self._release_rows(usable)
        return check_unique([self._ref(row) for row in rows], str(self.root))

    def _ref(self, row: Row) -> TileRef:
        """The row's tile, or a defective ref whose probe raises what is wrong with it (that tile only fails)."""
        tile_id = row.aerial_name.removesuffix(".tif")
        try:
            if row.problem is not None:
                raise SourceError(row.problem, tile_id=tile_id, path=row.where)
            if not row.aerial_name.endswith(".tif"):
                raise SourceError(f"aerial_name {row.aerial_name!r} is not '<IMG_ID>.tif'", path=row.where)
            try:
                parse_date(row.aerial_date)
            except ValueError as exc:
                raise SourceError(f"aerial_date: {exc}", tile_id=tile_id, path=row.where) from None
            bad = [(c, v) for c, v in zip(self._classes, row.fractions, strict=True) if not 0.0 <= v <= 1.0]
            if bad:  # NaN fails the comparison too
                raise SourceError(f"genus fractions {bad} are outside [0, 1]", tile_id=tile_id, path=row.where)
        except SourceError as exc:
            return defective(tile_id, row.split, exc)
        keys = {"aerial_name": row.aerial_name, "sen_name": row.sen_name, "aerial_date": row.aerial_date,
                FRACTIONS_KEY: ",".join(repr(float(v)) for v in row.fractions)}
        return TileRef(tile_id=tile_id, split=row.split, keys=keys)

    def _release_rows(self, lists: dict[str, Path]) -> list[Row]:
        geo_path = self.root / FOOTPRINTS_GEOJSON
        labels, geojson = load_json(self.root, LABELS_JSON), load_json(self.root, FOOTPRINTS_GEOJSON)
        years = release_years(geojson, geo_path)
        self._footprints = footprints(geojson, geo_path, self.manifest.location_crs)
        series = h5_index(self._ts_names())
        rows = []
        for split, path in lists.items():
            for line, aerial_name in read_list(path):
                tile_id = aerial_name.removesuffix(".tif")
                where, problem, fractions = f"{path}:{line}", None, ()
                try:
                    fractions = release_fractions(labels, aerial_name, self._classes)
                except ValueError as exc:
                    where, problem = str(self.root / LABELS_JSON), str(exc)
                if tile_id not in years:
                    where, problem = str(geo_path), f"no YEAR for this IMG_ID in {FOOTPRINTS_GEOJSON}"
                found = series.get(tile_id, [])
                # a missing or ambiguous time series fails this tile only: probe/read name the candidates
                rows.append(Row(split, aerial_name, found[0] if len(found) == 1 else "",
                                f"{years.get(tile_id, 0)}0701", fractions, where, problem))
        return rows

    def _ts_names(self) -> list[str]:
        folder = self.root / TS_DIR
        if not folder.is_dir():
            raise SourceError(f"not TreeSatAI-TS: missing {TS_DIR}/ (the Sentinel time-series HDF5 files)",
                              path=str(self.root))
        return [p.name for p in folder.iterdir()]

    def _footprint_table(self) -> tuple[dict[str, np.ndarray], str] | None:
        """IMG_ID -> footprint polygon of ``bb_60m.GeoJSON`` and its CRS; None when the folder has no such file."""
        if self._footprints is None:
            path = self.root / FOOTPRINTS_GEOJSON
            if not path.exists():
                return None
            self._footprints = footprints(load_json(self.root, FOOTPRINTS_GEOJSON), path,
                                          self.manifest.location_crs)
        return self._footprints

    # ----- one tile ----------------------------------------------------------------------------------------
    def _path(self, pattern: str, ref: TileRef, hdf5: bool = False) -> Path:
        try:
            relative = pattern.format(**ref.keys)
        except KeyError as exc:
            raise SourceError(f"source pattern {pattern!r} needs key {exc}", tile_id=ref.tile_id) from None
        if hdf5:
            folder = self.root / pattern.format(**{**ref.keys, "sen_name": "x"})  # sen_name may be empty
            return self._h5_path(self.root / relative, folder.parent, ref)
        flat, release = aerial_candidates(self.root, relative)
        found = [p for p in (flat, release) if p.exists()]
        if len(found) == 2:
            raise SourceError(f"two candidate GeoTIFFs, {flat} and {release} (MAESTRO's and the release's "
                              "layout): keep one", tile_id=ref.tile_id, path=str(flat))
        return found[0] if found else flat

    def _h5_path(self, named: Path, folder: Path, ref: TileRef) -> Path:
        """The tile's HDF5: the one its split table names (else ``<IMG_ID>.h5``: public copies drop the year the
        CSVs name, and the dates come from the product names anyway); with the release lists, the only
        ``<IMG_ID>[_<YYYY>].h5`` of the folder."""
        if ref.keys.get("sen_name"):
            bare = folder / f"{ref.tile_id}.h5"
            return bare if not named.exists() and bare.exists() else named
        listed = folder.glob(f"{glob.escape(ref.tile_id)}*.h5")
        found = h5_index(p.name for p in listed).get(ref.tile_id, [])
        if len(found) == 1:
            return folder / found[0]
        raise SourceError(f"expected exactly one time series {folder.name}/{ref.tile_id}_<YYYY>.h5 or "
                          f"{folder.name}/{ref.tile_id}.h5, found {len(found)}: {found}", tile_id=ref.tile_id,
                          path=str(folder))

    def _each(self, ref: TileRef, fn: Callable) -> dict:
        """Call ``fn(name, plan, h5 file or None, path)`` per modality, opening each HDF5 once."""
        files: dict[Path, h5py.File] = {}
        out = {}
        try:
            for name, plan in self._plans.items():
                path = self._path(plan.pattern, ref, hdf5=plan.dataset is not None)
                if plan.dataset is None:
                    out[name] = fn(name, plan, None, path)
                    continue
                f = files[path] = files.get(path) or open_h5(path, ref)
                try:
                    out[name] = fn(name, plan, f, path)
                except READ_ERRORS as exc:
                    raise SourceError(f"{name}: cannot read HDF5 (truncated or corrupt?): {exc}",
                                      tile_id=ref.tile_id, path=str(path)) from None
        finally:
            for f in files.values():
                f.close()
        return out

    def probe(self, ref: TileRef) -> TileRef:
        raise_defect(ref)

        def count(name: str, plan: Plan, f: h5py.File | None, path: Path) -> int:
            if f is None:
                check_file(path, name, tile_id=ref.tile_id, missing=_missing_tif(path))
                return 1
            steps = dataset(f, plan.dataset, 4, ref, path).shape[0]
            names = dataset(f, plan.products, 1, ref, path).shape[0]
            if steps != names or steps == 0:
                raise SourceError(f"{name}: {plan.dataset} has {steps} steps and {plan.products} {names} "
                                  "names (expected equal and > 0)", tile_id=ref.tile_id, path=str(path))
            return steps

        return replace(ref, keys=dict(ref.keys), counts=self._each(ref, count))

    def _open_tif(self, path: Path, ref: TileRef, what: str, window: Window | None = None) -> tuple:
        """(pixels of ``window`` or None, file grid, centre lon/lat) of a georeferenced GeoTIFF."""

        def check(h: Header) -> str | None:
            if window is not None and (h.height, h.width) != (AERIAL_FILE_PX, AERIAL_FILE_PX):
                return f"{h.count} bands of {h.height}x{h.width} px, expected {AERIAL_FILE_PX}x{AERIAL_FILE_PX} px"
            return "GeoTIFF has no CRS" if h.crs_wkt is None else None

        # raw read of every band: GDAL flags band 4 as alpha, so no mask may ever be applied
        data, header = read_geotiff(path, what, ref.tile_id, missing=_missing_tif(path), check=check, window=window,
                                    pixels=window is not None)
        try:
            lonlat = bounds_centre_lonlat(grid_bounds(header.grid), header.crs_wkt)
        except READ_ERRORS as exc:
            raise SourceError(f"{what}: its CRS cannot be mapped to lon/lat: {exc}", tile_id=ref.tile_id,
                              path=str(path)) from None
        if not all(math.isfinite(v) for v in lonlat):
            raise SourceError(f"{what}: bounds do not map to lon/lat", tile_id=ref.tile_id, path=str(path))
        return data, header.grid, lonlat

    def _read_tif(self, plan: Plan, ref: TileRef, path: Path) -> tuple[Series, Grid, tuple[float, float]]:
        spec, tid = plan.spec, ref.tile_id
        margin = (AERIAL_FILE_PX - spec.tile_size) // 2
        window = Window(margin, margin, spec.tile_size, spec.tile_size)
        data, grid, lonlat = self._open_tif(path, ref, spec.name, window)
        if data.shape[0] != spec.stored_channels:
            raise SourceError(f"{spec.name}: {data.shape[0]} bands of {AERIAL_FILE_PX}x{AERIAL_FILE_PX} px, "
                              f"expected {spec.stored_channels} bands", tile_id=tid, path=str(path))
        data = to_stored_dtype(data, spec.dtype, tile_id=tid, path=path, what=spec.name)[None]
        dates = dates_array([ref.keys["aerial_date"]])
        crop = window_grid(grid, margin, margin, spec.tile_size, spec.tile_size)
        return check_series(spec, Series(data, dates), tile_id=tid, path=path), crop, lonlat

    def _grids(self, ref: TileRef, aerial: Grid, aerial_path: Path, crops: dict[str, Grid]) -> dict[str, Grid]:
        """The aerial crops as read, and each HDF5 modality on the central ``tile_m`` of the aerial GeoTIFF (the
        time series carry no georeference: they cover that square); checked against ``bb_60m.GeoJSON``."""
        left, bottom, right, top = grid_bounds(aerial)
        cx, cy, half = (left + right) / 2, (bottom + top) / 2, self.manifest.tile_m / 2
        centre = (cx - half, cy - half, cx + half, cy + half)
        grids = {n: crops.get(n) or bounds_grid(centre, aerial.crs, p.spec.tile_size, p.spec.tile_size)
                 for n, p in self._plans.items()}
        table = self._footprint_table()
        points = table[0].get(ref.tile_id) if table else None
        if points is None:
            return grids
        geojson = self.root / FOOTPRINTS_GEOJSON
        try:
            footprint = footprint_bounds(points, table[1], aerial.crs)
        except ProjError as exc:
            raise SourceError(f"footprint CRS {table[1]} cannot be reprojected to the aerial's {aerial.crs}: {exc}",
                              tile_id=ref.tile_id, path=str(geojson)) from None
        # the footprint is the HDF5 grids' square: half a pixel of the tile's coarsest grid is the tolerance
        tolerance = 0.5 * max([pixel_size(g) for g in grids.values()], default=pixel_size(aerial))
        reason = footprint_misregistration(bounds_grid(centre, aerial.crs, 1, 1), footprint, tolerance)
        if reason is not None:
            raise SourceError(f"not co-registered with its footprint in {geojson}: {reason}", tile_id=ref.tile_id,
                              path=str(aerial_path))
        return grids

    def read(self, ref: TileRef) -> Tile:
        raise_defect(ref)
        crops: dict[str, Grid] = {}
        located: list[tuple[Path, Grid, tuple[float, float]]] = []

        def one(name: str, plan: Plan, f: h5py.File | None, path: Path) -> Series:
            if f is not None:
                return read_series(f, plan, ref, path)
            series, crops[name], lonlat = self._read_tif(plan, ref, path)
            located.append((path, crops[name], lonlat))
            return series

        series = self._each(ref, one)
        if located:
            aerial_path, aerial, (lon, lat) = located[0]
        else:  # a manifest without the aerial modality: its GeoTIFF still locates the tile
            aerial_path = self._path(self._location_pattern, ref)
            _, aerial, (lon, lat) = self._open_tif(aerial_path, ref, "aerial (location)")
        grids = self._grids(ref, aerial, aerial_path, crops)
        values = ref.keys[FRACTIONS_KEY].split(",") if self._classes else []
        fractions = dict(zip(self._classes, map(float, values), strict=True))
        targets = {t.name: np.asarray([fractions[c] for c in t.classes], dtype=t.dtype)
                   for t in self.manifest.targets.values()}
        ref_date = self.manifest.reference_date_tuple() or parse_date(ref.keys["aerial_date"])
        return Tile(tile_id=ref.tile_id, split=ref.split, fold=ref.fold, lon=float(lon), lat=float(lat),
                    ref_date=np.asarray(ref_date, dtype=np.int16), series=series, targets=targets, grids=grids)
