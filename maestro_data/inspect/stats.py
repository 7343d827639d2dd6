"""`maestro-data stats`: the band statistics behind normalisation, streamed through a tile store one tile (and at
most ``CHUNK_VALUES`` values) at a time, so memory does not grow with the number of tiles.

Per modality and stored band: count, mean, std, min, max, percentiles, histogram, NaN and inf counts, over the
values the normalisation factor divides (stored values; ``log(max(x, 1e-10))`` for ``log_scale`` modalities, as
``temporal.normalise``), excluding non-finite values and cloud-masked pixels (any mask band above the manifest's
threshold). The correlation matrix of the bands over pixels valid in every band, with the band groups and the
factor it suggests (``proposal``); cloud cover per date and per month of year; class frequencies per split.
Accumulation rules (exact percentiles for integer bands, half a bin for float bands): ``accumulate``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from maestro_data.build.tile_store import TileStore
from maestro_data.dates import iso_day
from maestro_data.errors import StoreError
from maestro_data.inspect.accumulate import FLOAT_BINS, CoMoments, Histogram, Moments
from maestro_data.inspect.proposal import GROUP_DISTANCE, Proposal, propose
from maestro_data.manifest import ModalitySpec, TargetSpec
from maestro_data.stream.temporal import LOG_FLOOR
from maestro_data.tile import Series

PERCENTILES = (1, 2, 50, 98, 99)
CHUNK_VALUES = 1 << 22  # values of one modality decoded to float64 at a time (32 MB)
METHOD = {
    "values": "as the normalisation factor divides them: stored values, log(max(x, 1e-10)) for log_scale",
    "excluded": "non-finite values and cloud-masked pixels (any mask band > the manifest's threshold)",
    "std": "population standard deviation (ddof 0), streamed pairwise (Chan et al.) in float64",
    "percentiles": "numpy inverted_cdf, from fixed-range histograms: integer bands one bin per value (exact), "
                   f"float bands {FLOAT_BINS} bins over a first pass's [min, max] (within 'resolution')",
    "correlation": "Pearson, over the pixels valid in every band of the modality",
    "groups": "average-linkage clustering of 1 - |r| between model bands, cut at groups.proposed.distance",
    "norm_factor": "255 for uint8; else the 1-2-5 series number nearest the largest |1st or 99th percentile|",
    "cloud": "share of a date's pixels that are cloud-masked, averaged over the tiles of that date",
}


def select_tiles(store: TileStore, split: str | None = None, subset: int | None = None) -> np.ndarray:
    """Valid tiles of ``split`` (every split when None), restricted to the nested ``subset`` % of each split."""
    names = store.manifest.splits.names
    if split is not None and split not in names:
        raise StoreError(f"{store.path}: no split {split!r} (splits: {', '.join(names)})")
    chosen = []
    for s in [split] if split else names:
        tiles = store.split_indices(s)
        if subset is not None and subset != 100:
            order, counts = store.subsets(s)
            if subset not in counts:
                raise StoreError(f"{store.path}: split {s!r} has no {subset} % subset (subsets: "
                                 f"{', '.join(str(p) for p in counts) or 'none'}; see `maestro-data subsets`)")
            tiles = np.sort(order[:counts[subset]])
        chosen.append(tiles)
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def cloudy_pixels(series: Series, spec: ModalitySpec) -> np.ndarray:
    """(T, H, W) bool: masked where any mask band exceeds the threshold (the official rule); none without mask."""
    if series.mask is None or spec.cloud_mask is None:
        return np.zeros((series.data.shape[0], *series.data.shape[2:]), bool)
    return (series.mask > spec.cloud_mask.threshold).any(axis=1)


def band_chunks(series: Series, spec: ModalitySpec) -> Iterator[np.ndarray]:
    """(C, N) float64 chunks of the series' values (log where ``log_scale``), NaN where not counted."""
    t, c, h, w = series.data.shape
    cloudy = cloudy_pixels(series, spec)
    step = max(1, CHUNK_VALUES // max(1, c * h * w))
    for a in range(0, t, step):
        x = series.data[a:a + step].astype(np.float64)
        if spec.log_scale:
            with np.errstate(invalid="ignore"):
                x = np.log(np.maximum(x, LOG_FLOOR))  # NaN stays NaN
        x[~np.isfinite(x) | cloudy[a:a + step, None]] = np.nan
        yield x.transpose(1, 0, 2, 3).reshape(c, -1)


class ModalityStats:
    """Every accumulator of one modality; ``ranges`` (per-band [lo, hi]) is needed for float dtypes."""

    def __init__(self, spec: ModalitySpec, ranges: tuple[np.ndarray, np.ndarray] | None = None):
        c = spec.stored_channels
        self.spec = spec
        self.moments, self.comoments = Moments.zeros(c), CoMoments.zeros(c)
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu" and not spec.log_scale:
            self.hist = Histogram.for_dtype(dtype, c)
        elif ranges is None:
            raise StoreError(f"modality {spec.name!r}: a float histogram needs the value range of a first pass")
        else:
            self.hist = Histogram.for_range(*ranges)
        self.lo, self.hi = np.full(c, np.inf), np.full(c, -np.inf)
        self.nan, self.inf = np.zeros(c, np.int64), np.zeros(c, np.int64)
        self.steps = self.pixels = self.cloudy = 0
        self.dates: dict[str, list[float]] = {}  # "YYYY-MM-DD" -> [steps, summed cloud share, clear steps]

    def add(self, series: Series) -> None:
        data = series.data
        if data.dtype.kind == "f":
            self.nan += np.isnan(data).sum(axis=(0, 2, 3))
            self.inf += np.isinf(data).sum(axis=(0, 2, 3))
        for x in band_chunks(series, self.spec):
            self.moments.add(x)
            self.comoments.add(x)
            self.hist.add(x)
            self.lo = np.fmin(self.lo, np.nanmin(x, axis=1, initial=np.inf))  # initial: no warning when all NaN
            self.hi = np.fmax(self.hi, np.nanmax(x, axis=1, initial=-np.inf))
        cloudy = cloudy_pixels(series, self.spec)
        self.steps += data.shape[0]
        self.pixels += cloudy.size
        self.cloudy += int(cloudy.sum())
        if self.spec.cloud_mask is None:
            return
        share = cloudy.mean(axis=(1, 2)) if cloudy.size else np.zeros(0)
        for ymd, s in zip(series.dates, share, strict=True):
            entry = self.dates.setdefault(iso_day(ymd), [0, 0.0, 0])
            entry[0] += 1
            entry[1] += float(s)
            entry[2] += int(s == 0)

    def result(self, distance: float = GROUP_DISTANCE) -> dict:
        spec = self.spec
        pct = self.hist.percentiles(PERCENTILES)
        corr = self.comoments.correlation()
        bands = {}
        for c, name in enumerate(spec.bands):
            edges, counts = self.hist.coarse(c)
            bands[name] = {
                "count": int(self.moments.n[c]), "nan": int(self.nan[c]), "inf": int(self.inf[c]),
                "mean": float(self.moments.mean[c]) if self.moments.n[c] else None, "std": float(self.moments.std[c]),
                "min": float(self.lo[c]), "max": float(self.hi[c]),
                "percentiles": {str(q): float(v) for q, v in zip(PERCENTILES, pct[c], strict=True)},
                "resolution": float(self.hist.resolution[c]), "histogram": {"edges": edges, "counts": counts},
            }
        sel = list(spec.select)
        if self.comoments.n:
            proposal = propose(spec, corr[np.ix_(sel, sel)], pct[:, 0], pct[:, -1], distance)
        else:  # no valid pixel: nothing to propose, the manifest stands
            proposal = Proposal(spec.select, spec.norm_groups, spec.norm_factor)
        return {
            "dtype": spec.dtype, "values": "log" if spec.log_scale else "stored", "steps": self.steps,
            "pixels": self.pixels, "cloudy_pixels": self.cloudy, "bands": bands,
            "correlation": {"bands": list(spec.bands), "pixels": int(self.comoments.n), "matrix": corr.tolist()},
            "groups": _groups(spec, proposal, distance),
            "norm_factor": {"manifest": spec.norm_factor, "proposed": proposal.norm_factor},
            "cloud": _cloud(self.dates) if spec.cloud_mask is not None else None,
        }


def _groups(spec: ModalitySpec, proposal: Proposal, distance: float) -> dict:
    manifest = Proposal(spec.select, spec.norm_groups, spec.norm_factor)
    return {"manifest": {"norm_groups": list(spec.norm_groups), "select": list(spec.select),
                         "bands": manifest.groups(spec.bands)},
            "proposed": {"norm_groups": list(proposal.norm_groups), "select": list(proposal.select),
                         "bands": proposal.groups(spec.bands), "distance": distance}}


def _cloud(dates: dict[str, list[float]]) -> dict:
    per_date = {d: {"steps": int(n), "cloud_share": s / n, "clear_steps": int(k)}
                for d, (n, s, k) in sorted(dates.items())}
    months: dict[str, list[float]] = {}
    for d, (n, s, k) in dates.items():
        m = months.setdefault(d[5:7], [0, 0.0, 0])
        m[0], m[1], m[2] = m[0] + n, m[1] + s, m[2] + k
    per_month = {m: {"steps": int(n), "cloud_share": s / n, "clear_steps": int(k)}
                 for m, (n, s, k) in sorted(months.items())}
    return {"per_date": per_date, "per_month": per_month}


def value_ranges(store: TileStore, tiles: np.ndarray, spec: ModalitySpec) -> tuple[np.ndarray, np.ndarray]:
    """First pass for a float (or log-scaled) modality: per-band [min, max] of the counted values."""
    lo, hi = np.full(spec.stored_channels, np.inf), np.full(spec.stored_channels, -np.inf)
    for i in tiles.tolist():
        for x in band_chunks(store.read_series(i, spec.name), spec):
            lo = np.fmin(lo, np.nanmin(x, axis=1, initial=np.inf))
            hi = np.fmax(hi, np.nanmax(x, axis=1, initial=-np.inf))
    return lo, hi


def class_counts(t: TargetSpec, value: np.ndarray, into: dict) -> None:
    """Add one tile's target to ``into``: pixel counts per class value (segmentation), or positive tiles
    (fraction > threshold, compared in float32 as the loader does), summed fractions and missing values."""
    n = len(t.classes)
    if t.type == "segmentation":
        counts = np.bincount(value.astype(np.int64).ravel(), minlength=n)
        into.setdefault("pixels", np.zeros(n + 1, np.int64))
        into["pixels"][:n] += counts[:n]
        into["pixels"][n] += counts[n:].sum()  # values outside the class list
        return
    f = np.asarray(value, np.float32)
    into.setdefault("positive", np.zeros(n, np.int64))
    into.setdefault("fraction_sum", np.zeros(n))
    into.setdefault("missing", np.zeros(n, np.int64))
    into["positive"] += f > np.float32(t.threshold)
    into["fraction_sum"] += np.nan_to_num(f.astype(np.float64))
    into["missing"] += np.isnan(f)
    into["tiles"] = into.get("tiles", 0) + 1


def _classes(t: TargetSpec, per_split: dict[str, dict]) -> dict:
    out = {}
    for split, acc in sorted(per_split.items()):
        def per_class(values: np.ndarray) -> dict:
            return dict(zip(t.classes, values.tolist(), strict=True))

        if t.type == "segmentation":
            pixels = acc["pixels"]
            out[split] = {"pixels": per_class(pixels[:-1]), "share": per_class(pixels[:-1] / max(1, pixels.sum())),
                          "other_values": int(pixels[-1])}
        else:
            out[split] = {"tiles": acc["tiles"], "positive": per_class(acc["positive"]),
                          "mean_fraction": per_class(acc["fraction_sum"] / acc["tiles"]),
                          "missing": per_class(acc["missing"])}
    return {"type": t.type, "threshold": t.threshold, "per_split": out}


def compute_stats(store: TileStore, split: str | None = None, subset: int | None = None,
                  distance: float = GROUP_DISTANCE, quiet: bool = True) -> dict:
    """Every number of ``stats.json`` for the chosen tiles of ``store`` (see the module docstring)."""
    manifest = store.manifest
    tiles = select_tiles(store, split, subset)
    if not len(tiles):
        raise StoreError(f"{store.path}: no valid tile in {split or 'any split'}"
                         + (f" ({subset} % subset)" if subset else ""))
    acc = {}
    for name, spec in manifest.modalities.items():
        needs_range = np.dtype(spec.dtype).kind == "f" or spec.log_scale
        acc[name] = ModalityStats(spec, value_ranges(store, tiles, spec) if needs_range else None)
    classes: dict[str, dict[str, dict]] = {t: {} for t in manifest.targets}
    for i in tqdm(tiles.tolist(), desc=f"stats {manifest.name}", unit="tile", disable=quiet):
        for name in manifest.modalities:
            acc[name].add(store.read_series(i, name))
        for name, t in manifest.targets.items():
            class_counts(t, store.read_target(i, name), classes[name].setdefault(store.splits[i], {}))
    return _finite({
        "store": str(store.path), "dataset": manifest.name, "manifest_sha256": manifest.sha256,
        "split": split or "all", "subset": subset or 100, "tiles": len(tiles), "percentiles": list(PERCENTILES),
        "method": METHOD, "modalities": {name: a.result(distance) for name, a in acc.items()},
        "classes": {name: _classes(manifest.targets[name], per) for name, per in classes.items()},
    })


def _finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
