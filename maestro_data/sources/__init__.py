"""Readers of the four datasets' real published layouts (see ``base.Source`` for the contract)."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from maestro_data.errors import SourceError
from maestro_data.manifest import Manifest
from maestro_data.sources.base import Source, SourceOptions

# dataset name -> (module, class); imported lazily so one reader's dependency never slows another
READERS = {
    "treesatai-ts": ("maestro_data.sources.treesatai_ts", "TreeSatAITSSource"),
    "pastis-hd": ("maestro_data.sources.pastis_hd", "PastisHDSource"),
    "flair-hub": ("maestro_data.sources.flair", "FlairHubSource"),
    "flair2": ("maestro_data.sources.flair", "Flair2Source"),
}


def open_source(manifest: Manifest, root: str | Path, options: SourceOptions | None = None) -> Source:
    """The reader for ``manifest.name`` rooted at ``root``."""
    if manifest.name not in READERS:
        raise SourceError(f"no reader for dataset {manifest.name!r} (known: {', '.join(READERS)})")
    module, cls = READERS[manifest.name]
    return getattr(import_module(module), cls)(manifest, root, options)


__all__ = ["READERS", "Source", "SourceOptions", "open_source"]
