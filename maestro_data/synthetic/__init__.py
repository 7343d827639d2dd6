"""Tiny raw datasets in each dataset's REAL published layout, for tests, benchmarks and the demo.

File names, folder structure, dtypes, band order, date encodings, CRS, metadata tables and the known quirks
of the real releases are reproduced; pixel values are smooth random fields so compression behaves as on
real imagery.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import numpy as np

GENERATORS = {
    "treesatai-ts": "maestro_data.synthetic.treesatai_ts",
    "pastis-hd": "maestro_data.synthetic.pastis_hd",
    "flair-hub": "maestro_data.synthetic.flair",
    "flair2": "maestro_data.synthetic.flair",
}


def generate(dataset: str, out: str | Path, tiles: int = 8, seed: int = 0, **options) -> Path:
    """Write a synthetic raw dataset named ``dataset`` with ``tiles`` tiles under ``out``; returns its root.

    ``options`` go to the dataset's generator (e.g. ``t_s2``/``t_s1`` time-series lengths for FLAIR-HUB)."""
    if dataset not in GENERATORS:
        raise ValueError(f"no synthetic generator for {dataset!r} (known: {', '.join(GENERATORS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return import_module(GENERATORS[dataset]).generate(out, tiles=tiles, seed=seed, dataset=dataset, **options)


_WEIGHTS: dict[tuple[int, int], np.ndarray] = {}


def smooth_fields(rng: np.random.Generator, lead: tuple[int, ...], size: int, cells: int) -> np.ndarray:
    """(*lead, size, size) float32 random fields in about [-1, 1]: coarse Gaussian noise upsampled bilinearly,
    so pixel values vary like imagery (and compress like it)."""
    if (size, cells) not in _WEIGHTS:
        pos = np.linspace(0, cells, size)
        low = np.minimum(pos.astype(int), cells - 1)
        w = np.zeros((size, cells + 1), np.float32)
        w[np.arange(size), low] = 1 - (pos - low)
        w[np.arange(size), low + 1] = pos - low
        _WEIGHTS[size, cells] = w
    w = _WEIGHTS[size, cells]
    return w @ (rng.standard_normal((*lead, cells + 1, cells + 1), dtype=np.float32) * 0.6) @ w.T
