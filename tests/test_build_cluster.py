"""Builds on a Dask cluster (a LocalCluster of 2 worker processes) give the store and the byte-identical shards of
the serial build, also when a worker is killed mid-build; a missing Dask is one line naming the extra."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from fakes import DyingSource, MemorySource

import maestro_data.build.pipeline as build_mod
from maestro_cli.data import main
from maestro_data.build.executors import DaskExecutor
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.location import Location, resolve_store
from maestro_data.manifest import load_manifest

MANIFEST = load_manifest("treesatai-ts")
TILES = 9
SHARD_BYTES = 900_000  # a few tiles per shard: several shards per tier


def store_arrays(out: str | Path | Location) -> dict[str, np.ndarray]:
    """Every array of a built store, decoded (the integrity records are not arrays)."""
    root = zarr.open_group(store=resolve_store(out).zarr_store(read_only=True), mode="r")
    arrays = {}
    for name, group in root.groups():
        if name.startswith("_"):
            continue
        for path, node in group.members(max_depth=None):
            if isinstance(node, zarr.Array):
                arrays[f"{name}/{path}"] = node[:]
    return arrays


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def files(where: Location) -> dict[str, bytes]:
    """Every file below a location with its bytes (the shard set: tars, sidecars, index)."""
    rels = sorted(where.sizes())
    return dict(zip(rels, where.read_many(rels).values(), strict=True))


def build_all(raw: Path, out: Path, executor=None) -> None:
    build_store(MANIFEST, raw, out, BuildOptions(quiet=True, block_tiles=2), executor=executor)
    compute_subsets(out, (20,))
    write_shards(out, out / "shards", ShardOptions(shard_bytes=SHARD_BYTES, quiet=True), executor=executor)


@pytest.fixture(scope="module")
def cluster():
    with DaskExecutor(workers=2) as executor:
        yield executor


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[Path, Path]:
    """(raw folder, serial build): the reference every cluster build must equal."""
    root = tmp_path_factory.mktemp("serial")
    (root / "raw").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_mod, "open_source", lambda m, r, o=None: MemorySource(m, r, o, n=TILES))
        build_all(root / "raw", root / "out")
    return root / "raw", root / "out"


def test_a_dask_build_equals_the_serial_build(cluster, serial, tmp_path, monkeypatch):
    raw, reference = serial
    monkeypatch.setattr(build_mod, "open_source", lambda m, r, o=None: MemorySource(m, r, o, n=TILES))
    build_all(raw, tmp_path / "out", executor=cluster)
    assert same_arrays(store_arrays(tmp_path / "out"), store_arrays(reference))
    shards = files(Location.of(tmp_path / "out" / "shards"))
    assert len([k for k in shards if k.endswith(".tar")]) > 3
    assert shards == files(Location.of(reference / "shards"))


def test_a_worker_killed_mid_build_is_replaced_and_the_result_is_the_same(cluster, serial, tmp_path, monkeypatch):
    raw, reference = serial
    flag = tmp_path / "died"
    monkeypatch.setattr(build_mod, "open_source", lambda m, r, o=None: DyingSource(
        m, r, o, n=TILES, flag=str(flag), victim="tile/5:é"))
    build_all(raw, tmp_path / "out", executor=cluster)
    assert flag.exists(), "no worker was killed"
    assert same_arrays(store_arrays(tmp_path / "out"), store_arrays(reference))
    assert files(Location.of(tmp_path / "out" / "shards")) == files(Location.of(reference / "shards"))


def test_without_dask_the_cli_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    (tmp_path / "raw").mkdir()
    args = ["build", "treesatai-ts", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--executor", "dask"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == ("Error: --executor dask needs Dask's distributed scheduler: "
                                                      "pip install maestro-eo[dask]")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, [*args, "--scheduler", "tcp://127.0.0.1:8786"])
    assert result.exit_code == 2 and "--scheduler needs --executor dask" in result.output
