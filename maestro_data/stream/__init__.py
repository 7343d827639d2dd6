"""The stream side: shard index (``index_format``, ``shard_read``), remote reads and the node cache (``remote``,
``cache``), epoch planning (``plan``), shard reading (``layout``, ``shard_table``), per-sample work (``temporal``,
``collate``, ``augment``), worker processes (``workers``, ``slots``, ``blocks``), the batch contract (``batch``) and
the move to the model's device (``device``); ``verify`` and ``reindex`` check and rewrite a shard set as it is read.
The loader's design is in ``loader``'s docstring."""

from __future__ import annotations

from importlib import import_module

# imported on first use: the build's shard writer needs the index format without importing torch
_EXPORTS = {"StreamConfig": "loader", "StreamLoader": "loader", "make_loader": "loader",
            "to_model_batch": "device"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
