"""Minimal GeoPackage access with the standard library: a GeoPackage is an SQLite database (OGC 12-128r18).

Reading needs no GDAL: the FLAIR-HUB metadata tables are plain columns (patch id, JSON date strings, split
names) beside a geometry blob; ``DateTable`` holds one FLAIR-HUB ``GLOBAL_*_MTD_DATES`` table. The synthetic data's
GeoPackages are written by their own code (``synthetic/gpkg_writer.py``), so this reader is tested against files
it did not make.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from maestro_data.dates import dates_array
from maestro_data.errors import SourceError
from maestro_data.sources.base import check_file

_DUPLICATE = object()  # marks a patch id listed more than once in a date table


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open ``path`` read-only (sqlite would silently create a missing file in the default mode)."""
    check_file(path, "GeoPackage", missing="not found")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"not a readable GeoPackage/SQLite file ({exc})", path=str(path)) from None
    return con


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def feature_table(con: sqlite3.Connection, path: Path, required: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The feature table holding every ``required`` column (matched case-insensitively) and its column names.

    Returns (table name, {lower-case name: actual name}). The table is looked up in ``gpkg_contents`` rather than
    guessed from the file name, because GDAL names layers freely.
    """
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM gpkg_contents WHERE data_type = 'features' "
                                            "ORDER BY table_name")]
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"not a GeoPackage: no readable gpkg_contents table ({exc})", path=str(path)) from None
    found: list[tuple[str, dict[str, str]]] = []
    for table in tables:
        try:
            cols = {r[1].lower(): r[1] for r in con.execute(f"PRAGMA table_info({_quote(table)})")}
        except sqlite3.DatabaseError as exc:
            raise SourceError(f"feature table {table!r} is unreadable ({exc})", path=str(path)) from None
        if all(c.lower() in cols for c in required):
            return table, cols
        found.append((table, cols))
    listing = "; ".join(f"{t}: {', '.join(c.values())}" for t, c in found) or "no feature table"
    raise SourceError(f"no feature table with columns {', '.join(required)} ({listing})", path=str(path))


def read_columns(path: Path, columns: Sequence[str]) -> list[tuple]:
    """Every row of the feature table that has ``columns``, as tuples in that column order (one plain SELECT)."""
    con = connect_readonly(path)
    try:
        table, cols = feature_table(con, path, columns)
        select = ", ".join(_quote(cols[c.lower()]) for c in columns)
        try:
            return con.execute(f"SELECT {select} FROM {_quote(table)}").fetchall()
        except sqlite3.DatabaseError as exc:
            raise SourceError(f"cannot read table {table!r} ({exc})", path=str(path)) from None
    finally:
        con.close()


def column_names(path: Path, required: Sequence[str]) -> list[str]:
    """Actual column names of the feature table that has ``required`` (to pick e.g. the split columns)."""
    con = connect_readonly(path)
    try:
        return list(feature_table(con, path, required)[1].values())
    finally:
        con.close()


# -- FLAIR-HUB GLOBAL_*_MTD_DATES tables ----------------------------------------------------------------------


class _Invalid(Exception):
    """What is wrong with a date-table cell (the caller names the tile, the file and the modality)."""


def parse_acquisitions(raw: object, *, series: bool, tile_id: str, path: Path, what: str) -> list[str]:
    """A date-table cell -> YYYYMMDD strings in band order (JSON keys "1", "2", ... sorted as integers)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        return list(_parse_cell(raw, series) if isinstance(raw, str | None) else _parse(raw, series))
    except _Invalid as exc:
        raise SourceError(f"{what}: {exc}", tile_id=tile_id, path=str(path)) from None


@lru_cache(maxsize=1 << 12)  # probe and read parse the same cell, and the patches of a ROI share their dates
def _parse_cell(raw: str | None, series: bool) -> tuple[str, ...]:
    return _parse(raw, series)


def _parse(raw: object, series: bool) -> tuple[str, ...]:
    if raw is None:
        values = []
    elif not series:
        values = [str(raw).strip()]
    else:
        try:
            table = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise _Invalid(f"acquisition_dates is not valid JSON ({exc})") from None
        if not isinstance(table, dict):
            raise _Invalid(f"acquisition_dates must be a JSON object {{\"1\": \"YYYYMMDD\", ...}}, "
                           f"got {str(raw)[:60]!r}")
        try:
            keyed = sorted(((int(k), v) for k, v in table.items()), key=lambda kv: kv[0])
        except (TypeError, ValueError):
            raise _Invalid(f"acquisition_dates keys must be integers, got {list(table)[:5]}") from None
        if len({k for k, _ in keyed}) != len(keyed):
            raise _Invalid("acquisition_dates has repeated keys")
        values = [str(v).strip() for _, v in keyed]
    if not values:
        raise _Invalid("empty time series (zero acquisition dates)")
    bad = [v for v in values if len(v) != 8 or not v.isdigit()]
    if bad:
        raise _Invalid(f"dates {bad[:3]} are not YYYYMMDD")
    try:
        dates_array(values)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return tuple(values)


@dataclasses.dataclass
class DateTable:
    """One ``GLOBAL_<KEY>_MTD_DATES.gpkg``: patch id -> raw cell (JSON string for series, YYYYMMDD otherwise)."""

    path: Path
    series: bool
    rows: dict[str, object]

    @classmethod
    def load(cls, path: Path) -> DateTable:
        names = {c.lower() for c in column_names(path, ["patch_id"])}
        series = "acquisition_dates" in names
        if not series and "date" not in names:
            raise SourceError("date table has neither an 'acquisition_dates' nor a 'date' column", path=str(path))
        rows: dict[str, object] = {}
        for pid, value in read_columns(path, ["patch_id", "acquisition_dates" if series else "date"]):
            pid = str(pid)
            rows[pid] = _DUPLICATE if pid in rows else value
        return cls(path, series, rows)

    def dates(self, tile_id: str, what: str) -> list[str]:
        if tile_id not in self.rows:
            raise SourceError(f"{what}: patch has no row in this date table", tile_id=tile_id, path=str(self.path))
        raw = self.rows[tile_id]
        if raw is _DUPLICATE:
            raise SourceError(f"{what}: patch id listed more than once in this date table", tile_id=tile_id,
                              path=str(self.path))
        return parse_acquisitions(raw, series=self.series, tile_id=tile_id, path=self.path, what=what)
