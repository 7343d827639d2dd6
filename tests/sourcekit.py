"""Helpers for the readers' defect tests: build with --on-error fail / skip and check every other tile survives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from maestro_data.build.pipeline import BuildOptions, build_store
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import SourceError
from maestro_data.manifest import Manifest
from maestro_data.sources import SourceOptions, open_source


def damaged_copy(clean: Path, dst: Path) -> Path:
    """A private copy of a generated dataset, to damage while ``clean`` stays the reference."""
    return Path(shutil.copytree(clean, dst))


def build_fails(manifest: Manifest, root: Path, out: Path, *needles: str) -> str:
    """A default (--on-error fail) build raises a SourceError holding every needle; returns the message."""
    with pytest.raises(SourceError) as info:
        build_store(manifest, root, out, BuildOptions(quiet=True))
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    return str(info.value)


def build_skips(manifest: Manifest, root: Path, out: Path, skipped: dict[str, list[str]]) -> dict:
    """An --on-error skip build completes and reports exactly the ``skipped`` tiles, each reason holding its
    needles; returns the report."""
    report = build_store(manifest, root, out, BuildOptions(quiet=True, on_error="skip"))
    got = {s["tile_id"]: s["reason"] for s in report["skipped"]}
    assert set(got) == set(skipped), report["skipped"]
    for tile_id, needles in skipped.items():
        for needle in needles:
            assert needle in got[tile_id], f"{needle!r} not in {got[tile_id]}"
    return report


def assert_others_unchanged(manifest: Manifest, out: Path, clean: Path, absent: set[str]) -> int:
    """Every tile of the undamaged ``clean`` dataset but ``absent`` is in the store at ``out``, decoded values equal
    to what the reader reads from ``clean``; returns how many were compared."""
    store = TileStore(out)
    source = open_source(manifest, clean, SourceOptions(on_error="skip"))
    refs = [r for r in source.list_tiles() if r.tile_id not in absent]
    written = {t for t, ok in zip(store.tile_ids, store.valid, strict=True) if ok}
    assert written == {r.tile_id for r in refs}
    for ref in refs:
        want, got = source.read(source.probe(ref)), store.read_tile(ref.tile_id)
        assert got.split == want.split
        for name, series in want.series.items():
            assert np.array_equal(got.series[name].data, series.data, equal_nan=True), (ref.tile_id, name)
            assert np.array_equal(got.series[name].dates, series.dates), (ref.tile_id, name)
            if series.mask is not None:
                assert np.array_equal(got.series[name].mask, series.mask), (ref.tile_id, name)
        for name, target in want.targets.items():
            assert np.array_equal(got.targets[name], target), (ref.tile_id, name)
    assert refs
    return len(refs)
