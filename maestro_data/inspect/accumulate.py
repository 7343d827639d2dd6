"""Streaming accumulators for band statistics: memory is fixed by the number of bands and bins, never by the number
of tiles. Every chunk is a ``(C, N)`` float64 array of N pixels of C bands, NaN where a value is not counted.

* :class:`Moments`: count, mean and (population) variance per band, merged chunk by chunk with Chan et al.'s
  pairwise update in float64, which stays exact to rounding where a running sum of squares would cancel.
* :class:`Histogram`: fixed-range histograms per band. Integer bands get one bin per integer value of the stored
  dtype, so percentiles are exact; float bands get ``FLOAT_BINS`` equal bins over a first pass's [min, max], so a
  percentile is known to half a bin (its ``resolution``). Percentiles follow numpy's ``inverted_cdf`` method
  (the smallest value whose cumulative share reaches q %).
* :class:`CoMoments`: mean vector and co-moment matrix over the pixels where every band is valid, merged the same
  way; the correlation matrix follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FLOAT_BINS = 4096
PLOT_BINS = 256


@dataclass
class Moments:
    n: np.ndarray  # (C,) int64
    mean: np.ndarray  # (C,) float64
    m2: np.ndarray  # (C,) float64: sum of squared deviations from the mean

    @classmethod
    def zeros(cls, channels: int) -> Moments:
        return cls(np.zeros(channels, np.int64), np.zeros(channels), np.zeros(channels))

    def add(self, x: np.ndarray) -> None:
        valid = ~np.isnan(x)
        if valid.all():  # the common chunk: no masking temporaries
            nb = np.full(x.shape[0], x.shape[1], np.int64)
            mb = x.mean(axis=1)
            d = x - mb[:, None]
        else:
            nb = valid.sum(axis=1)
            mb = np.where(valid, x, 0.0).sum(axis=1) / np.maximum(nb, 1)
            d = np.where(valid, x - mb[:, None], 0.0)
        m2b = np.einsum("ij,ij->i", d, d)
        n = self.n + nb
        delta = mb - self.mean
        share = np.divide(nb, n, out=np.zeros(len(n)), where=n > 0)
        self.mean = self.mean + delta * share
        self.m2 = self.m2 + m2b + delta**2 * self.n * share
        self.n = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof 0), NaN for a band without values."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.where(self.n > 0, self.m2 / np.maximum(self.n, 1), np.nan))


@dataclass
class Histogram:
    lo: np.ndarray  # (C,) left edge of bin 0
    width: np.ndarray  # (C,) bin width
    counts: np.ndarray  # (C, bins) int64
    exact: bool  # one bin per integer value: percentiles exact

    @classmethod
    def for_dtype(cls, dtype: np.dtype, channels: int) -> Histogram:
        """Unit bins over the whole range of an integer dtype of at most 16 bits."""
        info = np.iinfo(dtype)
        bins = int(info.max) - int(info.min) + 1
        return cls(np.full(channels, float(info.min)), np.ones(channels), np.zeros((channels, bins), np.int64), True)

    @classmethod
    def for_range(cls, lo: np.ndarray, hi: np.ndarray, bins: int = FLOAT_BINS) -> Histogram:
        """``bins`` equal bins over [lo, hi] per band (a band seen empty or constant gets unit-width bins)."""
        lo = np.where(np.isfinite(lo), lo, 0.0)
        span = np.where(np.isfinite(hi) & (hi > lo), hi - lo, 0.0)
        width = np.where(span > 0, span / bins, 1.0)
        return cls(lo.astype(np.float64), width, np.zeros((len(lo), bins), np.int64), False)

    @property
    def bins(self) -> int:
        return self.counts.shape[1]

    def add(self, x: np.ndarray) -> None:
        for c in range(x.shape[0]):
            nan = np.isnan(x[c])
            v = x[c][~nan] if nan.any() else x[c]
            idx = np.floor((v - self.lo[c]) / self.width[c]).astype(np.int64)
            np.clip(idx, 0, self.bins - 1, out=idx)  # the top edge of a float range is inside the last bin
            self.counts[c] += np.bincount(idx, minlength=self.bins)

    def percentiles(self, qs: tuple[float, ...]) -> np.ndarray:
        """(C, len(qs)) ``inverted_cdf`` percentiles; float bands give the centre of the bin holding it."""
        out = np.full((self.counts.shape[0], len(qs)), np.nan)
        for c, counts in enumerate(self.counts):
            cum = np.cumsum(counts)
            if cum[-1] == 0:
                continue
            for j, q in enumerate(qs):
                rank = max(1, math.ceil(q / 100 * int(cum[-1])))
                b = int(np.searchsorted(cum, rank))
                out[c, j] = self.lo[c] + (b if self.exact else b + 0.5) * self.width[c]
        return out

    @property
    def resolution(self) -> np.ndarray:
        """Largest distance of a reported percentile from the exact one: 0 for integer bands, half a bin else."""
        return np.zeros_like(self.width) if self.exact else self.width / 2

    def coarse(self, c: int, bins: int = PLOT_BINS) -> tuple[list[float], list[int]]:
        """Band ``c`` re-binned to at most ``bins`` bins between its lowest and highest occupied bin:
        (edges, counts), derived from the fine counts (the histogram of the figures and of stats.json)."""
        counts = self.counts[c]
        used = np.flatnonzero(counts)
        if not len(used):
            return [], []
        first, last = int(used[0]), int(used[-1])
        step = max(1, math.ceil((last - first + 1) / bins))
        n = math.ceil((last - first + 1) / step)
        padded = np.zeros(n * step, np.int64)
        padded[:last - first + 1] = counts[first:last + 1]
        edges = self.lo[c] + (first + np.arange(n + 1) * step) * self.width[c]
        return edges.tolist(), padded.reshape(n, step).sum(axis=1).tolist()


@dataclass
class CoMoments:
    n: int
    mean: np.ndarray  # (C,)
    comoment: np.ndarray  # (C, C) sum of (x - mean)(x - mean)^T

    @classmethod
    def zeros(cls, channels: int) -> CoMoments:
        return cls(0, np.zeros(channels), np.zeros((channels, channels)))

    def add(self, x: np.ndarray) -> None:
        """Only the pixels valid in every band count."""
        invalid = np.isnan(x).any(axis=0)
        if invalid.any():
            x = x[:, ~invalid]
        nb = x.shape[1]
        if nb == 0:
            return
        mb = x.mean(axis=1)
        d = x - mb[:, None]
        n = self.n + nb
        delta = mb - self.mean
        self.comoment = self.comoment + d @ d.T + np.outer(delta, delta) * self.n * nb / n
        self.mean = self.mean + delta * nb / n
        self.n = n

    def correlation(self) -> np.ndarray:
        """Pearson correlation matrix; NaN rows and columns for bands without variance."""
        scale = np.sqrt(np.diag(self.comoment))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = self.comoment / np.outer(scale, scale)
        return np.clip(r, -1.0, 1.0)
