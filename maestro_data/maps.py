"""Maps a GIS opens as is: class-id and probability Cloud-Optimized GeoTIFFs on a tile's label grid, a VRT mosaic,
and GeoJSON / CSV of tile footprints for classification.

Every raster goes through rasterio: a GeoTIFF is composed in a MemoryFile and copied with GDAL's COG driver (tiled,
overviews, deflate), then renamed into place, so a reader (or a resumed run) never sees half a file. The VRT is GDAL
VRT XML written here (no GDAL Python bindings): it carries the class names and colour table, so QGIS styles the
mosaic without a .qml. Pure functions compose the content; ``write_*`` do the I/O.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from pyproj import CRS, Transformer
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from maestro_data.errors import MaestroError
from maestro_data.sources.grids import grid_bounds
from maestro_data.tile import Grid

RGB = tuple[int, int, int]
# ColorBrewer Set1/Dark2-like: distinct at a glance; classes beyond it get evenly spaced hues (still deterministic)
_BASE_PALETTE = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf",
                 "#999999", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
COG_OPTIONS = {"compress": "deflate", "blocksize": 256, "overview_resampling": "nearest"}


class MapError(MaestroError):
    """A map output that cannot be written (names the file)."""


def hex_rgb(text: str) -> RGB:
    t = text.strip().lstrip("#")
    if len(t) != 6:
        raise MapError(f"colour {text!r} is not #rrggbb")
    return int(t[0:2], 16), int(t[2:4], 16), int(t[4:6], 16)


def palette(num_classes: int, colors: Sequence[str] | None = None) -> list[RGB]:
    """One colour per class: the manifest's ``colors`` where given, else a fixed deterministic palette."""
    if colors:
        if len(colors) < num_classes:
            raise MapError(f"{len(colors)} colours for {num_classes} classes")
        return [hex_rgb(c) for c in colors[:num_classes]]
    out = [hex_rgb(c) for c in _BASE_PALETTE[:num_classes]]
    for i in range(len(out), num_classes):
        r, g, b = colorsys.hsv_to_rgb(((i * 0.618034) % 1.0), 0.65, 0.9)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def _atomic_cog(path: Path, profile: dict, write) -> None:
    """Compose a GTiff in memory with ``write(dataset)``, copy it as a COG to a temporary name, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", **profile) as ds:
            write(ds)
        with mem.open() as src:
            rasterio.shutil.copy(src, str(tmp), driver="COG", **COG_OPTIONS)
    os.replace(tmp, path)


def _profile(grid: Grid, count: int, dtype: str, nodata: float | None) -> dict:
    return {"width": grid.width, "height": grid.height, "count": count, "dtype": dtype, "crs": grid.crs,
            "transform": Affine(*grid.transform), "nodata": nodata}


def write_class_cog(path: Path, classes: np.ndarray, grid: Grid, names: Sequence[str], colors: Sequence[RGB],
                    nodata: int | None = None) -> None:
    """uint8 class ids on ``grid`` with a colour table, the class names as band tags and description."""
    if classes.shape != (grid.height, grid.width):
        raise MapError(f"{path}: prediction of shape {classes.shape} for a {grid.height}x{grid.width} grid")

    def write(ds):
        ds.write(classes.astype(np.uint8), 1)
        ds.write_colormap(1, {i: (*c, 255) for i, c in enumerate(colors)})
        ds.set_band_description(1, "class id")
        ds.update_tags(1, CLASS_NAMES=json.dumps(list(names)))
        ds.update_tags(**{f"CLASS_{i}": n for i, n in enumerate(names)})

    _atomic_cog(path, {**_profile(grid, 1, "uint8", nodata), "photometric": "palette"}, write)


def write_probability_cog(path: Path, probabilities: np.ndarray, grid: Grid, names: Sequence[str]) -> None:
    """Per-class probabilities as uint8 (p * 255, rounded; scale 1/255 recorded so GIS tools read p)."""
    scaled = np.clip(np.rint(probabilities * 255.0), 0, 255).astype(np.uint8)

    def write(ds):
        ds.write(scaled)
        ds.scales = [1 / 255] * len(names)
        ds.offsets = [0.0] * len(names)
        for i, n in enumerate(names, start=1):
            ds.set_band_description(i, f"p({n})")

    _atomic_cog(path, _profile(grid, len(names), "uint8", None), write)


@dataclass(frozen=True)
class VrtTile:
    path: str  # relative to the VRT
    grid: Grid


def vrt_xml(tiles: Sequence[VrtTile], bands: int, names: Sequence[str] | None = None,
            colors: Sequence[RGB] | None = None, band_names: Sequence[str] | None = None) -> str:
    """GDAL VRT XML mosaicking ``tiles`` (one CRS, north-up, one pixel size) over the union of their bounds."""
    if not tiles:
        raise MapError("no tile to mosaic")
    crs = tiles[0].grid.crs
    a, e = float(tiles[0].grid.transform[0]), float(tiles[0].grid.transform[4])
    for t in tiles:
        ta, tb, _, td, te, _ = t.grid.transform
        if t.grid.crs != crs or tb or td or not (np.isclose(ta, a) and np.isclose(te, e)):
            raise MapError(f"{t.path}: grid {t.grid} does not share the mosaic's CRS and pixel size ({crs}, {a})")
    bounds = np.array([grid_bounds(t.grid) for t in tiles])
    left, top = float(bounds[:, 0].min()), float(bounds[:, 3].max())
    width = int(round((bounds[:, 2].max() - left) / a))
    height = int(round((bounds[:, 1].min() - top) / e))
    srs = escape(CRS.from_user_input(crs).to_wkt()) if crs else ""
    out = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
           f"  <SRS>{srs}</SRS>" if srs else "",
           f"  <GeoTransform>{left!r}, {a!r}, 0.0, {top!r}, 0.0, {e!r}</GeoTransform>"]
    for b in range(1, bands + 1):
        interp = "Palette" if colors else "Gray"
        out.append(f'  <VRTRasterBand dataType="Byte" band="{b}">')
        out.append(f"    <ColorInterp>{interp}</ColorInterp>")
        if band_names:
            out.append(f"    <Description>{escape(band_names[b - 1])}</Description>")
        if names:
            out.append("    <CategoryNames>" + "".join(f"<Category>{escape(n)}</Category>" for n in names)
                       + "</CategoryNames>")
        if colors:
            out.append("    <ColorTable>" + "".join(f'<Entry c1="{r}" c2="{g}" c3="{b_}" c4="255"/>'
                                                    for r, g, b_ in colors) + "</ColorTable>")
        for t in tiles:
            x = int(round((t.grid.transform[2] - left) / a))
            y = int(round((t.grid.transform[5] - top) / e))
            w, h = t.grid.width, t.grid.height
            out.append(f'    <SimpleSource><SourceFilename relativeToVRT="1">{escape(t.path)}</SourceFilename>'
                       f"<SourceBand>{b}</SourceBand>"
                       f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                       f'<DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/></SimpleSource>')
        out.append("  </VRTRasterBand>")
    out.append("</VRTDataset>")
    return "\n".join(line for line in out if line) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_vrts(folder: Path, stem: str, tiles: Sequence[VrtTile], **kw) -> list[Path]:
    """``<stem>.vrt`` next to the tiles; one VRT per CRS (``<stem>-EPSG_2154.vrt``) when the tiles have several."""
    by_crs: dict[str | None, list[VrtTile]] = {}
    for t in tiles:
        by_crs.setdefault(t.grid.crs, []).append(t)
    out = []
    for crs, group in by_crs.items():
        suffix = "" if len(by_crs) == 1 else "-" + "".join(c if c.isalnum() else "_" for c in str(crs))[:40]
        path = folder / f"{stem}{suffix}.vrt"
        write_text_atomic(path, vrt_xml(group, **kw))
        out.append(path)
    return out


def footprint_lonlat(grid: Grid, points_per_edge: int = 8) -> list[list[float]]:
    """The grid's outline as a closed WGS84 (lon, lat) ring, counter-clockwise (RFC 7946), densified so that a
    reprojected edge stays on the true footprint."""
    a, b, c, d, e, f = grid.transform
    t = np.linspace(0, 1, points_per_edge, endpoint=False)
    w, h = grid.width, grid.height
    cols = np.concatenate([t * w, np.full_like(t, w), (1 - t) * w, np.zeros_like(t)])
    rows = np.concatenate([np.zeros_like(t), t * h, np.full_like(t, h), (1 - t) * h])
    xs, ys = c + a * cols + b * rows, f + d * cols + e * rows
    if grid.crs is None:
        raise MapError("a footprint needs a CRS")
    lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    ring = [[round(float(x), 8), round(float(y), 8)] for x, y in zip(lon, lat, strict=True)]
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True))
    if area < 0:
        ring.reverse()
    return ring + [ring[0]]


def classification_features(records: Sequence[dict], names: Sequence[str], threshold: float) -> dict:
    """GeoJSON FeatureCollection: per tile its footprint, per-class probability, predicted classes > threshold."""
    feats = []
    for r in records:
        probs = dict(zip(names, r["probabilities"], strict=True))
        props = {"tile_id": r["tile_id"], "split": r["split"],
                 "predicted": [n for n, p in probs.items() if p > threshold], **probs}
        if r.get("labels") is not None:
            props["labels"] = [n for n, v in zip(names, r["labels"], strict=True) if v > 0.5]
        feats.append({"type": "Feature", "id": r["tile_id"], "properties": props,
                      "geometry": {"type": "Polygon", "coordinates": [r["footprint"]]}})
    return {"type": "FeatureCollection", "features": feats}


def classification_csv(records: Sequence[dict], names: Sequence[str], threshold: float) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["tile_id", "split", "lon", "lat", "predicted", *names])
    for r in records:
        ring = np.asarray(r["footprint"][:-1])
        predicted = ";".join(n for n, p in zip(names, r["probabilities"], strict=True) if p > threshold)
        w.writerow([r["tile_id"], r["split"], f"{ring[:, 0].mean():.7f}", f"{ring[:, 1].mean():.7f}", predicted,
                    *(f"{p:.6f}" for p in r["probabilities"])])
    return buf.getvalue()


def union_grid(grids: Sequence[Grid]) -> Grid:
    """A 1x1 grid over the union of ``grids``' bounds (all in the first one's CRS): a tile's footprint."""
    bounds = np.array([grid_bounds(g) for g in grids])
    left, bottom, right, top = bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max()
    return Grid(grids[0].crs, (right - left, 0.0, left, 0.0, bottom - top, top), 1, 1)


def label_grid(grids: dict[str, Grid], target: str, size: int) -> Grid:
    """The grid predictions of ``target`` are written on: the label raster's own grid as read, else (a store built
    with --no-targets has no label file) a grid of ``size`` pixels as read, else the tile's footprint cut into
    ``size`` pixels."""
    if target in grids:
        return grids[target]
    same = [grids[n] for n in sorted(grids) if (grids[n].width, grids[n].height) == (size, size)]
    if same:  # a modality read on the label's pixels (FLAIR aerial, PASTIS 10 m): its grid exactly, as read
        return same[0]
    if not grids:
        raise MapError("the tile has no georeference (shards written before grids were stored: rebuild them)")
    foot = union_grid(list(grids.values()))
    a, _, c, _, e, f = foot.transform
    return Grid(foot.crs, (a / size, 0.0, c, 0.0, e / size, f), size, size)
