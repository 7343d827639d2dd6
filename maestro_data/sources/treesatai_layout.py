"""Where a TreeSatAI-TS folder keeps what: split tables, aerial GeoTIFFs, time-series HDF5, release tables.

Two published layouts are read (``reference/datasets.md`` §2.1, §2.6):
- MAESTRO's: ``{train,val,test}.csv`` in the root (columns ``aerial_name, sen_name, aerial_date`` + 15 genus
  fractions), ``aerial/<IMG_ID>.tif``, ``sentinel-ts/<IMG_ID>_<YYYY>.h5``;
- the original release (Zenodo, what torchgeo reads): ``{split}_filenames.lst`` in ``split/`` or the root, the
  labels JSON, ``geojson/bb_60m.GeoJSON`` (IMG_ID, YEAR, 60 m footprint polygon), aerial tiles in ``aerial/60m/``.
Public copies also name a tile's HDF5 ``<IMG_ID>.h5`` without the year (the year is in its product names anyway).
Pure parsing and directory listings here; the reader opens the rasters.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maestro_data.errors import SourceError
from maestro_data.geo import geojson_crs, polygon_points
from maestro_data.sources.base import file_problem

KEY_COLUMNS = ("aerial_name", "sen_name", "aerial_date")
LABELS_JSON = Path("labels") / "TreeSatBA_v9_60m_multi_labels.json"
FOOTPRINTS_GEOJSON = Path("geojson") / "bb_60m.GeoJSON"
RELEASE_AERIAL = "60m"  # the release keeps the 0.2 m tiles in aerial/60m/
SPLIT_FOLDER = "split"
_YEAR_SUFFIX = re.compile(r"(.+)_(\d{4})")


@dataclass(frozen=True)
class Row:
    """One tile as a split table gives it, before validation (``problem``: why the row itself is unusable)."""

    split: str
    aerial_name: str
    sen_name: str
    aerial_date: str
    fractions: tuple[float, ...]
    where: str  # file:line, for messages
    problem: str | None = None


# ----- split tables -------------------------------------------------------------------------------------------
def split_tables(root: Path, names: Sequence[str]) -> tuple[str, dict[str, Path]]:
    """('csv' | 'release', split -> the table the layout promises for it, present or not).

    MAESTRO's CSVs win when any exists. A release list may sit in ``split/`` or the root: the one that exists,
    else where the other lists are. Two different lists for one split are ambiguous: SourceError naming both."""
    csvs = {s: root / f"{s}.csv" for s in names}
    if any(p.exists() for p in csvs.values()):
        return "csv", csvs
    found: dict[str, Path] = {}
    for s in names:
        candidates = [p for p in (root / f"{s}_filenames.lst", root / SPLIT_FOLDER / f"{s}_filenames.lst")
                      if p.exists()]
        if len(candidates) == 2 and not _same_file_content(*candidates):
            raise SourceError(f"two different split lists for {s!r}: {candidates[0]} and {candidates[1]}; keep one",
                              path=str(root))
        if candidates:
            found[s] = candidates[-1]
    if not found:
        raise SourceError(f"not TreeSatAI-TS: no split table (expected {', '.join(p.name for p in csvs.values())} "
                          f"in the root, or {names[0]}_filenames.lst... in the root or in {SPLIT_FOLDER}/)",
                          path=str(root))
    folder = next(iter(found.values())).parent
    return "release", {s: found.get(s, folder / f"{s}_filenames.lst") for s in names}


def _same_file_content(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def read_csv_rows(path: Path, split: str, classes: Sequence[str]) -> list[Row]:
    """The rows of a MAESTRO split CSV; a header that does not match the manifest is an error of the whole file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"unreadable split CSV ({exc})", path=str(path)) from None
    header = [h.strip() for h in rows[0]] if rows else []
    genera = [h for h in header if h not in KEY_COLUMNS]
    missing = [c for c in (*KEY_COLUMNS, *classes) if c not in header]
    unknown = [g for g in genera if g not in classes] if classes else []
    if missing or unknown:
        raise SourceError(f"columns do not match the manifest: missing {missing}, unknown genus columns "
                          f"{unknown} (expected {', '.join(KEY_COLUMNS)} + the {len(classes)} "
                          "target classes, in any order)", path=str(path))
    col = {h: i for i, h in enumerate(header)}
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{line}"
        keys = [row[col[c]].strip() if col[c] < len(row) else "" for c in KEY_COLUMNS]
        problem, fractions = None, ()
        if len(row) != len(header):
            problem = f"{len(row)} fields, expected {len(header)}"
        else:
            try:
                fractions = tuple(float(row[col[c]]) for c in classes)
            except ValueError as exc:
                problem = f"genus fraction is not a number ({exc})"
        out.append(Row(split, *keys, fractions, where, problem))
    return out


def read_list(path: Path) -> list[tuple[int, str]]:
    """(line, ``<IMG_ID>.tif``) of a release ``*_filenames.lst``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"unreadable split list ({exc})", path=str(path)) from None
    return [(i, text.strip()) for i, text in enumerate(lines, start=1) if text.strip()]


# ----- release tables -----------------------------------------------------------------------------------------
def load_json(root: Path, rel: Path) -> object:
    path = root / rel
    problem = file_problem(path)
    if problem is not None:
        raise SourceError(f"{problem}: the release layout needs {rel} beside *_filenames.lst", path=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise SourceError(f"not readable JSON: {exc}", path=str(path)) from None


def release_years(data: object, path: Path) -> dict[str, int]:
    """IMG_ID -> YEAR of ``bb_60m.GeoJSON``."""
    try:
        return {str(f["properties"]["IMG_ID"]): int(f["properties"]["YEAR"]) for f in data["features"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"expected a FeatureCollection with properties IMG_ID and YEAR ({exc!r})",
                          path=str(path)) from None


def footprints(data: object, path: Path, fallback_crs: str) -> tuple[dict[str, np.ndarray], str]:
    """(IMG_ID -> polygon positions, CRS) of ``bb_60m.GeoJSON``; a feature without a usable polygon is left out
    (its tile then has no footprint to check). CRS: the ``crs`` member, else lon/lat (RFC 7946) when the
    positions are degrees, else ``fallback_crs`` (the manifest's location CRS)."""
    features = data.get("features") if isinstance(data, dict) else None
    if not isinstance(features, list):
        raise SourceError("expected a GeoJSON FeatureCollection with a 'features' list", path=str(path))
    try:
        crs = geojson_crs(data.get("crs"))
    except ValueError as exc:
        raise SourceError(str(exc), path=str(path)) from None
    out: dict[str, np.ndarray] = {}
    for feat in features:
        props = feat.get("properties") if isinstance(feat, dict) else None
        if not isinstance(props, dict) or "IMG_ID" not in props:
            continue
        try:
            out[str(props["IMG_ID"])] = polygon_points(feat.get("geometry"))
        except ValueError:
            continue
    if crs is None:
        degrees = all(np.abs(p[:, 0]).max() <= 180 and np.abs(p[:, 1]).max() <= 90 for p in out.values())
        crs = "OGC:CRS84" if out and degrees else fallback_crs
    return out, crs


def release_fractions(labels: object, aerial_name: str, classes: Sequence[str]) -> tuple[float, ...]:
    """The genus fractions of one tile in ``classes`` order; ValueError saying what is wrong."""
    if not isinstance(labels, dict) or aerial_name not in labels:
        raise ValueError(f"no labels for {aerial_name!r}")
    values = dict.fromkeys(classes, 0.0)
    try:
        pairs = [(str(g), float(v)) for g, v in labels[aerial_name]]
    except (TypeError, ValueError):
        raise ValueError(f"labels must be [[genus, fraction], ...], got {labels[aerial_name]!r}") from None
    for genus, value in pairs:
        if genus not in values:
            raise ValueError(f"genus {genus!r} is outside the manifest's classes")
        values[genus] = value
    return tuple(values.values())


# ----- per-tile files -----------------------------------------------------------------------------------------
def h5_index(names: Iterable[str]) -> dict[str, list[str]]:
    """IMG_ID -> its candidate HDF5 names, ``<IMG_ID>_<YYYY>.h5`` and ``<IMG_ID>.h5``, from one folder listing
    (a glob per tile is quadratic)."""
    index: dict[str, list[str]] = {}
    for name in sorted(names):
        if not name.endswith(".h5"):
            continue
        stem = name[:-3]
        index.setdefault(stem, []).append(name)
        match = _YEAR_SUFFIX.fullmatch(stem)
        if match:
            index.setdefault(match.group(1), []).append(name)
    return index


def aerial_candidates(root: Path, relative: str) -> tuple[Path, Path]:
    """Where a tile's aerial GeoTIFF may be: MAESTRO's ``aerial/<name>``, the release's ``aerial/60m/<name>``."""
    head, _, rest = relative.partition("/")
    return root / relative, root / head / RELEASE_AERIAL / rest
