"""What `maestro-data show` draws, as plain arrays: a :class:`TileView` of sections of panels, built by pure
functions from a decoded sample (``tile_view``) or from what the loader makes of it (``model_view``). ``figures``
turns a view into a matplotlib figure; nothing here imports matplotlib.

Pictures: RGB and false colour from the manifest's ``display`` bands, each stretched between its 2nd and 98th
percentiles (over every date of a time series, cloud-masked pixels excluded, so dates compare); elevation as a
hillshade; a time series without an RGB view (Sentinel-1) as per-band temporal medians beside the per-date band
means, in dB where backscatter is stored linear (``log_scale``). Time steps the official rule selects (eval mode,
for the given crop) are marked; labels take the manifest's class colours.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maestro_data.dates import iso_day
from maestro_data.manifest import Manifest, ModalitySpec, TargetSpec
from maestro_data.stream.augment import crop_window, eval_crop_origins
from maestro_data.stream.temporal import LOG_FLOOR, channel_index, select_steps

FALLBACK = "#808080"  # class colour when the manifest lists none
MISSING_RGBA = (0.85, 0.85, 0.85, 1.0)  # ignored / missing labels


@dataclass
class Panel:
    """One axes: ``kind`` rgb (H, W, 3 in [0, 1]) | gray (H, W in [0, 1]) | classes (H, W, 4) | bars | series |
    legend | text; ``size`` in layout cells (columns, rows)."""

    kind: str
    title: str
    data: Any
    size: tuple[int, int] = (1, 1)
    overlay: np.ndarray | None = None  # (H, W) bool, drawn as translucent red (cloud mask)
    highlight: bool = False
    meta: dict = field(default_factory=dict)


@dataclass
class Section:
    title: str
    panels: list[Panel]


@dataclass
class TileView:
    title: str
    sections: list[Section]
    arrays: dict[str, np.ndarray]  # the arrays every panel was computed from


def stretch(x: np.ndarray, valid: np.ndarray | None = None, lo: float = 2, hi: float = 98) -> np.ndarray:
    """``x`` (C, H, W) or a series (T, C, H, W) scaled per channel to [0, 1] from the ``lo`` percentile of every
    finite value (of ``valid`` (H, W) / (T, H, W) pixels when given) to the median over steps of each step's ``hi``
    percentile; NaN -> 0. A series shares one scale so that dates compare, and bright (cloudy) dates, as long as
    they are fewer than half, saturate instead of darkening every other date."""
    x = np.asarray(x, dtype=np.float64)
    series = x if x.ndim == 4 else x[None]
    keep = np.isfinite(series)
    if valid is not None:
        keep &= (valid if valid.ndim == 3 else valid[None])[:, None]
    out = np.zeros(series.shape, np.float32)
    for c in range(series.shape[1]):
        band, ok = series[:, c], keep[:, c]
        if not ok.any():
            continue
        a = np.percentile(band[ok], lo)
        b = np.median([np.percentile(step[m], hi) for step, m in zip(band, ok, strict=True) if m.any()])
        scaled = (band - a) / (b - a) if b > a else np.where(np.isfinite(band), 0.5, 0.0)
        out[:, c] = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1)
    return out if x.ndim == 4 else out[0]


def hillshade(elevation: np.ndarray, resolution_m: float, azimuth: float = 315.0, altitude: float = 45.0) -> np.ndarray:
    """Shaded relief in [0, 1] of an (H, W) elevation in metres (row 0 north), lit from ``azimuth`` degrees clockwise
    from north at ``altitude`` degrees: the cosine between the surface normal and the sun, 0 in shadow."""
    z = np.asarray(elevation, np.float64)
    finite = np.isfinite(z)
    z = np.where(finite, z, np.median(z[finite]) if finite.any() else 0.0)
    d_row, d_col = np.gradient(z, resolution_m)
    normal = np.stack([-d_col, d_row, np.ones_like(z)])  # (east, north, up); north is up the rows: -d_row
    normal /= np.linalg.norm(normal, axis=0)
    az, alt = np.radians(azimuth), np.radians(altitude)
    sun = np.array([np.sin(az) * np.cos(alt), np.cos(az) * np.cos(alt), np.sin(alt)])
    return np.clip(np.tensordot(sun, normal, axes=1), 0, 1).astype(np.float32)


def hex_rgba(colour: str) -> tuple[float, float, float, float]:
    return int(colour[1:3], 16) / 255, int(colour[3:5], 16) / 255, int(colour[5:7], 16) / 255, 1.0


def class_palette(t: TargetSpec) -> np.ndarray:
    """(classes, 4) RGBA of the manifest's colours (grey where the manifest has none)."""
    return np.asarray([hex_rgba(c) for c in (t.colors or (FALLBACK,) * len(t.classes))])


def class_image(labels: np.ndarray, t: TargetSpec) -> np.ndarray:
    """(H, W, 4) RGBA of a class raster; values outside the class list (the missing value) light grey."""
    palette = np.vstack([class_palette(t), MISSING_RGBA])
    idx = np.where((labels >= 0) & (labels < len(t.classes)), labels, len(t.classes)).astype(np.int64)
    return palette[idx]


def _legend(labels: np.ndarray, t: TargetSpec, missing: str) -> Panel:
    present = sorted({int(v) for v in np.unique(labels)})
    entries = [(t.classes[v], class_palette(t)[v]) for v in present if 0 <= v < len(t.classes)]
    if any(not 0 <= v < len(t.classes) for v in present):
        entries.append((missing, np.asarray(MISSING_RGBA)))
    return Panel("legend", "", entries, size=(4, 3))


def selected_steps(data: np.ndarray, mask: np.ndarray | None, spec: ModalitySpec, manifest: Manifest,
                   crop: int) -> np.ndarray:
    """Raw step indices the official eval rule picks for ``crop`` (the loader's ``select_steps`` on that crop)."""
    r, c, s = crop_window(spec, eval_crop_origins(manifest)[crop])
    data = data[:, :, r:r + s, c:c + s]
    if data.shape[0] <= spec.temporal_bins:
        return select_steps(data, spec.temporal_bins, mode="eval")
    mask = None if mask is None else mask[:, :, r:r + s, c:c + s]
    threshold = spec.cloud_mask.threshold if spec.cloud_mask else 0.0
    return select_steps(data, spec.temporal_bins, mask=mask, threshold=threshold, mode="eval", offset=0,
                        channels=channel_index(spec.stored_channels, spec.select))


def _backscatter(x: np.ndarray, spec: ModalitySpec) -> tuple[np.ndarray, str]:
    """Values to picture a radar band: dB where stored linear (``log_scale``), as stored otherwise."""
    if spec.log_scale:
        with np.errstate(invalid="ignore"):
            return 10 * np.log10(np.maximum(x.astype(np.float64), LOG_FLOOR)), "dB"
    return x.astype(np.float64), ""


def _single(data: np.ndarray, spec: ModalitySpec, bands: tuple[str, ...], scale: float) -> list[Panel]:
    """Panels of one date ``data`` (C, H, W) whose channels are ``bands``: every display view, else gray bands.
    ``scale`` turns the values back into metres for the hillshade (the norm factor for model inputs)."""
    panels = []
    for kind, names in spec.display:
        idx = [bands.index(n) for n in names if n in bands]
        if len(idx) != len(names):
            continue
        if kind == "hillshade":
            panels += [Panel("gray", f"{n} hillshade", hillshade(data[i] * scale, spec.resolution_m),
                             size=(3, 3)) for n, i in zip(names, idx, strict=True)]
        else:
            title = f"{'RGB' if kind == 'rgb' else 'false colour'} ({'/'.join(names)})"
            panels.append(Panel("rgb", title, stretch(data[idx]).transpose(1, 2, 0), size=(3, 3)))
    if not panels:
        panels = [Panel("gray", n, stretch(data[i:i + 1])[0], size=(3, 3))
                  for i, n in enumerate(bands[:4])]
    return panels


def _thumbnails(data: np.ndarray, idx: list[int], titles: list[str], valid: np.ndarray | None = None,
                marks: dict[int, int] | None = None) -> list[Panel]:
    """One thumbnail per step of ``data`` (T, C, H, W): RGB of channels ``idx`` (gray for one channel), one stretch
    for all steps; ``valid`` (T, H, W) False where cloud-masked (overlaid); ``marks`` step -> its bin."""
    marks = marks or {}
    pictures = stretch(data[:, idx], valid)
    pictures = pictures[:, 0] if len(idx) == 1 else pictures.transpose(0, 2, 3, 1)
    panels = []
    for k in range(data.shape[0]):
        title = titles[k] + (f"\nbin {marks[k]}" if k in marks else "")
        overlay = None if valid is None else ~valid[k]
        panels.append(Panel("gray" if len(idx) == 1 else "rgb", title, pictures[k], overlay=overlay,
                            highlight=k in marks))
    return panels


def _series(data: np.ndarray, spec: ModalitySpec, dates: np.ndarray, marks: dict[int, int]) -> list[Panel]:
    """Temporal median image per model band, and the per-date band means (the selected dates marked)."""
    values, unit = _backscatter(data, spec)
    panels = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN pixel or date is real Sentinel-1 data
        median = np.nanmedian(values, axis=0)
        means = np.nanmean(values, axis=(2, 3))
    for i in spec.select:
        panels.append(Panel("gray", f"{spec.bands[i]} median of {len(dates)} dates {unit}".strip(),
                            stretch(median[i:i + 1])[0], size=(3, 3)))
    panels.append(Panel("series", f"band means per date {unit}".strip(), means[:, list(spec.select)], size=(6, 3),
                        meta={"dates": [iso_day(d) for d in dates], "bands": list(spec.model_bands),
                              "marks": sorted(marks)}))
    return panels


def _modality_raw(sample: dict, spec: ModalitySpec, manifest: Manifest, crop: int) -> Section:
    data, dates = sample[spec.name], sample[f"{spec.name}_dates"]
    mask = sample.get(f"{spec.name}_mask")
    t = data.shape[0]
    head = f"{spec.name}: {t} date{'s' if t != 1 else ''}, {spec.dtype}, bands {' '.join(spec.bands)}"
    if t == 0:
        return Section(head, [Panel("text", "", "no acquisition for this tile", size=(4, 1))])
    if t == 1:
        return Section(f"{head}, {iso_day(dates[0])}", _single(data[0], spec, spec.bands, 1.0))
    picked = selected_steps(data, mask, spec, manifest, crop)
    marks = {int(s): b for b, s in reversed(list(enumerate(picked.tolist())))}
    head += f"; framed: the {spec.temporal_bins} steps the official eval rule selects (crop {crop})"
    rgb = spec.view("rgb")
    if not rgb:
        return Section(head, _series(data, spec, dates, marks))
    valid = None
    if mask is not None and spec.cloud_mask is not None:
        valid = ~(mask > spec.cloud_mask.threshold).any(axis=1)
        head += "; red: cloud / snow mask"
    return Section(head, _thumbnails(data, list(rgb), [iso_day(d) for d in dates], valid, marks))


def _target(value: np.ndarray, t: TargetSpec, model: bool) -> Section:
    if t.type == "multilabel":
        shown = value[:t.num_classes] if model else value
        what = "labels the model receives (1 = present)" if model else f"genus fractions (label: > {t.threshold})"
        bars = Panel("bars", what, np.asarray(shown, np.float64), size=(8, 3),
                     meta={"classes": list(t.classes[:len(shown)]), "colors": class_palette(t)[:len(shown)],
                           "threshold": None if model else t.threshold, "missing": t.missing_value})
        return Section(f"{t.name}: multilabel, {len(t.classes)} classes", [bars])
    labels = np.asarray(value)
    title = "training labels (ignored classes: the missing value)" if model else "classes"
    return Section(f"{t.name}: segmentation, {len(t.classes)} classes",
                   [Panel("classes", title, class_image(labels, t), size=(3, 3)),
                    _legend(labels, t, "ignored / missing")])


def tile_view(sample: dict, manifest: Manifest, crop: int = 0) -> TileView:
    """Every modality and target of one decoded sample (full tile, every date)."""
    sections = [_modality_raw(sample, spec, manifest, crop) for spec in manifest.modalities.values()]
    sections += [_target(sample[t.name], t, model=False) for t in manifest.targets.values()]
    meta = sample.get("meta", {})
    title = f"{manifest.title} tile {sample['tile_id']} ({meta.get('split', '?')}), reference date " \
            f"{iso_day(np.asarray(meta.get('ref_date', (0, 0, 0))))}"
    arrays = {k: v for k, v in sample.items() if isinstance(v, np.ndarray)}
    return TileView(title, sections, arrays)


def _modality_model(arrays: dict[str, np.ndarray], spec: ModalitySpec) -> Section:
    x, dates = arrays[spec.name], arrays[f"{spec.name}_dates"]
    head = f"{spec.name}: {x.shape[0]} bin{'s' if x.shape[0] != 1 else ''} x {x.shape[1]} bands " \
           f"({' '.join(spec.model_bands)}), {x.shape[2]} px, normalised"
    if bool(arrays.get(f"{spec.name}_missing", False)):
        return Section(head, [Panel("text", "", "no acquisition: a neutral all-zero input", size=(4, 1))])
    scale = 1.0 if spec.log_scale else spec.norm_factor
    if x.shape[0] == 1:
        return Section(f"{head}, {iso_day(dates[0])}", _single(x[0], spec, spec.model_bands, scale))
    rgb = [spec.model_bands.index(n) for n in dict(spec.display).get("rgb", ()) if n in spec.model_bands]
    if len(rgb) == 3:
        return Section(head, _thumbnails(x, rgb, [iso_day(d) for d in dates]))
    panels = []
    for c, band in enumerate(spec.model_bands):
        panels += _thumbnails(x, [c], [f"{band} {iso_day(d)}" for d in dates])
    return Section(head, panels)


def model_view(arrays: dict[str, np.ndarray], manifest: Manifest, tile_id: str, mode: str, seed: int, epoch: int,
               crop: int, d4: int) -> TileView:
    """What the model receives for one element (``samples.model_sample``): one thumbnail per temporal bin."""
    sections = [_modality_model(arrays, spec) for spec in manifest.modalities.values()]
    sections += [_target(arrays[t.name], t, model=True) for t in manifest.targets.values() if t.name in arrays]
    title = (f"{manifest.title} tile {tile_id}: what the model receives ({mode} mode, seed {seed}, epoch {epoch}, "
             f"crop {crop}, D4 element {d4})")
    return TileView(title, sections, arrays)
