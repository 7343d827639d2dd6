"""Inference-only data: a folder in a dataset's layout without label files (``maestro-data build --no-targets``).

Such a store or shard index keeps the dataset's whole manifest (its text and sha256, so a checkpoint trained on
that dataset recognises it) but is marked ``labelled: false`` and holds no target arrays; everything that reads it
works on the manifest with its targets removed. Training refuses it, prediction accepts it.
"""

from __future__ import annotations

from dataclasses import replace

from maestro_data.manifest import Manifest


def without_targets(manifest: Manifest) -> Manifest:
    """``manifest`` with no target: readers read no label file, the store and shards hold no label array.

    The text and sha256 stay the dataset's own (``compare=False`` fields aside, a Manifest is its numbers)."""
    return replace(manifest, targets={})


def is_labelled(attrs_or_index: dict) -> bool:
    """Whether a store's attrs or a shard index hold labels (records written before the flag was: labelled)."""
    return bool(attrs_or_index.get("labelled", True))
