"""Shard sets, loader runs and row comparisons shared by the stream tests (fixtures registered in conftest)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import MemorySource

import maestro_data.build.pipeline as build_mod
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.manifest import load_manifest
from maestro_data.stream.loader import StreamConfig, make_loader
from maestro_data.stream.reindex import reindex
from maestro_data.synthetic import generate

TREESAT = load_manifest("treesatai-ts")


def build_shards(root: Path, manifest, raw: Path, shard_bytes: int, percents=(5, 20)) -> Path:
    build_store(manifest, raw, root / "out", BuildOptions(block_tiles=8, quiet=True))
    compute_subsets(root / "out", percents)
    write_shards(root / "out", root / "shards", ShardOptions(shard_bytes=shard_bytes, quiet=True))
    return root / "shards"


@pytest.fixture(scope="module")
def mem(tmp_path_factory) -> Path:
    """30 TreeSat-shaped tiles with ragged T (3..92, so T < D occurs), NaN in S1, awkward ids, uneven shards."""
    root = tmp_path_factory.mktemp("mem")
    (root / "raw").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_mod, "open_source", lambda m, r, o=None: MemorySource(m, r, o, n=30))
        return build_shards(root, TREESAT, root / "raw", shard_bytes=1_500_000)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(dataset: str) -> Path:
        if dataset not in cache:
            root = tmp_path_factory.mktemp(dataset)
            raw = generate(dataset, root / "raw", tiles=5 if dataset in ("pastis-hd", "flair-hub") else 6)
            cache[dataset] = build_shards(root, load_manifest(dataset), raw, shard_bytes=1 << 30)
        return cache[dataset]

    return get


def run(index: Path, split: str = "train", manifest=TREESAT, rank=0, world_size=1, **kw) -> list[dict]:
    return list(make_loader(StreamConfig(str(index), split, **kw), manifest, rank=rank, world_size=world_size))


def rows(batches: list[dict]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """(tile id, crop) -> that row's arrays, for valid rows; a duplicate must be identical."""
    out: dict = {}
    for b in batches:
        for i in np.flatnonzero(b["valid"].numpy()):
            key = (b["tile_id"][i], int(b["crop_index"][i]))
            row = {k: v[i].numpy() for k, v in b.items() if isinstance(v, torch.Tensor)}
            if key in out:
                assert all(np.array_equal(out[key][k], row[k], equal_nan=True) for k in row), key
            out[key] = row
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["tile_id"] == y["tile_id"] and all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))
        for x, y in zip(a, b, strict=True))


def rewrite_member(shard: Path, edit, refresh: bool = True) -> None:
    """Rewrite a shard tar, passing every (name, bytes) through ``edit`` (None drops the member); with
    ``refresh`` the index and sidecar are rewritten to match (as a user who edited a shard would)."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            data = edit(member.name, src.extractfile(member).read())
            if data is not None:
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    shard.write_bytes(out.getvalue())
    if refresh:
        refresh_index(shard)


def refresh_index(shard: Path) -> None:
    """Make the index say the shard's new size and sha256, then rebuild its sidecars (``reindex``)."""
    root = next(p for p in shard.parents if (p / "index.json").exists())
    index = json.loads((root / "index.json").read_text())
    rel = shard.relative_to(root).as_posix()
    for info in index["splits"].values():
        for columns in info["tiers"].values():
            if rel in columns["url"]:
                i = columns["url"].index(rel)
                columns["bytes"][i] = shard.stat().st_size
                columns["sha256"][i] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (root / "index.json").write_text(json.dumps(index))
    reindex(root)


def edit_index(root: Path, edit) -> dict:
    """Rewrite ``root/index.json`` through ``edit(index)``; returns the edited index."""
    index = json.loads((root / "index.json").read_text())
    edit(index)
    (root / "index.json").write_text(json.dumps(index))
    return index


def read_sidecar(root: Path, rel: str) -> dict:
    """The sidecar of shard ``rel`` (a url of the index) as JSON."""
    return json.loads((root / rel.removesuffix(".tar")).with_suffix(".samples.json").read_text())


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
