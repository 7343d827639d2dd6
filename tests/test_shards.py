"""Shards: bit-exact round trip (tarfile and webdataset), deterministic bytes, atomic index, reading over HTTP,
and every corruption verify must catch."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from fakes import MemorySource
from hypothesis import given
from hypothesis import strategies as st
from streamkit import edit_index, read_sidecar

import maestro_data.build.shards as shards_mod
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import ShardError
from maestro_data.manifest import load_manifest
from maestro_data.stream.index_format import sample_key, shard_entries, tile_id_of
from maestro_data.stream.shard_read import iter_samples, open_index, read_shard, shard_url
from maestro_data.stream.verify import verify

MANIFEST = load_manifest("treesatai-ts")


@pytest.fixture
def built(tmp_path, memory_source):
    memory_source.update(n=30)
    (tmp_path / "raw").mkdir()
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(block_tiles=8, quiet=True))
    compute_subsets(tmp_path / "out", (5, 20))
    return tmp_path / "out"


def _all_samples(index_dir):
    index, loc = open_index(index_dir)
    out = {}
    for split in index["splits"]:
        for entry in shard_entries(index, split):
            for sample in read_shard(shard_url(loc, entry["url"])):
                out[sample["tile_id"]] = sample
    return index, out


def test_round_trip_through_tarfile_and_webdataset(built, tmp_path):
    index = write_shards(built, tmp_path / "shards", ShardOptions(shard_bytes=300_000, quiet=True))
    store = TileStore(built)
    assert sum(s["samples"] for s in index["splits"].values()) == len(store)
    # plain tarfile + np.load, as any user could
    seen = set()
    for split in index["splits"]:
        for entry in shard_entries(index, split):
            sidecar = read_sidecar(tmp_path / "shards", entry["url"])
            with tarfile.open(tmp_path / "shards" / entry["url"]) as tar:
                names = tar.getnames()
                for key, tile_id in zip(sidecar["keys"], sidecar["tile_ids"], strict=True):
                    assert tile_id_of(key) == tile_id
                    tile = store.read_tile(tile_id)
                    meta = json.loads(tar.extractfile(f"{key}.json").read())
                    assert meta["tile_id"] == tile_id and meta["split"] == tile.split
                    for name, series in tile.series.items():
                        data = np.load(io.BytesIO(tar.extractfile(f"{key}.{name}.npy").read()))
                        assert data.dtype == series.data.dtype
                        assert np.array_equal(data, series.data, equal_nan=True)
                        dates = np.load(io.BytesIO(tar.extractfile(f"{key}.{name}_dates.npy").read()))
                        assert np.array_equal(dates, series.dates)
                    seen.add(tile_id)
                assert len(names) == len(set(names))
    assert seen == set(store.tile_ids)
    # the webdataset reader sees the same samples
    import webdataset as wds

    urls = [str(tmp_path / "shards" / e["url"]) for s in index["splits"] for e in shard_entries(index, s)]
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        tile = store.read_tile(tile_id_of(sample["__key__"]))
        assert np.array_equal(sample["s2.npy"], tile.series["s2"].data)
        assert np.array_equal(sample["s2_mask.npy"], tile.series["s2"].mask)
        assert sample["json"]["tile_id"] == tile.tile_id
        count += 1
    assert count == len(store)


def test_tiers_are_nested_subsets_without_duplicated_bytes(built, tmp_path):
    index = write_shards(built, tmp_path / "shards", ShardOptions(quiet=True))
    store = TileStore(built)
    for split in ("train", "val", "test"):
        order, counts = store.subsets(split)
        ids = {p: [e for entry in shard_entries(index, split, p)
                   for e in read_sidecar(tmp_path / "shards", entry["url"])["tile_ids"]] for p in (5, 20, 100)}
        assert len(ids[5]) == counts[5] and len(ids[20]) == counts[20]
        assert set(ids[5]) <= set(ids[20]) <= set(ids[100])
        assert len(ids[100]) == len(set(ids[100])) == len(store.split_indices(split))
        assert set(ids[20]) == {store.tile_ids[i] for i in order[:counts[20]]}
    with pytest.raises(ShardError, match="no 7 % subset"):
        shard_entries(index, "train", 7)


def test_rewrite_is_byte_identical(built, tmp_path):
    a = write_shards(built, tmp_path / "a", ShardOptions(shard_bytes=200_000, quiet=True))
    b = write_shards(built, tmp_path / "b", ShardOptions(shard_bytes=200_000, quiet=True))
    assert json.dumps(a["splits"]) == json.dumps(b["splits"])
    for path in (tmp_path / "a").rglob("*.tar"):
        other = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(other.read_bytes()).digest()
    write_shards(built, tmp_path / "c", ShardOptions(shard_bytes=200_000, seed=1, quiet=True))
    first = a["splits"]["train"]["tiers"]["100"]["url"][0]
    assert read_sidecar(tmp_path / "c", first)["tile_ids"] != read_sidecar(tmp_path / "a", first)["tile_ids"]
    assert [p.name for p in (tmp_path / "a").rglob("*.samples.json")]


def test_interrupted_writing_leaves_no_index_and_a_rerun_completes(built, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    calls = {"n": 0}
    original = shards_mod._ShardWriter.add

    def dying_add(self, tile_id, members):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt("killed")
        original(self, tile_id, members)

    monkeypatch.setattr(shards_mod._ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        write_shards(built, out, ShardOptions(shard_bytes=100_000, quiet=True))
    assert not (out / "index.json").exists()
    with pytest.raises(ShardError, match="no shard index"):
        verify(out)
    monkeypatch.setattr(shards_mod._ShardWriter, "add", original)
    write_shards(built, out, ShardOptions(shard_bytes=100_000, quiet=True))
    assert verify(out, full=True) == []
    assert not list(out.rglob("*.tmp"))


@pytest.fixture
def http_server(tmp_path):
    from faultserver import FaultServer

    with FaultServer(tmp_path) as server:
        yield server.url


def test_reading_and_verifying_over_http(built, tmp_path, http_server):
    write_shards(built, tmp_path / "shards", ShardOptions(shard_bytes=300_000, quiet=True))
    url = f"{http_server}/shards/index.json"
    assert verify(url, full=True) == []
    assert verify(f"{http_server}/shards", full=False) == []
    _, local = _all_samples(tmp_path / "shards")
    _, remote = _all_samples(f"{http_server}/shards")
    assert local.keys() == remote.keys()
    for tid, sample in remote.items():
        assert np.array_equal(sample["s1_asc"], local[tid]["s1_asc"], equal_nan=True)
    (tmp_path / "shards" / "val" / "100-00000.tar").unlink()
    problems = verify(url)
    assert len(problems) == 1 and "val/100-00000.tar: missing shard" in problems[0]


def test_verify_names_each_corruption(built, tmp_path):
    out = tmp_path / "shards"
    write_shards(built, out, ShardOptions(shard_bytes=200_000, quiet=True))
    assert verify(out, full=True) == []
    train = sorted((out / "train").glob("*.tar"))
    flipped, truncated, missing = train[0], train[1], sorted((out / "test").glob("*.tar"))[0]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    missing.unlink()
    problems = verify(out)
    text = "\n".join(problems)
    assert len(problems) == 3
    assert f"{flipped.name}: sha256 mismatch" in text
    assert f"{truncated.name}:" in text and "truncated or replaced" in text
    assert f"{missing.name}: missing shard" in text


def test_index_counts_schema_manifest_and_urls(built, tmp_path):
    out = tmp_path / "shards"
    write_shards(built, out, ShardOptions(shard_bytes=200_000, quiet=True))
    index_path = out / "index.json"
    original = index_path.read_text()

    def more_samples(index):
        index["splits"]["val"]["tiers"]["100"]["samples"][0] += 1
        index["splits"]["val"]["samples"] += 1

    edit_index(out, more_samples)
    assert "field samples: " in verify(out)[0] and "the index says" in verify(out)[0]
    index_path.write_text(original)

    def duplicate_shard(index):  # val's first shard listed in train too: its keys are in two shards
        val, train = index["splits"]["val"]["tiers"]["100"], index["splits"]["train"]["tiers"]["100"]
        for name, column in train.items():
            column.append(val[name][0])
        index["splits"]["train"]["samples"] += val["samples"][0]

    edit_index(out, duplicate_shard)
    problems = verify(out)
    assert problems and all("duplicate sample key" in p and "also in" in p for p in problems)
    index_path.write_text(original)
    edit_index(out, lambda ix: ix.update(schema=99))
    with pytest.raises(ShardError, match="unknown index schema version 99"):
        verify(out)
    index_path.write_text(original)
    with pytest.raises(ShardError, match="built from manifest 'treesatai-ts'.*differ from 'flair-hub'"):
        verify(out, manifest=load_manifest("flair-hub"))
    for bad in ("pipe:curl http://x/a.tar", "/etc/passwd", "../../a.tar", "http://elsewhere/a.tar"):
        with pytest.raises(ShardError, match="not a relative path"):
            shard_url(str(index_path), bad)
    with pytest.raises(ShardError, match="pipe: urls are not accepted"):
        open_index("pipe:cat index.json")


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    buf.seek(0)
    return buf


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


MEMBER_CASES = [  # refused by the member rule itself (shard_read.check_member), whichever reader meets them
    ([("../evil.s2.npy", _npy(np.zeros(2)), tarfile.REGTYPE)], "path traversal"),
    ([("/abs.s2.npy", _npy(np.zeros(2)), tarfile.REGTYPE)], "path traversal"),
    ([("a.s2.pickle", b"cos\nsystem\n", tarfile.REGTYPE)], "pickle members are refused"),
    ([("a.s2.npy", b"", tarfile.SYMTYPE)], "links are refused"),
    ([("a.json.npy", _npy(np.zeros(2)), tarfile.REGTYPE)], "'json' is reserved"),
    ([("a.s2.npy", _npy(np.zeros(2)), tarfile.REGTYPE), ("b.s2.npy", _npy(np.zeros(2)), tarfile.REGTYPE),
      ("a.s1.npy", _npy(np.zeros(2)), tarfile.REGTYPE)], "duplicate sample key 'a'"),
]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        *MEMBER_CASES,
        ([("a.s2.npy", _npy(np.array([{"x": 1}], dtype=object)), tarfile.REGTYPE)], "object arrays"),
        ([("a.s2.npy", b"\x93NUMPY\x01\x00" + b"\xff\xff" + b"x" * 70000, tarfile.REGTYPE)], "not a valid npy"),
    ],
)
def test_hostile_members_are_refused(members, message):
    with pytest.raises(ShardError, match=message):
        list(iter_samples(_tar(members), "hostile.tar"))


@pytest.mark.parametrize(("members", "message"), MEMBER_CASES)
def test_the_header_scan_applies_the_same_member_rule(members, message, tmp_path):
    from maestro_data.stream.layout import scan_shard
    from maestro_data.stream.remote import AccessOptions, open_source

    shard = tmp_path / "hostile.tar"
    shard.write_bytes(_tar(members).getvalue())
    with pytest.raises(ShardError, match=message) as info, open_source(str(shard), shard.stat().st_size,
                                                                        AccessOptions()) as source:
        scan_shard(source)
    assert str(shard) in str(info.value) and "after sample" in str(info.value)


@given(st.text(min_size=1, max_size=40))
def test_sample_keys_map_back_to_any_tile_id(tile_id):
    key = sample_key(tile_id)
    assert tile_id_of(key) == tile_id
    assert "." not in key and "/" not in key and key.isascii()


def test_memory_source_ids_are_awkward():
    ids = [r.tile_id for r in MemorySource(MANIFEST, ".").list_tiles()]
    assert all("/" in t and ":" in t and "é" in t for t in ids)


def test_planned_sample_sizes_are_the_bytes_tarfile_writes(built):
    """The shard planner's sizes (shard_plan) must be tarfile's own, or parallel writers would cut elsewhere."""
    from maestro_data.build.shard_plan import SampleSizes, member_tar_bytes

    def tar_bytes(members):
        with tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                tar.addfile(shards_mod._tar_member(name, len(data)), io.BytesIO(data))
            return tar.offset

    store = TileStore(built)
    sizes = SampleSizes(store)
    for i in range(len(store)):
        if store.valid[i]:
            tile = store.read_tile(i)
            members = shards_mod.sample_members(tile, store.manifest.name)
            assert sizes.tar_bytes(i, sample_key(tile.tile_id)) == tar_bytes(members), tile.tile_id
    for name in ("k" * 100, "k" * 101, "é" * 30 + ".npy", "x" * 300):  # PAX headers for long or non-ASCII names
        assert member_tar_bytes(name, 1000) == tar_bytes([(name, b"\0" * 1000)]), name
