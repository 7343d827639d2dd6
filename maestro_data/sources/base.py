"""The contract every raw-layout reader fulfils, and the checks they share.

A build calls, in order: ``check_layout()`` (is this folder the named dataset?), ``list_tiles()`` (ids, splits,
folds from the split tables: cheap, no raster opened), ``probe(ref)`` per tile (time steps per modality, from
date tables or file headers) and ``read(ref)`` per tile (all rasters). ``probe`` and ``read`` raise
:class:`SourceError` naming the tile and file, so a build with ``--on-error skip`` can drop just that tile; a bad
row of a split or label table is such a per-tile defect too (``defective``), raised by that tile's probe. What is
wrong with the layout itself (a promised split file missing, ``report_split_tables``) is an error under
``--on-error fail`` and a ``layout_notes`` entry under skip.
"""

from __future__ import annotations

import csv
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maestro_data.errors import MaestroError, SourceError
from maestro_data.manifest import Manifest, ModalitySpec
from maestro_data.tile import Series, Tile, TileRef

# GDAL settings for reading many small GeoTIFFs (a build sets them once per block, see build._convert_block):
# - don't list a file's folder to look for sidecars (FLAIR-HUB folders hold thousands of files);
# - take the CRS from the GeoKeys as written instead of also building the EPSG definition from the PROJ database
#   and comparing the two (~0.2 ms of every open; rasterio parses the CRS of every file it opens);
# - read uncompressed files through a memory map instead of GDAL's block cache, which handles every band of
#   every strip separately (5200 blocks for a 520-band 10x10 S2 series: 6 -> 1.7 ms). GDAL checks the strips
#   against the file size first, so a truncated file still fails with an error; compressed files are unaffected.
GDAL_READ_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GTIFF_SRS_SOURCE": "GEOKEYS",
                     "GTIFF_VIRTUAL_MEM_IO": "YES"}


@dataclass(frozen=True)
class SourceOptions:
    """Reader options the CLI exposes: ``--split-set`` (FLAIR-HUB), ``--fold`` (PASTIS-HD; None: the official
    default, MAESTRO's train/val/test CSVs when present), ``--on-error`` (the build's: whether a split table the
    layout promises may be missing, leaving its split empty; per-tile defects are the build's to skip)."""

    split_set: int | None = None
    fold: int | None = None
    on_error: str = "fail"

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")


class Source(ABC):
    dataset: str = ""

    def __init__(self, manifest: Manifest, root: str | Path, options: SourceOptions | None = None):
        self.manifest = manifest
        self.root = Path(root)
        self.options = options or SourceOptions()
        # which files decided the splits (maestro_data.split_origin), set by list_tiles where the reader has a choice
        self.split_origin: dict[str, Any] | None = None
        # what list_tiles let pass under on_error="skip" for the build report: one JSON-able dict per finding,
        # {"kind": "missing_split", "split", "file", "reason"} (see report_split_tables)
        self.layout_notes: list[dict[str, str]] = []

    @abstractmethod
    def check_layout(self) -> None:
        """Raise SourceError if ``root`` does not look like this dataset (names what was expected)."""

    @abstractmethod
    def list_tiles(self) -> list[TileRef]:
        """Every tile of every split, in a deterministic order; duplicate ids raise SourceError."""

    @abstractmethod
    def probe(self, ref: TileRef) -> TileRef:
        """Return ``ref`` with ``counts`` = time steps per modality (cheap: tables or headers)."""

    @abstractmethod
    def read(self, ref: TileRef) -> Tile:
        """Read every modality, mask, date and target of one tile."""

    def report_split_tables(self, problems: list[tuple[str, Path, str]]) -> None:
        """Split tables the layout promises but that are absent or not files, as (split, path, problem).

        Under ``on_error="fail"`` one SourceError names every such file (a deleted val.csv must not silently empty
        the val split); under "skip" each split stays empty, with a warning and a ``layout_notes`` entry."""
        if not problems:
            return
        if self.options.on_error == "fail":
            listed = "; ".join(f"{path}: split file for {split!r} {problem}" for split, path, problem in problems)
            empty = " and ".join(repr(split) for split, _, _ in problems)
            them, splits = ("them", "splits") if len(problems) > 1 else ("it", "split")
            raise SourceError(f"{listed} (the layout gives every split its own file): restore {them}, or pass "
                              f"--on-error skip to build with the {empty} {splits} empty")
        for split, path, problem in problems:
            note = {"kind": "missing_split", "split": split, "file": str(path),
                    "reason": f"{problem}; the {split!r} split is empty"}
            if note not in self.layout_notes:  # list_tiles may run more than once
                self.layout_notes.append(note)
            warnings.warn(f"{path}: split file for {split!r} {problem}; the {split!r} split is empty", stacklevel=3)


def read_csv_column(path: Path, column: str, error: type[MaestroError] = SourceError) -> list[str]:
    """One column of a MAESTRO-style split CSV (comma or semicolon separated, BOM tolerated, blank lines skipped).

    ``error`` is the stage's exception type (a reader's SourceError, the subset import's StoreError)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: split file not found (expected a CSV with column {column!r})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable split CSV ({exc})") from None
    lines = text.splitlines()
    if not lines:
        raise error(f"{path}: empty split CSV, expected a header with column {column!r}")
    reader = csv.reader(lines, delimiter=";" if lines[0].count(";") > lines[0].count(",") else ",")
    header = [h.strip() for h in next(reader)]
    if column not in header:
        raise error(f"{path}: no column {column!r} (columns: {', '.join(header)})")
    col = header.index(column)
    values = []
    for lineno, row in enumerate(reader, start=2):
        if not row:  # a blank line; an explicit empty value ("") is an error below
            continue
        if col >= len(row) or not row[col].strip():
            raise error(f"{path}: line {lineno}: empty {column!r}")
        values.append(row[col].strip())
    return values


def file_problem(path: Path) -> str | None:
    """None when ``path`` is a file; else what is wrong, in the words every reader uses."""
    if path.is_file():
        return None
    return "is a directory, expected a file" if path.is_dir() else "not found"


def check_file(path: Path, what: str, *, tile_id: str | None = None, missing: str = "not found") -> None:
    """SourceError unless ``path`` is a file: ``missing`` when absent, "is a directory, expected a file" when a
    folder stands where the layout puts a file (a user must not hunt for a file that is there)."""
    problem = file_problem(path)
    if problem is not None:
        raise SourceError(f"{what}: {missing if problem == 'not found' else problem}", tile_id=tile_id,
                          path=str(path))


def split_table_problems(tables: dict[str, Path]) -> list[tuple[str, Path, str]]:
    """(split, path, problem) for every promised split table that is not a readable file."""
    return [(split, path, problem) for split, path in tables.items() if (problem := file_problem(path))]


# A tile whose row in a split or label table is bad is still listed, carrying its defect in these reader-private
# keys: probe/read raise it as that tile's SourceError, so --on-error skip drops the tile, not the whole build.
DEFECT_KEY, DEFECT_PATH_KEY = "defect", "defect_path"


def defective(tile_id: str, split: str, error: SourceError, fold: int = 0) -> TileRef:
    return TileRef(tile_id, split, fold, keys={DEFECT_KEY: error.reason, DEFECT_PATH_KEY: error.path or ""})


def raise_defect(ref: TileRef) -> None:
    """Raise the listing defect of ``ref``, if any (every reader's probe and read start here)."""
    if DEFECT_KEY in ref.keys:
        raise SourceError(ref.keys[DEFECT_KEY], tile_id=ref.tile_id, path=ref.keys.get(DEFECT_PATH_KEY) or None)


def check_unique(refs: list[TileRef], origin: str) -> list[TileRef]:
    """``refs`` with each repeated tile id kept once, as a defect: which of its rows is right cannot be known, and
    a tile in two splits would leak one into the other."""
    first: dict[str, int] = {}
    out: list[TileRef] = []
    for ref in refs:
        if ref.tile_id not in first:
            first[ref.tile_id] = len(out)
            out.append(ref)
            continue
        i = first[ref.tile_id]
        if DEFECT_KEY not in out[i].keys or "duplicate tile id" not in out[i].keys[DEFECT_KEY]:
            error = SourceError(f"duplicate tile id (listed in splits {out[i].split!r} and {ref.split!r})",
                                path=origin)
            out[i] = defective(ref.tile_id, out[i].split, error, out[i].fold)
    return out


def to_stored_dtype(array: np.ndarray, dtype: str, *, tile_id: str, path: str | Path, what: str) -> np.ndarray:
    """Cast to the manifest's stored dtype only when the cast is exact (lossless), else raise SourceError."""
    target = np.dtype(dtype)
    if array.dtype == target:
        return array
    if np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        finite = np.isfinite(array) if np.issubdtype(array.dtype, np.floating) else np.ones(array.shape, bool)
        if not finite.all():
            raise SourceError(f"{what} has NaN/inf but the manifest stores {dtype}", tile_id=tile_id, path=str(path))
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise SourceError(f"{what} values [{array.min()}, {array.max()}] do not fit {dtype}", tile_id=tile_id,
                              path=str(path))
        cast = array.astype(target)
        if not np.array_equal(cast, array):
            raise SourceError(f"{what} has non-integer values but the manifest stores {dtype}", tile_id=tile_id,
                              path=str(path))
        return cast
    cast = array.astype(target)
    if not np.array_equal(cast, array, equal_nan=True):
        raise SourceError(f"{what} of dtype {array.dtype} cannot be stored losslessly as {dtype}", tile_id=tile_id,
                          path=str(path))
    return cast


def check_series(spec: ModalitySpec, series: Series, *, tile_id: str, path: str | Path) -> Series:
    """Validate shapes against the manifest: (T, C, H, W) with the stored band count and the tile size."""
    data = series.data
    expected = (spec.stored_channels, spec.tile_size, spec.tile_size)
    if data.ndim != 4 or tuple(data.shape[1:]) != expected:
        raise SourceError(f"{spec.name}: array of shape {tuple(data.shape)}, expected (T, {expected[0]}, "
                          f"{expected[1]}, {expected[2]})", tile_id=tile_id, path=str(path))
    if data.shape[0] == 0:
        raise SourceError(f"{spec.name}: empty time series", tile_id=tile_id, path=str(path))
    if series.dates.shape != (data.shape[0], 3):
        raise SourceError(f"{spec.name}: {series.dates.shape[0]} dates for {data.shape[0]} time steps",
                          tile_id=tile_id, path=str(path))
    if spec.cloud_mask is not None:
        mask = series.mask
        mexp = (data.shape[0], len(spec.cloud_mask.bands), spec.tile_size, spec.tile_size)
        if mask is None or tuple(mask.shape) != mexp:
            got = None if mask is None else tuple(mask.shape)
            raise SourceError(f"{spec.name}: cloud mask of shape {got}, expected {mexp}", tile_id=tile_id,
                              path=str(path))
    return series


def check_target_classes(values: np.ndarray, num_stored_classes: int, *, tile_id: str, path: str | Path,
                         name: str, allowed_extra: tuple[int, ...] = ()) -> None:
    """Raise if a label raster holds a value outside the manifest's classes."""
    if values.size and values.min() >= 0 and values.max() < num_stored_classes:
        return  # the usual case, without sorting the raster (np.unique was ~1.5 ms of a 512² label)
    present = np.unique(values)
    bad = [int(v) for v in present if not (0 <= v < num_stored_classes or int(v) in allowed_extra)]
    if bad:
        raise SourceError(f"{name}: label values {bad} are outside the manifest's {num_stored_classes} classes",
                          tile_id=tile_id, path=str(path))
