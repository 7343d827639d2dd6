"""maestro_data: raw Earth-observation layouts -> zarr tile store -> subsets -> shards -> stream."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("maestro-eo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
