"""Reader of PASTIS-HD as published on HF ``IGNF/PASTIS-HD`` (layout: reference/datasets.md §3).

One tile = one 1.28 km patch ``ID_PATCH`` of ``metadata.geojson``. A ``.npy`` modality is a (T, C, H, W) time
series dated by the Feature's ``dates-<X>`` property, where ``DATA_<X>`` is the first folder of the modality's
source pattern (so modalities can be renamed in a manifest copy); a ``.tif`` modality (SPOT) is one image dated at
the manifest's reference date unless a ``dates-<X>`` property exists. The segmentation target is channel 0 of
``TARGET_<ID>.npy``.

Georeference: the .npy arrays carry none, so their grids are the Feature's polygon cut into the array's pixels; a
.tif (SPOT) carries its own and must cover that polygon (``grids.footprint_misregistration``), else the tile fails.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pyproj.exceptions import CRSError, ProjError

from maestro_data.dates import dates_array
from maestro_data.errors import ManifestError, SourceError
from maestro_data.geo import geojson_crs, polygon_centroid, polygon_points, to_lonlat
from maestro_data.manifest import Manifest, ModalitySpec, TargetSpec
from maestro_data.sources.base import (
    Source,
    SourceOptions,
    check_file,
    check_series,
    check_target_classes,
    check_unique,
    defective,
    file_problem,
    raise_defect,
    split_table_problems,
    to_stored_dtype,
)
from maestro_data.sources.grids import (
    bounds_grid,
    footprint_bounds,
    footprint_misregistration,
    normalise_crs,
    pixel_size,
)
from maestro_data.sources.pastis_files import check_target_shape, load_npy, npy_shape, read_tif
from maestro_data.sources.pastis_splits import (
    DEFAULT_FOLD,
    as_int,
    assignment_table,
    fold_assignment,
    read_image_column,
    split_csv_names,
)
from maestro_data.split_origin import csv_origin, folds_origin
from maestro_data.tile import Grid, Series, Tile, TileRef

METADATA = "metadata.geojson"
_FOLDER = re.compile(r"DATA_([A-Za-z0-9]+)")
_YYYYMMDD = re.compile(r"\d{8}")


# ---------------------------------------------------------------- pure helpers


def dates_property(pattern: str) -> str | None:
    """``DATA_S2/S2_{id}.npy`` -> ``dates-S2``: the metadata property holding a modality's dates (None if no
    ``DATA_<X>`` first folder)."""
    match = _FOLDER.fullmatch(pattern.split("/", 1)[0])
    return f"dates-{match.group(1)}" if match else None


def parse_dates_property(value: Any) -> np.ndarray:
    """A ``dates-*`` value, either ``{"0": 20180924, ...}`` or that object as a JSON string, -> (T, 3) int16.

    Keys must be exactly "0".."T-1" (ordered by their integer value); dates int or str ``YYYYMMDD``.
    Raises ValueError saying what is wrong.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"string is not a JSON object: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f'expected an object {{"0": YYYYMMDD, ...}}, got {type(value).__name__}')
    if not all(isinstance(k, str) and k.isdigit() for k in value):
        raise ValueError(f"keys must be '0'..'T-1', got {sorted(value)[:5]}")
    keys = sorted(value, key=int)
    if [int(k) for k in keys] != list(range(len(keys))):
        raise ValueError(f"keys must be '0'..'{len(keys) - 1}' without gaps or duplicates")
    texts = []
    for k in keys:
        v = value[k]
        if isinstance(v, bool) or not isinstance(v, int | str) or not _YYYYMMDD.fullmatch(str(v).strip()):
            raise ValueError(f"date {v!r} at key {k!r}: expected YYYYMMDD")
        texts.append(str(v).strip())
    return dates_array(texts)  # ValueError names an impossible calendar date


@dataclass(frozen=True)
class _Input:
    """A manifest modality or target resolved against the PASTIS-HD layout."""

    name: str
    pattern: str
    kind: str  # "npy" or "tif"
    dates_key: str | None


@dataclass(frozen=True)
class _Patch:
    tile_id: str
    feature: int  # index in metadata.geojson, for messages
    fold: int
    properties: dict
    geometry: Any
    defect: str | None = None  # a bad Fold or a repeated ID_PATCH: this tile fails, the others build


# ---------------------------------------------------------------- reader


class PastisHDSource(Source):
    """PASTIS-HD reader; splits from MAESTRO's split CSVs or the ``Fold`` rule, as ``pastis_splits`` says."""

    dataset = "pastis-hd"

    def __init__(self, manifest: Manifest, root: str | Path, options: SourceOptions | None = None):
        super().__init__(manifest, root, options)
        self._patches: dict[str, _Patch] | None = None
        self._crs = self.manifest.location_crs
        self._items = self._inputs()  # checked once: a manifest this reader cannot follow fails here

    def _inputs(self) -> dict[str, _Input]:
        """Each modality and target with its file kind and dates property; ManifestError for unusable patterns."""
        out = {}
        for name, spec in [*self.manifest.modalities.items(), *self.manifest.targets.items()]:
            target = isinstance(spec, TargetSpec)
            where = f"manifest {'targets' if target else 'modalities'}.{name}.source {spec.source!r}"
            kind = {"npy": "npy", "tif": "tif", "tiff": "tif"}.get(spec.source.rsplit(".", 1)[-1].lower())
            key = dates_property(spec.source)
            if "{id}" not in spec.source:
                raise ManifestError(f"{where} has no {{id}} placeholder")
            if kind is None or (target and (kind != "npy" or spec.type != "segmentation")):
                raise ManifestError(f"{where}: PASTIS-HD provides .npy/.tif modalities and .npy segmentation targets")
            if kind == "npy" and not target and key is None:
                raise ManifestError(f"{where}: a time series must sit in a DATA_<X>/ folder dated by property "
                                    "dates-<X>")
            out[name] = _Input(name, spec.source, kind, key)
        return out

    def _file(self, item: _Input, tile_id: str) -> Path:
        return self.root / item.pattern.replace("{id}", tile_id)

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise SourceError("not a directory (expected the PASTIS-HD root)", path=str(self.root))
        problem = file_problem(self.root / METADATA)
        if problem is not None:
            problem = "is missing" if problem == "not found" else problem
            raise SourceError(f"not a PASTIS-HD folder: {METADATA} {problem}", path=str(self.root))
        for item in self._items.values():
            folder = self.root / item.pattern.split("{id}", 1)[0].rsplit("/", 1)[0]
            if not folder.is_dir():
                raise SourceError(f"not a PASTIS-HD folder: {folder.relative_to(self.root)}/ (for {item.name}) "
                                  "is missing", path=str(self.root))

    def _index(self) -> dict[str, _Patch]:
        """Parse metadata.geojson once (raw ``json``: dates may be objects or JSON strings)."""
        if self._patches is not None:
            return self._patches
        path = self.root / METADATA
        check_file(path, "not a PASTIS-HD folder", missing=f"{METADATA} is missing")
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise SourceError(f"missing: not a PASTIS-HD folder ({METADATA} expected)", path=str(path)) from None
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise SourceError(f"not valid GeoJSON: {exc}", path=str(path)) from None
        features = raw.get("features") if isinstance(raw, dict) else None
        if not isinstance(features, list):
            raise SourceError("expected a GeoJSON FeatureCollection with a 'features' list", path=str(path))
        try:
            crs = geojson_crs(raw.get("crs")) or self.manifest.location_crs
        except ValueError as exc:
            raise SourceError(str(exc), path=str(path)) from None
        patches: dict[str, _Patch] = {}
        for i, feat in enumerate(features):
            props = feat.get("properties") if isinstance(feat, dict) else None
            if not isinstance(props, dict):
                raise SourceError(f"feature {i} has no properties", path=str(path))
            raw_id = props.get("ID_PATCH", feat.get("id"))  # ID_PATCH is the id MAESTRO's split CSVs use
            if as_int(raw_id) is None:
                raise SourceError(f"feature {i}: ID_PATCH {raw_id!r} is not an integer", path=str(path))
            tile_id = str(as_int(raw_id))
            if tile_id in patches:
                defect = f"duplicate ID_PATCH (features {patches[tile_id].feature} and {i})"
                patches[tile_id] = replace(patches[tile_id], defect=defect)
                continue
            fold = as_int(props.get("Fold"))
            defect = None if fold is not None else f"Fold {props.get('Fold')!r} is not an integer"
            patches[tile_id] = _Patch(tile_id, i, fold or 0, props, feat.get("geometry"), defect)
        self._patches, self._crs = patches, crs
        return patches

    def _patch(self, tile_id: str) -> _Patch:
        patch = self._index().get(tile_id)
        if patch is None or patch.defect is not None:
            reason = "no feature with this ID_PATCH" if patch is None else patch.defect
            raise SourceError(reason, tile_id=tile_id, path=str(self.root / METADATA))
        return patch

    def _defect(self, tile_id: str, split: str, reason: str, path: str, fold: int = 0) -> TileRef:
        return defective(tile_id, split, SourceError(reason, tile_id=tile_id, path=path), fold)

    def list_tiles(self) -> list[TileRef]:
        """Every patch with its split, from MAESTRO's split CSVs or the fold rule (``pastis_splits``); the choice
        is left in ``split_origin``."""
        patches = self._index()
        names = self.manifest.splits.names
        fold = self.options.fold
        files = {s: self.root / n for s, n in split_csv_names(names, fold).items()}
        if any(p.exists() for p in files.values()):
            return self._from_csvs(patches, files)
        meta = str(self.root / METADATA)
        try:
            split_of = fold_assignment(self.manifest.splits.options, fold or DEFAULT_FOLD, names)
        except ValueError as exc:
            raise SourceError(f"manifest splits.options / --fold {fold}: {exc}") from None
        refs: list[TileRef] = []
        for split in names:
            refs += [TileRef(t, split, p.fold) for t, p in patches.items()
                     if p.defect is None and split_of.get(p.fold) == split]
        for tile_id, patch in patches.items():  # listed, so that probe fails them one by one
            if patch.defect is not None:
                refs.append(self._defect(tile_id, names[0], patch.defect, meta))
            elif patch.fold not in split_of:
                refs.append(self._defect(tile_id, names[0], f"Fold {patch.fold} is not one of the folds "
                                         f"{sorted(split_of)}", meta, patch.fold))
        self.split_origin = folds_origin(METADATA, assignment_table(split_of, names), fold)
        return check_unique(refs, meta)

    def _from_csvs(self, patches: dict[str, _Patch], files: dict[str, Path]) -> list[TileRef]:
        refs: list[TileRef] = []
        problems = split_table_problems(files)
        self.report_split_tables(problems)
        bad = {s for s, _, _ in problems}
        for split, path in files.items():
            if split in bad:
                continue
            for tile_id in read_image_column(path):
                patch = patches.get(tile_id)
                if patch is None:
                    refs.append(self._defect(tile_id, split, f"listed in the split file but has no feature in "
                                             f"{METADATA}", str(path)))
                elif patch.defect is not None:
                    refs.append(self._defect(tile_id, split, patch.defect, str(self.root / METADATA), patch.fold))
                else:
                    refs.append(TileRef(tile_id, split, patch.fold))
        self.split_origin = csv_origin([p.name for s, p in files.items() if s not in bad],
                                       [p.name for s, p in files.items() if s in bad], self.options.fold)
        return check_unique(refs, ", ".join(str(p) for s, p in files.items() if s not in bad))

    def _dates(self, item: _Input, spec: ModalitySpec, patch: _Patch, steps: int, path: Path) -> np.ndarray:
        """(T, 3) dates of a modality's ``steps`` stored time steps; SourceError when the table disagrees."""
        tid, meta = patch.tile_id, str(self.root / METADATA)
        if item.dates_key not in patch.properties:
            if item.kind == "npy":
                raise SourceError(f"{spec.name}: property {item.dates_key!r} is missing", tile_id=tid, path=meta)
            ref = self.manifest.reference_date_tuple()
            if ref is None or steps != 1:
                raise SourceError(f"{spec.name}: {steps} image(s) but no {item.dates_key!r} property and "
                                  f"reference_date {self.manifest.reference_date!r} gives one fixed date",
                                  tile_id=tid, path=str(path))
            return np.asarray([ref], dtype=np.int16)
        try:
            dates = parse_dates_property(patch.properties[item.dates_key])
        except ValueError as exc:
            raise SourceError(f"{spec.name}: malformed {item.dates_key!r}: {exc}", tile_id=tid, path=meta) from None
        if len(dates) != steps:
            raise SourceError(f"{spec.name}: {steps} time steps in the file but {len(dates)} dates in {METADATA} "
                              f"{item.dates_key!r}", tile_id=tid, path=str(path))
        if steps == 0:
            raise SourceError(f"{spec.name}: empty time series", tile_id=tid, path=str(path))
        return dates

    def probe(self, ref: TileRef) -> TileRef:
        raise_defect(ref)
        patch, items, counts = self._patch(ref.tile_id), self._items, {}
        for name, spec in self.manifest.modalities.items():
            item, path = items[name], self._file(items[name], ref.tile_id)
            if item.kind == "npy":
                shape = npy_shape(path, ref.tile_id)
                expected = (spec.stored_channels, spec.tile_size, spec.tile_size)
                if len(shape) != 4 or shape[1:] != expected:
                    raise SourceError(f"{name}: array of shape {shape}, expected (T, {', '.join(map(str, expected))})",
                                      tile_id=ref.tile_id, path=str(path))
                steps = shape[0]
            else:
                steps = read_tif(path, ref.tile_id, spec, header_only=True)[0]
            counts[name] = len(self._dates(item, spec, patch, steps, path))
        for name, spec in self.manifest.targets.items():
            path = self._file(items[name], ref.tile_id)
            check_target_shape(spec, npy_shape(path, ref.tile_id), ref.tile_id, path)
        return replace(ref, counts=counts)

    def read(self, ref: TileRef) -> Tile:
        raise_defect(ref)
        tid = ref.tile_id
        patch, items, series, tifs = self._patch(tid), self._items, {}, {}
        for name, spec in self.manifest.modalities.items():
            item, path = items[name], self._file(items[name], tid)
            if item.kind == "npy":
                data = load_npy(path, tid)
            else:
                data, tifs[name] = read_tif(path, tid, spec)
            # a wrong rank is reported by check_series, with the expected shape
            dates = self._dates(item, spec, patch, data.shape[0], path) if data.ndim == 4 else np.zeros((0, 3))
            check_series(spec, Series(data, dates), tile_id=tid, path=path)
            series[name] = Series(to_stored_dtype(data, spec.dtype, tile_id=tid, path=path, what=name), dates)
        targets = {}
        for name, spec in self.manifest.targets.items():
            path = self._file(items[name], tid)
            data = load_npy(path, tid)
            check_target_shape(spec, data.shape, tid, path)
            labels = to_stored_dtype(data[0] if data.ndim == 3 else data, spec.dtype, tile_id=tid, path=path,
                                     what=name)
            check_target_classes(labels, len(spec.classes), tile_id=tid, path=path, name=name)
            targets[name] = np.ascontiguousarray(labels)
        if self.manifest.reference_date in series:
            ref_date = series[self.manifest.reference_date].dates[0]
        else:
            ref_date = np.asarray(self.manifest.reference_date_tuple(), dtype=np.int16)
        lon, lat = self._location(patch, tid)
        sizes = {n: s.data.shape[-2:] for n, s in series.items()} | {n: t.shape for n, t in targets.items()}
        return Tile(tile_id=tid, split=ref.split, fold=ref.fold, lon=lon, lat=lat, ref_date=ref_date,
                    series=series, targets=targets, grids=self._grids(patch, sizes, tifs))

    def _grids(self, patch: _Patch, sizes: dict[str, tuple[int, int]], tifs: dict[str, Grid]) -> dict[str, Grid]:
        """Every grid of the tile: the Feature's polygon cut into each .npy array's (H, W) pixels, and each .tif's
        own grid, which must cover that polygon to half a pixel of the coarser of it and the .npy grids."""
        meta, tid = str(self.root / METADATA), patch.tile_id
        try:
            points, crs = polygon_points(patch.geometry), normalise_crs(self._crs)
            grids = {n: tifs.get(n) or bounds_grid(footprint_bounds(points, crs, crs), crs, int(w), int(h))
                     for n, (h, w) in sizes.items()}
            for name, grid in tifs.items():
                footprint = footprint_bounds(points, crs, grid.crs) if grid.crs else (np.nan,) * 4
                # the .npy grids' pixel measured in this .tif's CRS (metadata and SPOT CRS may differ)
                coarse = max([(footprint[2] - footprint[0]) / w for n, (_, w) in sizes.items() if n not in tifs],
                             default=0.0)
                reason = footprint_misregistration(grid, footprint, 0.5 * max(pixel_size(grid), coarse))
                if reason is not None:
                    raise SourceError(f"{name} is not co-registered with the polygon of feature {patch.feature} in "
                                      f"{meta}: {reason}", tile_id=tid, path=str(self._file(self._items[name], tid)))
        except ValueError as exc:
            raise SourceError(f"geometry of feature {patch.feature}: {exc}", tile_id=tid, path=meta) from None
        except ProjError as exc:
            raise SourceError(f"CRS {self._crs!r} is not understood or cannot be reprojected: {exc}", tile_id=tid,
                              path=meta) from None
        return grids

    def _location(self, patch: _Patch, tile_id: str) -> tuple[float, float]:
        meta = str(self.root / METADATA)
        try:
            x, y = polygon_centroid(patch.geometry)
        except ValueError as exc:
            raise SourceError(f"geometry of feature {patch.feature}: {exc}", tile_id=tile_id, path=meta) from None
        try:
            lon, lat = to_lonlat(x, y, self._crs)
        except CRSError as exc:
            raise SourceError(f"CRS {self._crs!r} is not understood: {exc}", tile_id=tile_id, path=meta) from None
        if not (math.isfinite(lon) and math.isfinite(lat)):
            raise SourceError(f"centroid ({x}, {y}) cannot be projected from {self._crs} to lon/lat",
                              tile_id=tile_id, path=meta)
        return float(lon), float(lat)
