"""An in-memory source with ragged time axes and awkward tile ids, for store and shard tests."""

from __future__ import annotations

import os
import signal
import zlib

import numpy as np
import pytest

import maestro_data.build.pipeline as build_mod
from maestro_data.dates import dates_array
from maestro_data.errors import SourceError
from maestro_data.sources.base import Source
from maestro_data.tile import Series, Tile, TileRef


class MemorySource(Source):
    """Deterministic random tiles with ragged time axes; ``bad`` tiles fail at read, ``missing`` at probe."""

    dataset = "treesatai-ts"

    def __init__(self, manifest, root, options=None, n=7, bad=(), missing=()):
        super().__init__(manifest, root, options)
        self.n, self.bad, self.missing = n, set(bad), set(missing)

    def check_layout(self):
        pass

    def list_tiles(self):
        return [TileRef(f"tile/{i}:é", ("train", "val", "test")[i % 3], fold=i % 5) for i in range(self.n)]

    def _t(self, ref, name):
        i = int(ref.tile_id.split("/")[1].split(":")[0])
        return 1 if self.manifest.modalities[name].temporal_bins == 1 else 3 + (i * 37) % 90

    def probe(self, ref):
        if ref.tile_id in self.missing:
            raise SourceError("aerial GeoTIFF is missing", tile_id=ref.tile_id, path="aerial/x.tif")
        ref.counts = {m: self._t(ref, m) for m in self.manifest.modalities}
        return ref

    def read(self, ref):
        if ref.tile_id in self.bad:
            raise SourceError("truncated HDF5", tile_id=ref.tile_id, path="sentinel-ts/x.h5")
        rng = np.random.default_rng(zlib.crc32(ref.tile_id.encode()))
        series = {}
        for name, spec in self.manifest.modalities.items():
            t = ref.counts[name]
            shape = (t, spec.stored_channels, spec.tile_size, spec.tile_size)
            if spec.dtype == "float32":
                data = rng.random(shape, dtype=np.float32)
                data[0, 0, 0, 0] = np.nan
            else:
                data = rng.integers(0, np.iinfo(spec.dtype).max, shape, dtype=spec.dtype)
            dates = dates_array([f"2019{1 + k % 12:02d}{1 + k % 28:02d}T{k % 24:02d}" for k in range(t)])
            mask = None
            if spec.cloud_mask:
                mask = rng.integers(0, 101, (t, len(spec.cloud_mask.bands), *shape[2:]), dtype=np.uint8)
            series[name] = Series(data, dates, mask)
        targets = {"treesat_mlc_thresh": rng.random(15, dtype=np.float32)}
        return Tile(ref.tile_id, ref.split, ref.fold, 7.9 + rng.random(), 52.9, np.array([2019, 182, 0], np.int16),
                    series, targets)


class DyingSource(MemorySource):
    """A MemorySource whose process is SIGKILLed the first time it reads ``victim`` (a Dask worker dying mid-block);
    the file ``flag`` says that it happened, so the rescheduled task reads the tile."""

    def __init__(self, manifest, root, options=None, flag="", victim="", **kw):
        super().__init__(manifest, root, options, **kw)
        self.flag, self.victim = flag, victim

    def read(self, ref):
        if ref.tile_id == self.victim and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(ref)


@pytest.fixture
def memory_source(monkeypatch):
    """Make every build read a MemorySource; the returned dict sets its keyword arguments (n, bad, missing)."""
    holder = {}

    def fake_open(manifest, root, options=None):
        return MemorySource(manifest, root, options, **holder)

    monkeypatch.setattr(build_mod, "open_source", fake_open)
    return holder
