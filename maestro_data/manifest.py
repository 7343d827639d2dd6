"""Load and validate a dataset manifest (``manifests/<dataset>.toml``) into frozen dataclasses.

The manifest is the single source of truth for every per-modality number (paper Tables 2 and 5-7, official
configuration): the builder, the stream and the model all read it, and nothing re-types these numbers.
Every inconsistency is reported as a :class:`ManifestError` that names the offending key.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from maestro_data.errors import ManifestError
from maestro_data.manifest_display import parse_colors, parse_display, without_display

SCHEMA_VERSION = 1
BUILTIN_DIR = Path(__file__).resolve().parent / "manifests"
STORED_DTYPES = ("uint8", "uint16", "int16", "float32")
TARGET_TYPES = ("multilabel", "segmentation")


@dataclass(frozen=True)
class CloudMaskSpec:
    """Per-date snow/cloud probability rasters stored beside a modality (values 0-100)."""

    source: str
    bands: tuple[str, ...]
    dtype: str
    threshold: float


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    source: str
    dtype: str
    bands: tuple[str, ...]
    select: tuple[int, ...]
    resolution_m: float
    image_size: int
    patch_size: int
    temporal_bins: int
    norm_factor: float
    log_scale: bool
    rescale_elev: bool
    norm_groups: tuple[int, ...]
    fusion_group: str
    cloud_mask: CloudMaskSpec | None
    tile_size: int
    model_image_size: int = 0   # what the model resizes each date to (0: image_size, no resize)
    embed: str = ""             # patch embedding / pixel head shared under this name (official name_embed)
    display: tuple[tuple[str, tuple[str, ...]], ...] = ()  # figures only: ((view, band names), ...)

    @property
    def stored_channels(self) -> int:
        return len(self.bands)

    @property
    def channels(self) -> int:
        """Channels the model receives (after band selection/reorder)."""
        return len(self.select)

    @property
    def model_size(self) -> int:
        """Side in pixels of what the model tokenizes (the official model resizes every input to it)."""
        return self.model_image_size or self.image_size

    @property
    def embed_name(self) -> str:
        return self.embed or self.name

    @property
    def grid_size(self) -> int:
        return self.model_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.temporal_bins * self.grid_size**2

    @property
    def model_bands(self) -> tuple[str, ...]:
        return tuple(self.bands[i] for i in self.select)

    def view(self, kind: str) -> tuple[int, ...]:
        """Stored band indices of display view ``kind`` (``rgb``, ``false_color``, ``hillshade``); () if none."""
        names = dict(self.display).get(kind, ())
        return tuple(self.bands.index(n) for n in names)


@dataclass(frozen=True)
class TargetSpec:
    name: str
    type: str
    source: str
    classes: tuple[str, ...]
    num_classes: int
    ignore: tuple[int, ...]
    missing_value: int
    threshold: float | None
    resolution_m: float | None
    dtype: str
    tile_size: int | None
    image_size: int | None
    colors: tuple[str, ...] = ()  # figures only: one "#rrggbb" per class


@dataclass(frozen=True)
class SplitSpec:
    names: tuple[str, ...]
    pretrain: tuple[str, ...]
    source: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Manifest:
    name: str
    title: str
    tile_m: float
    crop_m: float
    grid_pos_enc: int
    ref_input: str | None
    reference_date: str
    location_crs: str
    splits: SplitSpec
    modalities: dict[str, ModalitySpec] = field(hash=False)
    targets: dict[str, TargetSpec] = field(hash=False)
    sha256: str = ""
    storage_sha256: str = ""
    text: str = field(default="", repr=False, compare=False, hash=False)

    @property
    def repeats(self) -> int:
        """Crops per tile side (PASTIS-HD: 8, i.e. 64 crops of 160 m per 1280 m tile)."""
        return round(self.tile_m / self.crop_m)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Fusion groups in order of first appearance of their modalities."""
        out: dict[str, list[str]] = {}
        for m in self.modalities.values():
            out.setdefault(m.fusion_group, []).append(m.name)
        return {k: tuple(v) for k, v in out.items()}

    def reference_date_tuple(self) -> tuple[int, int, int] | None:
        """The fixed reference date as (year, day of year, hour), or None when taken from a modality."""
        if self.reference_date in self.modalities:
            return None
        d = date.fromisoformat(self.reference_date)
        return d.year, d.timetuple().tm_yday, 0


_TOP_KEYS = {
    "schema", "extends", "name", "title", "tile_m", "crop_m", "grid_pos_enc", "ref_input", "reference_date",
    "location_crs", "splits", "modalities", "targets",
}
_MOD_KEYS = {
    "source", "dtype", "bands", "select", "resolution_m", "image_size", "patch_size", "temporal_bins",
    "norm_factor", "log_scale", "rescale_elev", "norm_groups", "fusion_group", "cloud_mask", "model_image_size",
    "embed", "display",
}
_MASK_KEYS = {"source", "bands", "dtype", "threshold"}
_TARGET_KEYS = {
    "type", "source", "classes", "num_classes", "ignore", "missing_value", "threshold", "resolution_m", "dtype",
    "colors",
}
_SPLIT_KEYS = {"names", "pretrain", "source", "options"}


class _Reader:
    """Typed access to one TOML table that names the full key path in every error."""

    def __init__(self, table: dict[str, Any], path: str, allowed: set[str], origin: str):
        self.table, self.path, self.origin = table, path, origin
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.error(unknown[0], f"unknown key (valid keys: {', '.join(sorted(allowed))})")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ManifestError:
        return ManifestError(f"{self.origin}: {self.key(name)}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if name not in self.table:
            if default is ...:
                raise self.error(name, "missing required key")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_kind_name(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_kind_name(kinds)}, got {value!r}")
        return value

    def positive(self, name: str, kind: type, default: Any = ...) -> Any:
        value = self.get(name, kind, default)
        if value is not None and value <= 0:
            raise self.error(name, f"must be > 0, got {value!r}")
        return value

    def str_list(self, name: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(name, list, default)
        if not all(isinstance(v, str) for v in value):
            raise self.error(name, "expected a list of strings")
        return tuple(value)

    def int_list(self, name: str, default: Any = ...) -> tuple[int, ...]:
        value = self.get(name, list, default)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.error(name, "expected a list of integers")
        return tuple(value)


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join({str: "a string", int: "an integer", float: "a number", bool: "true/false",
                        list: "a list", dict: "a table"}.get(k, k.__name__) for k in kinds)


def _whole(value: float, unit: float) -> int | None:
    """value/unit as an int when it is one (tolerating float noise in metres), else None."""
    ratio = value / unit
    return round(ratio) if math.isclose(ratio, round(ratio), rel_tol=0, abs_tol=1e-6) else None


def _parse_modality(name: str, table: dict, origin: str, tile_m: float, crop_m: float) -> ModalitySpec:
    r = _Reader(table, f"modalities.{name}", _MOD_KEYS, origin)
    dtype = r.get("dtype", str)
    if dtype not in STORED_DTYPES:
        raise r.error("dtype", f"must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    bands = r.str_list("bands")
    if not bands or len(set(bands)) != len(bands):
        raise r.error("bands", "must be a non-empty list of distinct band names")
    select = r.int_list("select", tuple(range(len(bands))))
    if not select or any(not 0 <= i < len(bands) for i in select) or len(set(select)) != len(select):
        raise r.error("select", f"must list distinct indices into the {len(bands)} stored bands, got {list(select)}")
    resolution = r.positive("resolution_m", float)
    image_size = r.positive("image_size", int)
    patch_size = r.positive("patch_size", int)
    model_size = r.positive("model_image_size", int, image_size)
    if model_size % patch_size:
        size_key = "model_image_size" if "model_image_size" in table else "image_size"
        raise r.error(size_key, f"{model_size} is not divisible by patch_size {patch_size}")
    crop_px = _whole(crop_m, resolution)
    if crop_px is None:
        raise r.error("resolution_m", f"crop_m {crop_m} is not a multiple of the pixel size {resolution} m")
    if crop_px != image_size:
        raise r.error("image_size", f"{image_size} px but crop_m {crop_m} / resolution_m {resolution} = {crop_px} px")
    tile_px = _whole(tile_m, resolution)
    if tile_px is None:
        raise r.error("resolution_m", f"tile_m {tile_m} is not a multiple of the pixel size {resolution} m")
    norm_groups = r.int_list("norm_groups", (len(select),))
    if any(g <= 0 for g in norm_groups) or sum(norm_groups) != len(select):
        raise r.error("norm_groups", f"{list(norm_groups)} must be positive and sum to the {len(select)} selected "
                                     "channels")
    mask = None
    if "cloud_mask" in table:
        mt = r.get("cloud_mask", dict)
        mr = _Reader(mt, r.key("cloud_mask"), _MASK_KEYS, origin)
        mdtype = mr.get("dtype", str, "uint8")
        if mdtype not in STORED_DTYPES:
            raise mr.error("dtype", f"must be one of {', '.join(STORED_DTYPES)}, got {mdtype!r}")
        threshold = mr.get("threshold", float)
        if not 0 <= threshold <= 100:
            raise mr.error("threshold", f"must be a probability in [0, 100], got {threshold}")
        mbands = mr.str_list("bands")
        if not mbands:
            raise mr.error("bands", "must name at least one mask band")
        mask = CloudMaskSpec(mr.get("source", str), mbands, mdtype, threshold)
    try:
        display = parse_display(table.get("display"), bands)
    except ValueError as exc:
        raise r.error("display", str(exc)) from None
    return ModalitySpec(
        name=name, source=r.get("source", str), dtype=dtype, bands=bands, select=select, resolution_m=resolution,
        image_size=image_size, patch_size=patch_size, temporal_bins=r.positive("temporal_bins", int),
        norm_factor=r.positive("norm_factor", float), log_scale=r.get("log_scale", bool, False),
        rescale_elev=r.get("rescale_elev", bool, False), norm_groups=norm_groups,
        fusion_group=r.get("fusion_group", str, name), cloud_mask=mask, tile_size=tile_px,
        model_image_size=model_size if model_size != image_size else 0, embed=r.get("embed", str, ""),
        display=display,
    )


def _parse_target(name: str, table: dict, origin: str, tile_m: float, crop_m: float) -> TargetSpec:
    r = _Reader(table, f"targets.{name}", _TARGET_KEYS, origin)
    kind = r.get("type", str)
    if kind not in TARGET_TYPES:
        raise r.error("type", f"must be one of {', '.join(TARGET_TYPES)}, got {kind!r}")
    classes = r.str_list("classes")
    if not classes:
        raise r.error("classes", "must list at least one class")
    num_classes = r.positive("num_classes", int, len(classes))
    if num_classes > len(classes):
        raise r.error("num_classes", f"{num_classes} exceeds the {len(classes)} listed classes")
    ignore = r.int_list("ignore", ())
    bad = [i for i in ignore if not 0 <= i < len(classes)]
    if bad:
        raise r.error("ignore", f"{bad} are not class indices (0..{len(classes) - 1})")
    missing = r.get("missing_value", int, -1)
    if 0 <= missing < num_classes:
        raise r.error("missing_value", f"{missing} collides with a trained class (0..{num_classes - 1})")
    threshold = resolution = tile_px = image_px = None
    if kind == "multilabel":
        threshold = r.get("threshold", float, 0.0)
        dtype = r.get("dtype", str, "float32")
    else:
        unreachable = [k for k in range(num_classes, len(classes)) if k not in ignore and k != missing]
        if unreachable:
            raise r.error("ignore", f"classes {unreachable} are >= num_classes {num_classes} but not ignored")
        resolution = r.positive("resolution_m", float)
        image_px = _whole(crop_m, resolution)
        tile_px = _whole(tile_m, resolution)
        if image_px is None or tile_px is None:
            raise r.error("resolution_m", f"tile_m {tile_m} / crop_m {crop_m} are not multiples of {resolution} m")
        dtype = r.get("dtype", str, "uint8")
    if dtype not in STORED_DTYPES:
        raise r.error("dtype", f"must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    try:
        colors = parse_colors(table.get("colors"), classes)
    except ValueError as exc:
        raise r.error("colors", str(exc)) from None
    return TargetSpec(name=name, type=kind, source=r.get("source", str), classes=classes, num_classes=num_classes,
                      ignore=ignore, missing_value=missing, threshold=threshold, resolution_m=resolution,
                      dtype=dtype, tile_size=tile_px, image_size=image_px, colors=colors)


def parse_manifest(text: str, origin: str = "<manifest>") -> Manifest:
    """Parse and validate manifest TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {exc}") from exc
    if "extends" in raw:
        raw = _extend(raw, origin)
    r = _Reader(raw, "", _TOP_KEYS, origin)
    schema = r.get("schema", int)
    if schema != SCHEMA_VERSION:
        raise r.error("schema", f"unsupported manifest schema {schema} (this toolkit reads {SCHEMA_VERSION})")
    tile_m = r.positive("tile_m", float)
    crop_m = r.positive("crop_m", float)
    if _whole(tile_m, crop_m) is None:
        raise r.error("crop_m", f"tile_m {tile_m} is not a whole multiple of crop_m {crop_m}")
    mods_raw = r.get("modalities", dict)
    if not mods_raw:
        raise r.error("modalities", "must define at least one modality")
    modalities = {}
    for name, table in mods_raw.items():
        if not isinstance(table, dict):
            raise r.error(f"modalities.{name}", "expected a table")
        modalities[name] = _parse_modality(name, table, origin, tile_m, crop_m)
    targets = {}
    for name, table in r.get("targets", dict, {}).items():
        if not isinstance(table, dict):
            raise r.error(f"targets.{name}", "expected a table")
        targets[name] = _parse_target(name, table, origin, tile_m, crop_m)
    ref_input = r.get("ref_input", str, "") or None
    if ref_input is not None and ref_input not in modalities:
        raise r.error("ref_input", f"{ref_input!r} is not a modality ({', '.join(modalities)})")
    for t in targets.values():
        if t.type == "segmentation":
            if ref_input is None:
                raise r.error("ref_input", f"segmentation target {t.name!r} needs a reference modality")
            grid = modalities[ref_input].grid_size
            if t.image_size % grid:
                raise r.error(f"targets.{t.name}.resolution_m",
                              f"target crop of {t.image_size} px is not divisible by the {ref_input} token grid {grid}")
    reference_date = r.get("reference_date", str)
    if reference_date in modalities:
        if modalities[reference_date].temporal_bins != 1:
            raise r.error("reference_date", f"modality {reference_date!r} is a time series, not a single date")
    else:
        try:
            date.fromisoformat(reference_date)
        except ValueError:
            raise r.error("reference_date", f"{reference_date!r} is neither a modality nor a YYYY-MM-DD date") from None
    grid_pos_enc = r.positive("grid_pos_enc", int)
    _check_shared_embeddings(modalities, origin)
    sr = _Reader(r.get("splits", dict), "splits", _SPLIT_KEYS, origin)
    names = sr.str_list("names")
    pretrain = sr.str_list("pretrain")
    if not set(pretrain) <= set(names):
        raise sr.error("pretrain", f"{list(pretrain)} must be among the split names {list(names)}")
    splits = SplitSpec(names=names, pretrain=pretrain, source=sr.get("source", str),
                       options=dict(sr.get("options", dict, {})))
    # display keys (colours, views) change no stored byte and no model: the digests leave them out
    canonical = json.dumps(without_display(raw), sort_keys=True, separators=(",", ":"), default=str)
    storage = json.dumps(_storage_fields(raw), sort_keys=True, separators=(",", ":"), default=str)
    return Manifest(
        name=r.get("name", str), title=r.get("title", str, raw.get("name", "")), tile_m=tile_m, crop_m=crop_m,
        grid_pos_enc=grid_pos_enc, ref_input=ref_input, reference_date=reference_date,
        location_crs=r.get("location_crs", str), splits=splits, modalities=modalities, targets=targets,
        sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        storage_sha256=hashlib.sha256(storage.encode()).hexdigest(), text=text,
    )


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _extend(raw: dict, origin: str) -> dict:
    """A variant manifest: ``extends = "<built-in name>"`` plus the keys it changes (tables merged key by key).

    Only built-in bases, so that the variant's text (stored in stores, indexes and checkpoints) reads the same on
    every machine; the digests cover the merged result, so a changed base is noticed.
    """
    base_name = raw.pop("extends")
    if not isinstance(base_name, str) or not (BUILTIN_DIR / f"{base_name}.toml").is_file():
        raise ManifestError(f"{origin}: extends: {base_name!r} is not a built-in manifest "
                            f"({', '.join(builtin_manifests())})")
    base = tomllib.loads((BUILTIN_DIR / f"{base_name}.toml").read_text(encoding="utf-8"))
    if "extends" in base:
        raise ManifestError(f"{origin}: extends: {base_name!r} itself extends another manifest")
    for section in ("modalities", "targets"):
        unknown = sorted(set(raw.get(section, {})) - set(base.get(section, {})))
        if unknown:
            raise ManifestError(f"{origin}: {section}.{unknown[0]}: not in the base manifest {base_name!r}")
    return _merge(base, raw)


def _check_shared_embeddings(modalities: dict[str, ModalitySpec], origin: str) -> None:
    """Modalities sharing one patch embedding (``embed``) must feed it tensors of one shape."""
    first: dict[str, ModalitySpec] = {}
    for m in modalities.values():
        other = first.setdefault(m.embed_name, m)
        if other is m:
            continue
        for attr in ("channels", "patch_size", "norm_groups", "model_size"):
            if getattr(m, attr) != getattr(other, attr):
                raise ManifestError(f"{origin}: modalities.{m.name}.embed: shares {m.embed_name!r} with "
                                    f"{other.name!r} but its {attr} is {getattr(m, attr)}, not {getattr(other, attr)}")


# What a build writes depends only on these keys; everything else (bins, crops, normalisation, band selection,
# groups, thresholds, ignored labels) is applied at stream time, so a manifest differing elsewhere reads the same
# store and shards without a rebuild.
_STORED_MODALITY_KEYS = ("source", "dtype", "bands", "resolution_m")
_STORED_MASK_KEYS = ("source", "bands", "dtype")
_STORED_TARGET_KEYS = ("type", "source", "classes", "dtype", "resolution_m")


def _storage_fields(raw: dict) -> dict:
    mods = {}
    for name, m in raw["modalities"].items():
        entry = {k: m.get(k) for k in _STORED_MODALITY_KEYS}
        if "cloud_mask" in m:
            entry["cloud_mask"] = {k: m["cloud_mask"].get(k) for k in _STORED_MASK_KEYS}
        mods[name] = entry
    targets = {name: {k: t.get(k) for k in _STORED_TARGET_KEYS} for name, t in raw.get("targets", {}).items()}
    return {"name": raw["name"], "tile_m": raw["tile_m"], "location_crs": raw["location_crs"],
            "reference_date": raw["reference_date"], "splits": raw["splits"], "modalities": mods, "targets": targets}


def builtin_manifests(variants: bool = True) -> list[str]:
    """Names of the manifests shipped with the toolkit (``variants=False``: the datasets only, without the
    ``extends`` variants that change how a model reads a dataset, e.g. ``treesatai-ts-from-flair-hub``)."""
    paths = sorted(BUILTIN_DIR.glob("*.toml"))
    return [p.stem for p in paths if variants or "extends" not in tomllib.loads(p.read_text(encoding="utf-8"))]


def load_manifest(name_or_path: str | Path) -> Manifest:
    """Load a built-in manifest by dataset name (``flair-hub``) or any manifest file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        candidate = BUILTIN_DIR / f"{name_or_path}.toml"
        if not candidate.is_file():
            raise ManifestError(f"no manifest file {str(name_or_path)!r} and no built-in manifest of that name "
                                f"(built-in: {', '.join(builtin_manifests())})")
        path = candidate
    return parse_manifest(path.read_text(encoding="utf-8"), origin=str(path))
