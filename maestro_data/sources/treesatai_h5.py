"""TreeSatAI-TS time-series HDF5 access (the reader's I/O edge for ``sentinel-ts/*.h5``).

A modality's source ``<file pattern>#<sen-1-asc|sen-1-des|sen-2>-data`` names the raster dataset; its dates come
from the sibling ``*-products`` names (sensing time ``YYYYMMDDTHHMMSS`` at token 2 for S2 L2A, 4 for S1 GRD) and its
cloud mask from ``cloud_mask.source``. Every failure is a SourceError naming the tile and the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from rasterio.errors import RasterioError

from maestro_data.dates import dates_array
from maestro_data.errors import ManifestError, SourceError
from maestro_data.manifest import ModalitySpec
from maestro_data.sources.base import check_file, check_series, to_stored_dtype
from maestro_data.tile import Series, TileRef

# HDF5 dataset prefix -> index of the sensing time in the product name split on "_" (S2 L2A / S1 GRD names)
DATE_TOKEN = {"sen-2": 2, "sen-1": 4}
_STAMP = re.compile(r"\d{8}T\d{6}")
READ_ERRORS = (RasterioError, OSError, RuntimeError)  # what rasterio/h5py/pyproj raise on truncated or corrupt files


@dataclass(frozen=True)
class Plan:
    """How one modality is read: a GeoTIFF (``dataset`` None) or an HDF5 dataset with its product names."""

    spec: ModalitySpec
    pattern: str
    dataset: str | None = None
    products: str = ""
    token: int = 0
    mask: str | None = None


def plan_of(spec: ModalitySpec, origin: str) -> Plan:
    """The read plan of a manifest modality; ManifestError for a source this layout cannot follow."""
    pattern, _, dataset = spec.source.partition("#")
    if not dataset:
        return Plan(spec, pattern)
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
    return Plan(spec, pattern, dataset, f"{stem}-products", token, mask)


def open_h5(path: Path, ref: TileRef) -> h5py.File:
    """The open HDF5 file (the caller closes it)."""
    check_file(path, "time series", tile_id=ref.tile_id, missing="missing Sentinel time-series HDF5")
    try:
        return h5py.File(path, "r")
    except READ_ERRORS as exc:
        raise SourceError(f"cannot open HDF5 (truncated or corrupt?): {exc}", tile_id=ref.tile_id,
                          path=str(path)) from None


def dataset(f: h5py.File, name: str, ndim: int, ref: TileRef, path: Path) -> h5py.Dataset:
    """Dataset ``name`` of ``ndim`` dimensions (numeric when 4-D), else a SourceError listing what the file has."""
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.ndim != ndim:
        got = "absent" if ds is None else f"shape {getattr(ds, 'shape', 'group')}"
        raise SourceError(f"expected a {ndim}-D dataset {name!r} ({got}; file has {sorted(f)})",
                          tile_id=ref.tile_id, path=str(path))
    if ndim == 4 and ds.dtype.kind not in "biuf":
        raise SourceError(f"dataset {name!r} of dtype {ds.dtype}, expected numbers", tile_id=ref.tile_id,
                          path=str(path))
    return ds


def product_dates(f: h5py.File, plan: Plan, ref: TileRef, path: Path) -> np.ndarray:
    """(T, 3) dates from the sensing times in the product names."""
    ds = dataset(f, plan.products, 1, ref, path)
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


def read_series(f: h5py.File, plan: Plan, ref: TileRef, path: Path) -> Series:
    """One modality's data, dates and cloud mask, in the manifest dtypes (exact casts only)."""
    spec, tid = plan.spec, ref.tile_id
    data = dataset(f, plan.dataset, 4, ref, path)[()]
    dates = product_dates(f, plan, ref, path)
    if len(dates) != len(data):
        raise SourceError(f"{spec.name}: {len(data)} steps in {plan.dataset} but {len(dates)} names in "
                          f"{plan.products}", tile_id=tid, path=str(path))
    data = to_stored_dtype(data, spec.dtype, tile_id=tid, path=path, what=f"{spec.name} ({plan.dataset})")
    mask = None
    if plan.mask is not None:
        cm = spec.cloud_mask
        # snow, cloud are the first channels; some real files carry 8 more, all-zero channels.
        raw = dataset(f, plan.mask, 4, ref, path)[:, : len(cm.bands)]
        if np.dtype(cm.dtype).kind in "ui":
            # Real masks hold resampling residues (1e-22..1e-8): for a manifest that stores integers, ceil
            # keeps "value > integer threshold" exactly as the official reader decides it.
            raw = np.ceil(raw)
        mask = to_stored_dtype(raw, cm.dtype, tile_id=tid, path=path, what=f"{spec.name} mask {plan.mask}")
    return check_series(spec, Series(data, dates, mask), tile_id=tid, path=path)
