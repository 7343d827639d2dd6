"""TreeSatAI-TS in its real layout whose labels depend only on the Sentinel-2 temporal pattern (learning checks).

Starts from :mod:`maestro_data.synthetic.treesatai_ts` (MAESTRO CSV layout) and rewrites, per tile, the S2 time
series and the genus fractions: class ``early`` tiles are green around day 120, class ``late`` tiles around day
260 (cloud-free), and the label is one genus per class. Aerial and S1 carry no information
about the class, and neither does any single S2 date: a model must relate the spectrum to the acquisition date.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from maestro_data.manifest import BUILTIN_DIR
from maestro_data.synthetic import treesatai_ts

CLASSES = (("Picea", 120.0), ("Fagus", 260.0))  # (genus labelled 1, day of year of the green peak)
WIDTH_DAYS = 45.0
# per S2 band (B02 B03 B04 B05 B06 B07 B08 B8A B11 B12): how it follows the green bump (+ rises, - falls)
GREEN_EXPONENT = np.array([-1.0, -0.5, -1.0, 0.3, 1.0, 1.0, 1.0, 1.0, 0.0, -0.5])


def s2_series(doy: np.ndarray, peak: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """Reflectance x 1e4 ``[T, 10, size, size]`` green around ``peak``: red-edge/NIR bands rise and visible bands
    fall with a seasonal bump. A spectral change, not a brightness change: the patch embedding's GroupNorm
    normalises each date's overall brightness away."""
    bump = 0.3 + 1.4 * np.exp(-0.5 * ((doy - peak) / WIDTH_DAYS) ** 2)
    data = treesatai_ts.S2_MEAN[None, :, None, None] * bump[:, None, None, None] ** GREEN_EXPONENT[:, None, None]
    data = data * (1 + 0.05 * rng.standard_normal((len(doy), 1, size, size)))
    return np.clip(np.round(data), 1, 18000).astype(np.float32)


def _doy(product: str) -> int:
    stamp = product.split("_")[2]  # S2x_MSIL2A_<sensing time>_...
    return datetime.strptime(stamp, "%Y%m%dT%H%M%S").timetuple().tm_yday


def generate(out: str | Path, tiles: int = 40, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """Write the dataset under ``<out>/treesatai-ts``; returns (root, tile id -> class genus). Classes alternate
    in a seeded random order, so every split holds both."""
    root = treesatai_ts.generate(out, tiles=tiles, seed=seed, layout="csv")
    rng = np.random.default_rng([seed, 7])
    classes: dict[str, str] = {}
    for split in ("train", "val", "test"):
        path = root / f"{split}.csv"
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        fields = list(rows[0]) if rows else []
        for k, row in zip(rng.permutation(len(rows)), rows, strict=True):
            genus, peak = CLASSES[int(k) % len(CLASSES)]
            with h5py.File(root / "sentinel-ts" / row["sen_name"], "r+") as h5:
                doy = np.array([_doy(p.decode() if isinstance(p, bytes) else p) for p in h5["sen-2-products"][:]])
                data = h5["sen-2-data"]
                data[...] = s2_series(doy, peak, rng, data.shape[-1])
                masks = h5["sen-2-masks"]
                masks[...] = np.zeros(masks.shape, masks.dtype)
            for g in treesatai_ts.MAESTRO_GENERA:
                row[g] = "1.0" if g == genus else "0.0"
            classes[Path(row["aerial_name"]).stem] = genus
        if rows:
            with path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
    return root, classes


def sentinel_only_manifest(reference_date: str = "2019-07-01") -> str:
    """The built-in TreeSatAI-TS manifest without the aerial modality (fixed reference date instead of the aerial
    date): a model of Sentinel tokens only, cheap enough for CPU learning checks."""
    text = (BUILTIN_DIR / "treesatai-ts.toml").read_text(encoding="utf-8")
    head, _, rest = text.partition("[modalities.aerial]")
    _, _, tail = rest.partition("\n[modalities.")
    head = "\n".join(f'reference_date = "{reference_date}"' if line.startswith("reference_date") else line
                     for line in head.splitlines())
    return f"{head}\n[modalities.{tail}"
