"""Readers of FLAIR-HUB and of FLAIR#2 as MAESTRO re-derives it from the FLAIR-HUB files.

Layout: ``<DOM>-<YEAR>_<MOD>/<ROI>/<DOM>-<YEAR>_<MOD>_<ROI>_<R>-<C>.tif`` (one GeoTIFF per patch and modality),
patch id ``<DOM>-<YEAR>_<ROI>_<R>-<C>``, dates and splits in the GeoPackages of ``GLOBAL_ALL_MTD/``.

Choices, and why:
- Dates are keyed per patch id, as FLAIR-HUB publishes them; MAESTRO collapses them to the ROI (last row wins),
  which silently assumes every patch of a ROI has the same acquisitions. Here a patch whose band count is not
  T x C for its OWN date list is an error.
- Each date table is read once per process with a plain SELECT (no geometry decoding) and kept as raw strings;
  the JSON is parsed per tile in ``probe``/``read``, so a malformed row fails that tile only. Pickling a source
  drops the tables (each worker process reloads them on first use instead of receiving a copy).
- Location: centre of the reference modality's GeoTIFF bounds (``manifest.ref_input``, else the first modality),
  transformed to lon/lat with pyproj. ``read`` opens that file anyway, so this costs nothing and uses the raster's
  own georeference rather than a second source that could disagree.
- Every GeoTIFF of a patch (modalities, cloud masks, label rasters) must lie on the reference modality's footprint
  (``grids.check_coregistered``): MAESTRO reads them with pixel windows only, so a shifted file would silently
  pair pixels of different ground.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import rasterio
from pyproj.exceptions import ProjError

from maestro_data.dates import dates_array
from maestro_data.errors import ManifestError, SourceError
from maestro_data.geo import bounds_centre_lonlat
from maestro_data.manifest import Manifest
from maestro_data.sources import gpkg
from maestro_data.sources.base import (
    GDAL_READ_OPTIONS,
    Source,
    SourceOptions,
    check_series,
    check_target_classes,
    check_unique,
    defective,
    file_problem,
    raise_defect,
    read_csv_column,
    split_table_problems,
    to_stored_dtype,
)
from maestro_data.sources.geotiff import Header, read_geotiff
from maestro_data.sources.gpkg import DateTable
from maestro_data.sources.grids import check_coregistered, grid_bounds, is_georeferenced
from maestro_data.tile import Grid, Series, Tile, TileRef

log = logging.getLogger(__name__)

MTD_DIR = "GLOBAL_ALL_MTD"
SPLIT_GPKG = "GLOBAL_ALL_MTD_SPLIT.gpkg"
# first token of the MOD folder name -> which GLOBAL_<KEY>_MTD_DATES.gpkg dates it (DEM and labels: aerial date)
DATE_TABLE_OF = {
    "AERIAL": "AERIAL", "DEM": "AERIAL", "ALL": "AERIAL", "SPOT": "SPOT", "AERIAL-RLT": "AERIAL-RLT",
    "SENTINEL2": "SENTINEL2", "SENTINEL1-ASC": "SENTINEL1-ASC", "SENTINEL1-DESC": "SENTINEL1-DESC",
}
SPLIT_VALUES = {"train": "train", "valid": "val", "val": "val", "test": "test"}


def date_gpkg_name(key: str) -> str:
    return f"GLOBAL_{key}_MTD_DATES.gpkg"


def mod_token(pattern: str, what: str) -> str:
    """The MOD part of ``{domain}_<MOD>/{roi}/...`` (e.g. SENTINEL2_TS), validated."""
    head = pattern.split("/")[0]
    if not head.startswith("{domain}_") or head == "{domain}_":
        raise ManifestError(f"{what}: source pattern {pattern!r} does not start with '{{domain}}_<MOD>/'")
    try:
        pattern.format(domain="D", roi="R", pos="P")
    except (KeyError, IndexError, ValueError) as exc:
        raise ManifestError(f"{what}: source pattern {pattern!r} uses placeholders other than "
                          f"{{domain}}, {{roi}}, {{pos}} ({exc})") from None
    return head[len("{domain}_"):]


def date_table_key(pattern: str, what: str) -> str:
    mod = mod_token(pattern, what)
    key = DATE_TABLE_OF.get(mod.split("_")[0])
    if key is None:
        raise ManifestError(f"{what}: no FLAIR-HUB date table is known for folder type {mod!r} "
                          f"(known: {', '.join(sorted(DATE_TABLE_OF))})")
    return key


def split_patch_id(patch_id: str, origin: str) -> dict[str, str]:
    """``D006-2020_FF-S1-14_5-5`` -> {domain: D006-2020, roi: FF-S1-14, pos: 5-5}."""
    parts = patch_id.split("_")
    if len(parts) != 3 or not all(parts) or "-" not in parts[0] or "-" not in parts[2]:
        raise SourceError("malformed patch id, expected <DOM>-<YEAR>_<ROI>_<R>-<C>", tile_id=patch_id, path=origin)
    return {"domain": parts[0], "roi": parts[1], "pos": parts[2]}


class FlairHubSource(Source):
    """FLAIR-HUB: every patch with a value in column ``split_<k>`` of ``GLOBAL_ALL_MTD_SPLIT.gpkg``.

    ``k`` is ``SourceOptions.split_set``, else the manifest's ``splits.options.split_set`` (else 1). Patches whose
    value is NULL/empty are not part of that split set: they are skipped and counted in ``self.unsplit``.
    """

    dataset = "flair-hub"

    def __init__(self, manifest: Manifest, root: str | Path, options: SourceOptions | None = None):
        super().__init__(manifest, root, options)
        self._date_keys = {n: date_table_key(s.source, f"modality {n}") for n, s in manifest.modalities.items()}
        for name, spec in manifest.modalities.items():
            if spec.cloud_mask is not None:
                mod_token(spec.cloud_mask.source, f"modality {name} cloud_mask")
        for name, target in manifest.targets.items():
            mod_token(target.source, f"target {name}")
            if target.type != "segmentation":
                raise ManifestError(f"target {name}: the FLAIR reader reads segmentation rasters, not {target.type!r}")
        self._loc_modality = manifest.ref_input or next(iter(manifest.modalities))
        self._tables: dict[str, DateTable] | None = None
        self.unsplit = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tables"] = None
        return state

    # -- layout and listing -------------------------------------------------------------------------------------

    @property
    def mtd_dir(self) -> Path:
        return self.root / MTD_DIR

    def _patterns(self) -> list[tuple[str, str]]:
        out = [(f"modality {n}", s.source) for n, s in self.manifest.modalities.items()]
        out += [(f"modality {n} cloud_mask", s.cloud_mask.source) for n, s in self.manifest.modalities.items()
                if s.cloud_mask is not None]
        return out + [(f"target {n}", t.source) for n, t in self.manifest.targets.items()]

    def _split_paths(self) -> list[Path]:
        return [self.mtd_dir / SPLIT_GPKG]

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise SourceError(f"not a directory (expected the {self.dataset} root)", path=str(self.root))
        needed = sorted({date_gpkg_name(k) for k in self._date_keys.values()})
        if not self.mtd_dir.is_dir():
            raise SourceError(f"not a FLAIR-HUB folder: expected {MTD_DIR}/ holding {', '.join(needed)} and "
                              f"{SPLIT_GPKG}, beside <DOM>-<YEAR>_<MOD>/ folders", path=str(self.root))
        missing = [f"{n} ({problem})" for n in needed if (problem := file_problem(self.mtd_dir / n))]
        if missing:
            raise SourceError(f"date table(s) {', '.join(missing)}", path=str(self.mtd_dir))
        if not any(p.exists() for p in self._split_paths()):
            raise SourceError(f"missing split table: expected {' or '.join(p.name for p in self._split_paths())}",
                              path=str(self.root))
        folders = [p.name for p in self.root.iterdir() if p.is_dir()]
        for what, pattern in self._patterns():
            mod = mod_token(pattern, what)
            if not any(f.endswith(f"_{mod}") for f in folders):
                raise SourceError(f"{what}: no <DOM>-<YEAR>_{mod}/ folder (the manifest needs it)", path=str(self.root))

    def tables(self) -> dict[str, DateTable]:
        """The date tables this manifest needs, read once per process."""
        if self._tables is None:
            keys = sorted(set(self._date_keys.values()))
            self._tables = {k: DateTable.load(self.mtd_dir / date_gpkg_name(k)) for k in keys}
        return self._tables

    def split_set(self) -> int:
        if self.options.split_set is not None:
            return self.options.split_set
        return int(self.manifest.splits.options.get("split_set", 1))

    def _split_gpkg_rows(self, column: str) -> list[tuple[str, str | None, str, str | None]]:
        path = self.mtd_dir / SPLIT_GPKG
        available = gpkg.column_names(path, ["patch_id"])
        if column.lower() not in {c.lower() for c in available}:
            splits = [c for c in available if c.lower().startswith("split")]
            raise SourceError(f"no split column {column!r} (split columns: {', '.join(splits) or 'none'})",
                              path=str(path))
        out = []
        for pid, value in gpkg.read_columns(path, ["patch_id", column]):
            text = "" if value is None else str(value).strip().lower()
            bad = f"{column} = {value!r}, expected one of train/valid/test or empty" if text and text not in \
                SPLIT_VALUES else None
            out.append((str(pid), SPLIT_VALUES.get(text) if text else None, str(path), bad))
        return out

    def _split_rows(self) -> list[tuple[str, str | None, str, str | None]]:
        """(patch id, manifest split name or None, origin file, what is wrong with the row or None) per patch."""
        return self._split_gpkg_rows(f"split_{self.split_set()}")

    def list_tiles(self) -> list[TileRef]:
        self.tables()
        names = self.manifest.splits.names
        order = {n: i for i, n in enumerate(names)}
        refs, skipped = [], 0
        rows = self._split_rows()
        for pid, split, origin, bad in rows:
            if split is None and bad is None:
                skipped += 1
                continue
            if bad is None and split not in order:
                bad = f"split {split!r} is not among the manifest's {list(order)}"
            try:
                if bad is not None:
                    raise SourceError(bad, tile_id=pid, path=origin)
                refs.append(TileRef(pid, split, 0, keys=split_patch_id(pid, origin)))
            except SourceError as exc:  # this patch's row only: its tile fails in probe, the others build
                refs.append(defective(pid, split if split in order else names[0], exc))
        self.unsplit = skipped
        if skipped:
            log.info("%s: %d patches have no split value and are not part of this split set", self.dataset, skipped)
        refs = check_unique(refs, ", ".join(sorted({row[2] for row in rows})) or str(self.root))
        return sorted(refs, key=lambda r: (order[r.split], r.tile_id))

    # -- per tile -------------------------------------------------------------------------------------------------

    def _dates(self, ref: TileRef, name: str) -> list[str]:
        return self.tables()[self._date_keys[name]].dates(ref.tile_id, f"modality {name}")

    def probe(self, ref: TileRef) -> TileRef:
        raise_defect(ref)
        return dataclasses.replace(ref, counts={n: len(self._dates(ref, n)) for n in self.manifest.modalities})

    def _path(self, pattern: str, ref: TileRef) -> Path:
        keys = ref.keys or split_patch_id(ref.tile_id, str(self.root))
        return self.root / pattern.format(**keys)

    def _read_tif(self, path: Path, ref: TileRef, what: str, count: int, size: int, band: int | None = None,
                  count_note: str = "") -> tuple[np.ndarray, Grid]:
        """All bands (or one) of a GeoTIFF after checking band count and pixel size; returns (array, grid)."""

        def check(h: Header) -> str | None:
            if (band is None and h.count != count) or (band is not None and h.count < band):
                exp = f"{count} bands" if band is None else f"at least {band} band(s)"
                return f"{h.count} bands, expected {exp}{count_note}"
            if (h.height, h.width) != (size, size):
                return f"{h.height}x{h.width} px, expected {size}x{size}"
            return None

        data, header = read_geotiff(path, what, ref.tile_id, check=check, band=band)
        return data, header.grid

    def _series(self, ref: TileRef, pattern: str, dates: list[str], channels: int, dtype: str, size: int,
                what: str) -> tuple[np.ndarray, Grid, Path]:
        path = self._path(pattern, ref)
        t = len(dates)
        note = f" = T x C with T = {t} dates and C = {channels} bands per date"
        raw, grid = self._read_tif(path, ref, what, t * channels, size, count_note=note)
        # band index = t * C + c (time-major), as FLAIR-HUB writes the time series
        data = raw.reshape(t, channels, size, size)
        return to_stored_dtype(data, dtype, tile_id=ref.tile_id, path=path, what=what), grid, path

    def read(self, ref: TileRef) -> Tile:
        raise_defect(ref)
        mods = self.manifest.modalities
        dates = {n: self._dates(ref, n) for n in mods}
        series: dict[str, Series] = {}
        targets: dict[str, np.ndarray] = {}
        grids: dict[str, Grid] = {}
        files: dict[str, tuple[Path, Grid]] = {}  # every GeoTIFF read, for the co-registration check
        with rasterio.Env(**GDAL_READ_OPTIONS):
            for name, spec in mods.items():
                what = f"modality {name}"
                data, grids[name], path = self._series(ref, spec.source, dates[name], spec.stored_channels,
                                                       spec.dtype, spec.tile_size, what)
                files[what] = (path, grids[name])
                mask = None
                if spec.cloud_mask is not None:
                    cm, what = spec.cloud_mask, f"modality {name} cloud mask"
                    mask, grid, mask_path = self._series(ref, cm.source, dates[name], len(cm.bands), cm.dtype,
                                                         spec.tile_size, what)
                    files[what] = (mask_path, grid)
                s = Series(data=data, dates=dates_array(dates[name]), mask=mask)
                series[name] = check_series(spec, s, tile_id=ref.tile_id, path=path)
            for name, t in self.manifest.targets.items():
                path = self._path(t.source, ref)
                values, grids[name] = self._read_tif(path, ref, f"target {name}", 1, t.tile_size, band=1)
                files[f"target {name}"] = (path, grids[name])
                check_target_classes(values, len(t.classes), tile_id=ref.tile_id, path=path, name=name)
                targets[name] = to_stored_dtype(values, t.dtype, tile_id=ref.tile_id, path=path, what=f"target {name}")
        ref_what = f"modality {self._loc_modality}"
        ref_path, ref_grid = files[ref_what]
        for what, (path, grid) in files.items():
            check_coregistered(ref_grid, ref_path, ref_what, grid, path, what, ref.tile_id)
        lon, lat = self._lonlat(ref, ref_grid)
        if self.manifest.reference_date in series:
            ref_date = series[self.manifest.reference_date].dates[0].copy()
        else:
            ref_date = np.asarray(self.manifest.reference_date_tuple(), dtype=np.int16)
        return Tile(ref.tile_id, ref.split, ref.fold, lon, lat, ref_date, series, targets, grids)

    def _lonlat(self, ref: TileRef, grid: Grid) -> tuple[float, float]:
        path = self._path(self.manifest.modalities[self._loc_modality].source, ref)
        if not is_georeferenced(grid):
            raise SourceError(f"modality {self._loc_modality}: GeoTIFF is not georeferenced (CRS {grid.crs}, "
                              f"transform {grid.transform}), cannot locate the tile", tile_id=ref.tile_id,
                              path=str(path))
        bounds = grid_bounds(grid)
        try:
            lon, lat = bounds_centre_lonlat(bounds, grid.crs)
        except ProjError as exc:
            raise SourceError(f"modality {self._loc_modality}: CRS {grid.crs} does not map to lon/lat ({exc})",
                              tile_id=ref.tile_id, path=str(path)) from None
        if not (np.isfinite(lon) and np.isfinite(lat)):
            raise SourceError(f"modality {self._loc_modality}: bounds {tuple(bounds)} do not map to lon/lat",
                              tile_id=ref.tile_id, path=str(path))
        return float(lon), float(lat)


class Flair2Source(FlairHubSource):
    """FLAIR#2 as MAESTRO uses it: the FLAIR-HUB files restricted to the FLAIR#2 patch list.

    The list comes from MAESTRO's ``{train,val,test}_flair2.csv`` (column ``patch_id``, ``,`` or ``;``
    separated) in the root when any of them is present (all three then: a missing one is an error, or under
    ``on_error="skip"`` an empty split recorded in ``layout_notes``);
    otherwise from column ``split_flairchallenge`` of ``GLOBAL_ALL_MTD_SPLIT.gpkg``, whose NULL rows are the
    FLAIR-HUB patches outside FLAIR#2. The CSVs win because they are exactly what MAESTRO trained on.
    """

    dataset = "flair2"
    CHALLENGE_COLUMN = "split_flairchallenge"

    def csv_paths(self) -> dict[str, Path]:
        return {name: self.root / f"{name}_flair2.csv" for name in self.manifest.splits.names}

    def _split_paths(self) -> list[Path]:
        return [*self.csv_paths().values(), self.mtd_dir / SPLIT_GPKG]

    def _split_rows(self) -> list[tuple[str, str | None, str, str | None]]:
        paths = self.csv_paths()
        if not any(p.exists() for p in paths.values()):
            return self._split_gpkg_rows(self.CHALLENGE_COLUMN)
        problems = split_table_problems(paths)
        self.report_split_tables(problems)
        rows = []
        for split, path in paths.items():
            if split not in {s for s, _, _ in problems}:
                rows += [(pid, split, str(path), None) for pid in read_csv_column(path, "patch_id")]
        return rows
