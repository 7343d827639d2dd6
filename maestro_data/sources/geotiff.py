"""The one GeoTIFF reader of the dataset readers (:func:`read_geotiff`): file checks, header checks before any
pixel is read, the fast band read, and one error message for a file GDAL cannot read.

Opening (:func:`open_with_grid`) avoids GDAL re-deriving the same CRS for every file of a dataset.

Opening a GeoTIFF with rasterio builds its CRS from the GeoKeys through the PROJ database and exports it to WKT,
then rasterio parses that WKT again (~1 ms of the ~1.5 ms an open costs; a FLAIR-HUB tile is 7 files). A dataset
has one or two CRSs, so the GeoKeys of each file are read here from the TIFF header (a few hundred bytes) and the
grid is resolved once per distinct GeoKey set by a normal rasterio open; later files with the same GeoKeys are
opened with GDAL's georeferencing off (``GEOREF_SOURCES=NONE``) and get that CRS and a transform computed from
their tie point and pixel scale. Anything but a plain north-up tie point + scale (a ModelTransformation, several
tie points, a negative y scale, no GeoKeys, a header this parser does not know) takes the normal open, as does a
GeoKey set whose first file's transform computed here differed from GDAL's.

It relies on the readers' GDAL settings (``GDAL_READ_OPTIONS``): sidecar files are not looked for
(``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``), so the file's own tags are its whole georeference; outside those
settings every open is the normal one.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from maestro_data.errors import SourceError
from maestro_data.sources.base import check_file
from maestro_data.sources.grids import grid_of
from maestro_data.tile import Grid

# what rasterio, GDAL and PROJ raise on a truncated or corrupt file
READ_ERRORS = (RasterioError, OSError, CRSError, RuntimeError)

_PIXEL_SCALE, _TIE_POINT, _MODEL_TRANSFORM = 33550, 33922, 34264
_GEO_KEYS, _GEO_DOUBLES, _GEO_ASCII = 34735, 34736, 34737
_WANTED = {_PIXEL_SCALE, _TIE_POINT, _MODEL_TRANSFORM, _GEO_KEYS, _GEO_DOUBLES, _GEO_ASCII}
# TIFF field type -> (struct code, size); only the types these tags use
_TYPES = {2: ("s", 1), 3: ("H", 2), 4: ("I", 4), 12: ("d", 8), 16: ("Q", 8)}
_HEAD_BYTES = 4096  # a GDAL-written header, IFD and GeoTIFF tags fit in the first few kB

# GeoKey tags (raw bytes) -> CRS of the files that carry them, or None when the fast path is off for them
_CRS_OF: dict[bytes, str | None] = {}


def _tags(path: Path) -> dict[int, tuple] | None:
    """Values of the GeoTIFF tags of the first IFD, or None when the header is not one this parser reads."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)

        def at(offset: int, size: int) -> bytes:
            if offset + size <= len(head):
                return head[offset:offset + size]
            f.seek(offset)
            return f.read(size)

        if len(head) < 16 or head[:2] not in (b"II", b"MM"):
            return None
        e = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(e + "H", head[2:4])[0]
        if magic == 42:
            (ifd,), count_fmt, entry_fmt, entry_size, inline = struct.unpack(e + "I", head[4:8]), "H", "HHII", 12, 4
        elif magic == 43:
            (ifd,), count_fmt, entry_fmt, entry_size, inline = struct.unpack(e + "Q", head[8:16]), "Q", "HHQQ", 20, 8
        else:
            return None
        count_size = struct.calcsize(count_fmt)
        (n,) = struct.unpack(e + count_fmt, at(ifd, count_size))
        entries = at(ifd + count_size, n * entry_size)
        if len(entries) != n * entry_size:
            return None
        out = {}
        for i in range(n):
            tag, typ, count, value = struct.unpack(e + entry_fmt, entries[i * entry_size:(i + 1) * entry_size])
            if tag not in _WANTED:
                continue
            if typ not in _TYPES:
                return None
            code, size = _TYPES[typ]
            nbytes = count * size
            raw = entries[i * entry_size + 4 + inline:(i + 1) * entry_size][:nbytes] if nbytes <= inline \
                else at(value, nbytes)
            if len(raw) != nbytes:
                return None
            out[tag] = (raw,) if code == "s" else struct.unpack(f"{e}{count}{code}", raw)
        return out


def _transform(tags: dict[int, tuple]) -> tuple[float, ...] | None:
    """(a, b, c, d, e, f) of a north-up tie point + pixel scale, as GDAL derives it; None for anything else."""
    if _MODEL_TRANSFORM in tags or _PIXEL_SCALE not in tags or len(tags.get(_TIE_POINT, ())) != 6:
        return None
    sx, sy = tags[_PIXEL_SCALE][:2]
    i, j, _, x, y, _ = tags[_TIE_POINT]
    if not (sx > 0 and sy > 0):  # GDAL honours negative y scales in its own ways: leave those to it
        return None
    return (float(sx), 0.0, float(x - i * sx), 0.0, float(-sy), float(y + j * sy))


def _geokeys(tags: dict[int, tuple]) -> bytes | None:
    if _GEO_KEYS not in tags:
        return None
    return repr((tags[_GEO_KEYS], tags.get(_GEO_DOUBLES), tags.get(_GEO_ASCII))).encode()


def open_with_grid(path: Path) -> tuple[DatasetReader, Grid, str | None]:
    """An open rasterio dataset of ``path`` (the caller closes it), its grid (``grids.grid_of``) and the WKT GDAL
    exported for its CRS (None on the fast path, whose CRS is the grid's)."""
    options = rasterio.env.getenv() if rasterio.env.hasenv() else {}
    tags = _tags(path) if options.get("GDAL_DISABLE_READDIR_ON_OPEN") == "EMPTY_DIR" else None
    key = _geokeys(tags) if tags else None
    transform = _transform(tags) if tags else None
    crs = _CRS_OF.get(key) if key is not None and transform is not None else None
    if crs is None:
        src = rasterio.open(path)
        wkt = src.crs.to_wkt() if src.crs else None  # once: the export is most of an open's CRS cost
        grid = grid_of(src, wkt)
        if key is not None and transform is not None and key not in _CRS_OF:
            fast = grid.crs is not None and grid.transform == transform  # our reading agrees with GDAL's
            _CRS_OF[key] = grid.crs if fast else None
        return src, grid, wkt
    with warnings.catch_warnings():  # the georeference is off on purpose: it comes from the tags above
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        src = DatasetReader(path, GEOREF_SOURCES="NONE")
    return src, Grid(crs, transform, int(src.width), int(src.height)), None


@dataclass(frozen=True)
class Header:
    """What a GeoTIFF says about itself before its pixels are read."""

    count: int
    height: int
    width: int
    dtypes: tuple[str, ...]
    grid: Grid
    crs_wkt: str | None  # as GDAL read it (None for a file without a CRS); the grid's CRS is normalised


def read_geotiff(path: Path, what: str, tile_id: str, *, missing: str = "file not found",
                 check: Callable[[Header], str | None] | None = None, band: int | None = None,
                 window: Window | None = None, pixels: bool = True) -> tuple[np.ndarray | None, Header]:
    """(pixels, header) of the GeoTIFF at ``path``: every band (``band``: that one; ``window``: that window; no
    pixels when ``pixels`` is False) in the file's dtype. ``check(header)`` returns what is wrong with the file
    (a band count, a size), raised as ``<what>: <reason>`` naming the tile and the file before any pixel is read."""
    check_file(path, what, tile_id=tile_id, missing=missing)
    try:
        src, grid, wkt = open_with_grid(path)
        with src:
            header = Header(int(src.count), int(src.height), int(src.width), tuple(src.dtypes), grid,
                            wkt or grid.crs)
            reason = check(header) if check is not None else None
            if reason is not None:
                raise SourceError(f"{what}: {reason}", tile_id=tile_id, path=str(path))
            if not pixels:
                return None, header
            if band is not None or window is not None:
                return src.read(band, window=window), header
            return read_all_bands(src, what, tile_id, path), header
    except READ_ERRORS as exc:
        detail = f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)  # rasterio puts GDAL's reason there
        raise SourceError(f"{what}: unreadable GeoTIFF (truncated or corrupt?): {detail}", tile_id=tile_id,
                          path=str(path)) from None


def read_all_bands(src: DatasetReader, what: str, tile_id: str, path: Path) -> np.ndarray:
    """Every band of an open dataset as one (bands, H, W) array in the file dtype.

    rasterio's public ``read()`` first checks each band index against a tuple of all indexes rebuilt per band
    (quadratic: ~10 ms of a 520-band S2 series for 0.1 MB of pixels) and evaluates every band's mask flags. There
    is no window or masking here, so this goes straight to ``_read``, the reader ``read()`` itself ends in; the
    public call remains the fallback should rasterio drop it."""
    dtypes = set(src.dtypes)
    if len(dtypes) != 1:  # GDAL would convert every band to the first one's type: refuse instead of losing data
        raise SourceError(f"{what}: bands of mixed data types {sorted(dtypes)}", tile_id=tile_id, path=str(path))
    direct = getattr(src, "_read", None)
    if direct is not None:
        out = np.empty((src.count, src.height, src.width), dtype=src.dtypes[0])
        try:
            return direct(range(1, src.count + 1), out, None, out.dtype)
        except TypeError:  # a rasterio whose private reader changed signature: take the public path
            pass
    return src.read()
