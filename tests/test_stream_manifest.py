"""A modified manifest that changes only what the stream applies (e.g. D = 4 for S2) reads existing shards without a
rebuild; one that changes what was stored is refused."""

from __future__ import annotations

import pytest

from maestro_data.build.pipeline import BuildOptions, build_store
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.errors import MaestroError
from maestro_data.manifest import load_manifest, parse_manifest
from maestro_data.stream.loader import StreamConfig, make_loader

MANIFEST = load_manifest("treesatai-ts")


@pytest.fixture
def shards(tmp_path, memory_source):
    memory_source.update(n=8)
    (tmp_path / "raw").mkdir()
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(quiet=True))
    write_shards(tmp_path / "out", tmp_path / "shards", ShardOptions(quiet=True))
    return tmp_path / "shards"


def test_stream_time_changes_need_no_rebuild(shards):
    four_bins = parse_manifest(MANIFEST.text.replace("temporal_bins = 16", "temporal_bins = 4"))
    assert four_bins.sha256 != MANIFEST.sha256
    loader = make_loader(StreamConfig(str(shards), "train", mode="eval", batch_size=2, d4=False), four_bins)
    batch = next(iter(loader))
    assert tuple(batch["s2"].shape[:2]) == (2, 4) and tuple(batch["s2_dates"].shape) == (2, 4, 3)


def test_a_manifest_that_stores_other_bands_is_refused(shards):
    other = parse_manifest(MANIFEST.text.replace('bands = ["VV", "VH"]', 'bands = ["HH", "HV"]', 1))
    with pytest.raises(MaestroError, match="stored modalities or targets differ"):
        make_loader(StreamConfig(str(shards), "train", batch_size=2), other)
