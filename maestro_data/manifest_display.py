"""The manifest's display-only keys: class colours of a target and the bands that make a modality's pictures.

They change no stored byte, no stream output and no model: neither manifest digest covers them (``DISPLAY_KEYS``),
so adding colours to a manifest leaves every built store, shard index and checkpoint matching it.

* ``targets.<t>.colors``: one ``#rrggbb`` per class, in class order (figures, GeoTIFF colour tables).
* ``modalities.<m>.display``: a table of band-name lists, ``rgb`` and ``false_color`` (three bands each, red,
  green, blue order) and ``hillshade`` (elevation bands, one shaded relief each).
"""

from __future__ import annotations

import re
from typing import Any

HEX_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
DISPLAY_KINDS = {"rgb": 3, "false_color": 3, "hillshade": 0}  # kind -> exact band count (0: one or more)
DISPLAY_KEYS = {"modalities": "display", "targets": "colors"}


def parse_colors(value: Any, classes: tuple[str, ...]) -> tuple[str, ...]:
    """``colors`` of a target: empty, or one ``#rrggbb`` string per class (ValueError says what is wrong)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of '#rrggbb' strings")
    if len(value) != len(classes):
        raise ValueError(f"{len(value)} colours for {len(classes)} classes (one per class, in class order)")
    bad = [v for v in value if not HEX_COLOUR.match(v)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a '#rrggbb' colour")
    return tuple(v.lower() for v in value)


def parse_display(value: Any, bands: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``display`` of a modality as ((kind, band names), ...) in the order written (ValueError when invalid)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError("expected a table such as { rgb = [\"R\", \"G\", \"B\"] }")
    out = []
    for kind, names in value.items():
        if kind not in DISPLAY_KINDS:
            raise ValueError(f"unknown view {kind!r} (valid: {', '.join(DISPLAY_KINDS)})")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{kind}: expected a list of band names")
        if DISPLAY_KINDS[kind] and len(names) != DISPLAY_KINDS[kind]:
            raise ValueError(f"{kind}: needs {DISPLAY_KINDS[kind]} bands, got {names}")
        unknown = [n for n in names if n not in bands]
        if unknown:
            raise ValueError(f"{kind}: {unknown[0]!r} is not a band of this modality ({', '.join(bands)})")
        out.append((kind, tuple(names)))
    return tuple(out)


def without_display(raw: dict) -> dict:
    """``raw`` (parsed manifest TOML) without its display-only keys: what the manifest digests cover."""
    out = dict(raw)
    for section, key in DISPLAY_KEYS.items():
        if isinstance(raw.get(section), dict):
            out[section] = {name: ({k: v for k, v in t.items() if k != key} if isinstance(t, dict) else t)
                            for name, t in raw[section].items()}
    return out
