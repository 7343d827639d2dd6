"""The build side: raw dataset -> zarr tile store (``pipeline``, ``store``, ``integrity``) -> nested subsets
(``subsets``) -> WebDataset shards (``shard_plan``, ``shards``), each step a set of independent tasks of an executor
(``executors``: a local process pool or a Dask cluster)."""

from __future__ import annotations

from importlib import import_module

# the entry points, imported on first use: a shard-writing worker or ``maestro-data info`` should not pay for the
# readers' imports (rasterio, h5py) it never calls
_EXPORTS = {"BuildOptions": "pipeline", "build_store": "pipeline", "compute_subsets": "pipeline",
            "TileStore": "tile_store", "ShardOptions": "shards", "write_shards": "shards"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
