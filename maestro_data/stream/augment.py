"""Pure geometry of augmentation: the dihedral group D4 on the last two axes, and crop windows on a tile.

D4 element ``k`` in 0..7 holds the official three coins as bits, applied in the official order
(``maestro/dataset/dataset.py::transform_rasters``): bit 0 flips H (rows), bit 1 flips W (columns), bit 2 then
swaps H and W. The same ``k`` applied to every raster of a sample (any sizes) and to its label rasters keeps
them aligned, because each operation maps the normalised position (y, x) in [0, 1]² the same way at every size.

Crops follow the official ``sample_gcd`` scheme: positions are whole units of the grid whose cell is the
greatest common divisor of every raster's tile size in pixels (inputs and segmentation targets), so a crop
origin falls on a pixel edge of every modality. Evaluation tiles the tile with ``repeats²`` non-overlapping
crops, row-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from maestro_data.errors import StreamError
from maestro_data.manifest import Manifest, ModalitySpec, TargetSpec

D4_ORDER = 8
_FLIP_H, _FLIP_W, _TRANSPOSE = 1, 2, 4


def _check_element(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < D4_ORDER:
        raise ValueError(f"D4 element must be an integer in 0..7, got {k!r}")
    return int(k)


def d4_apply(x: np.ndarray, k: int) -> np.ndarray:
    """Apply D4 element ``k`` to the last two axes of ``x``; returns a view (``np.ascontiguousarray`` copies).
    The transpose bit swaps the two axes, so non-square rasters change shape."""
    k = _check_element(k)
    if x.ndim < 2:
        raise ValueError(f"D4 acts on the last two axes; got an array of shape {x.shape}")
    if k & _FLIP_H:
        x = x[..., ::-1, :]
    if k & _FLIP_W:
        x = x[..., :, ::-1]
    if k & _TRANSPOSE:
        x = np.swapaxes(x, -1, -2)
    return x


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    """Composition and inverse tables, derived by acting on a probe with 9 distinct values (no hand-typed table)."""
    probe = np.arange(9).reshape(3, 3)
    images = [d4_apply(probe, k) for k in range(D4_ORDER)]

    def index_of(img: np.ndarray) -> int:
        return next(k for k, ref in enumerate(images) if np.array_equal(ref, img))

    compose = np.array([[index_of(d4_apply(images[b], a)) for b in range(D4_ORDER)] for a in range(D4_ORDER)])
    inverse = np.array([int(np.flatnonzero(compose[a] == 0)[0]) for a in range(D4_ORDER)])
    return compose, inverse


_COMPOSE, _INVERSE = _build_tables()


def d4_compose(a: int, b: int) -> int:
    """The element ``c`` with ``d4_apply(x, c) == d4_apply(d4_apply(x, b), a)`` (first ``b``, then ``a``)."""
    return int(_COMPOSE[_check_element(a), _check_element(b)])


def d4_inverse(k: int) -> int:
    """The element undoing ``k``."""
    return int(_INVERSE[_check_element(k)])


def random_d4(rng: np.random.Generator) -> int:
    """One uniformly drawn D4 element (the three official fair coins)."""
    return int(rng.integers(D4_ORDER))


@dataclass(frozen=True)
class CropGrid:
    """The common crop grid of a manifest: ``unit_m`` metres per cell, tile and crop sizes in cells,
    and pixels per cell for every raster (modalities and segmentation targets)."""

    unit_m: float
    tile_units: int
    crop_units: int
    px_per_unit: dict[str, int]

    @property
    def max_origin_units(self) -> int:
        return self.tile_units - self.crop_units


def _rasters(manifest: Manifest) -> dict[str, ModalitySpec | TargetSpec]:
    out: dict[str, ModalitySpec | TargetSpec] = dict(manifest.modalities)
    for name, t in manifest.targets.items():
        if t.type == "segmentation":
            if name in out:
                raise StreamError(f"manifest {manifest.name}: target {name!r} has the name of a modality")
            out[name] = t
    return out


def crop_grid(manifest: Manifest) -> CropGrid:
    """The GCD grid of every raster's tile size (PASTIS-HD: 128 cells of 10 m; FLAIR-HUB: 2 of 51.2 m)."""
    sizes = {name: int(spec.tile_size) for name, spec in _rasters(manifest).items()}
    tile_units = reduce(math.gcd, sizes.values())
    unit_m = manifest.tile_m / tile_units
    crop_units = manifest.crop_m / unit_m
    if not math.isclose(crop_units, round(crop_units), abs_tol=1e-6) or round(crop_units) < 1:
        raise StreamError(f"manifest {manifest.name}: crop_m {manifest.crop_m} is not a whole number of "
                          f"{unit_m} m grid cells (the GCD grid of {sizes})")
    return CropGrid(unit_m=unit_m, tile_units=tile_units, crop_units=round(crop_units),
                    px_per_unit={name: size // tile_units for name, size in sizes.items()})


def random_crop_origin(rng: np.random.Generator, grid: CropGrid | Manifest) -> tuple[float, float]:
    """A uniformly drawn crop origin (y, x) in metres from the tile's top-left corner, on the common grid (pass the
    ``crop_grid`` once computed: per-sample callers should not rebuild it)."""
    if not isinstance(grid, CropGrid):
        grid = crop_grid(grid)
    row, col = rng.integers(0, grid.max_origin_units + 1, size=2)
    return float(row * grid.unit_m), float(col * grid.unit_m)


def eval_crop_origins(manifest: Manifest) -> list[tuple[float, float]]:
    """The ``repeats²`` non-overlapping evaluation crops (y, x) in metres, row-major (official order)."""
    grid = crop_grid(manifest)
    r = manifest.repeats
    return [(float((i * grid.tile_units // r) * grid.unit_m), float((j * grid.tile_units // r) * grid.unit_m))
            for i in range(r) for j in range(r)]


def crop_window(spec: ModalitySpec | TargetSpec, origin_m: tuple[float, float]) -> tuple[int, int, int]:
    """(row, col, size) in ``spec``'s pixels of the crop at ``origin_m``; raises StreamError off-grid or out of
    the tile."""
    if spec.resolution_m is None or spec.tile_size is None:
        raise StreamError(f"{spec.name!r} is not a raster: it has no crop window")
    size = int(spec.image_size)
    out = []
    for axis, metres in zip(("row", "col"), origin_m, strict=True):
        px = metres / spec.resolution_m
        if not math.isclose(px, round(px), abs_tol=1e-6):
            raise StreamError(f"{spec.name!r}: crop origin {metres} m is not on its {spec.resolution_m} m "
                              "pixel grid")
        px = round(px)
        if px < 0 or px + size > spec.tile_size:
            raise StreamError(f"{spec.name!r}: crop {axis} {px}..{px + size} px is outside the "
                              f"{spec.tile_size} px tile")
        out.append(px)
    return out[0], out[1], size
