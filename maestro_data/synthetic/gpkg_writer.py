"""Writing a one-layer GeoPackage with sqlite3 for the synthetic FLAIR-HUB metadata (OGC 12-128r18): the mandatory
``gpkg_spatial_ref_sys``, ``gpkg_contents`` and ``gpkg_geometry_columns`` tables, the GPKG application id, and
geometry blobs made of the GeoPackage binary header (with envelope) followed by ISO WKB.

Written from the specification, apart from the reader (``sources/gpkg.py``): a misreading of the format on one
side is then a failing build test, not two mistakes that agree.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Sequence
from pathlib import Path

APPLICATION_ID = 0x47504B47  # "GPKG" (spec 1.1.1.1.1)
USER_VERSION = 10400  # GeoPackage 1.4


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def polygon_blob(ring: Sequence[tuple[float, float]], srs_id: int) -> bytes:
    """A GeoPackage geometry blob: header (little-endian, xy envelope) + ISO WKB Polygon of one closed ring."""
    pts = list(ring)
    if pts[0] != pts[-1]:
        pts.append(pts[0])
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    flags = 0b0000_0011  # bit 0: little-endian header; bits 1-3 = 1: envelope [minx, maxx, miny, maxy]
    header = b"GP" + struct.pack("<BBi4d", 0, flags, srs_id, min(xs), max(xs), min(ys), max(ys))
    wkb = struct.pack("<BIII", 1, 3, 1, len(pts)) + b"".join(struct.pack("<2d", x, y) for x, y in pts)
    return header + wkb


def _envelope(blob: bytes) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a blob made by :func:`polygon_blob` (little-endian, xy envelope)."""
    minx, maxx, miny, maxy = struct.unpack_from("<4d", blob, 8)
    return minx, miny, maxx, maxy


def write_feature_gpkg(path: Path, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence],
                       geometries: Sequence[bytes], srs_id: int, srs_wkt: str,
                       geometry_type: str = "POLYGON") -> None:
    """Write a one-layer GeoPackage: ``columns`` = [(name, SQL type)], one geometry blob per row."""
    if len(rows) != len(geometries):
        raise ValueError(f"{len(rows)} rows but {len(geometries)} geometries")
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    try:
        con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        con.execute(f"PRAGMA user_version = {USER_VERSION}")
        con.executescript(_CORE_TABLES)
        con.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", [
            ("Undefined cartesian SRS", -1, "NONE", -1, "undefined", "undefined cartesian coordinate reference system"),
            ("Undefined geographic SRS", 0, "NONE", 0, "undefined", "undefined geographic coordinate reference system"),
            (f"EPSG:{srs_id}", srs_id, "EPSG", srs_id, srs_wkt, None),
        ])
        envs = [_envelope(g) for g in geometries]
        bounds = (min(e[0] for e in envs), min(e[1] for e in envs), max(e[2] for e in envs),
                  max(e[3] for e in envs)) if envs else (None, None, None, None)
        con.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, description, min_x, min_y, "
                    "max_x, max_y, srs_id) VALUES (?, 'features', ?, '', ?, ?, ?, ?, ?)",
                    (table, table, *bounds, srs_id))
        con.execute("INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', ?, ?, 0, 0)",
                    (table, geometry_type, srs_id))
        defs = ", ".join(f"{_quote(n)} {t}" for n, t in columns)
        con.execute(f"CREATE TABLE {_quote(table)} (fid INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "
                    f"geom {geometry_type}, {defs})")
        names = ", ".join(_quote(n) for n, _ in columns)
        marks = ", ".join("?" for _ in range(len(columns) + 1))
        con.executemany(f"INSERT INTO {_quote(table)} (geom, {names}) VALUES ({marks})",
                        [(g, *r) for g, r in zip(geometries, rows, strict=True)])
        con.commit()
    finally:
        con.close()


_CORE_TABLES = """
CREATE TABLE gpkg_spatial_ref_sys (
  srs_name TEXT NOT NULL, srs_id INTEGER NOT NULL PRIMARY KEY, organization TEXT NOT NULL,
  organization_coordsys_id INTEGER NOT NULL, definition TEXT NOT NULL, description TEXT);
CREATE TABLE gpkg_contents (
  table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT NULL, identifier TEXT UNIQUE,
  description TEXT DEFAULT '', last_change DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE, srs_id INTEGER,
  CONSTRAINT fk_gc_r_srs_id FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys(srs_id));
CREATE TABLE gpkg_geometry_columns (
  table_name TEXT NOT NULL, column_name TEXT NOT NULL, geometry_type_name TEXT NOT NULL,
  srs_id INTEGER NOT NULL, z TINYINT NOT NULL, m TINYINT NOT NULL,
  CONSTRAINT pk_geom_cols PRIMARY KEY (table_name, column_name),
  CONSTRAINT fk_gc_tn FOREIGN KEY (table_name) REFERENCES gpkg_contents(table_name),
  CONSTRAINT fk_gc_srs FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys (srs_id));
"""
