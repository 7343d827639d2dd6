"""A hostile or malformed index or sidecar is one clear error naming the file, the field and what was expected, in
``verify``, ``make_loader`` and the CLI alike (no traceback); the epoch plan is O(shards)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from streamkit import copy_shards

from maestro_cli.data import main as data_cli
from maestro_data.errors import ShardError, StreamError
from maestro_data.randomness import permutation
from maestro_data.stream.index_format import parse_sidecar, tile_id_of
from maestro_data.stream.loader import EpochOrder, StreamConfig, epoch_order, make_loader, rank_slots, stream_order
from maestro_data.stream.shard_table import ShardTable
from maestro_data.stream.verify import verify


def _set(path: str, value):
    def edit(index):
        *parents, last = path.split(".")
        node = index
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


def _first(column: str, value):
    def edit(index):
        index["splits"]["val"]["tiers"]["100"][column][0] = value
    return edit


CASES = [  # (edit of the parsed index, or raw bytes; what the message must say)
    (_set("splits", None), "field splits: expected an object, got NoneType None"),
    (_set("splits", KeyError), "field splits is missing"),
    (_set("manifest", KeyError), "field manifest is missing"),
    (_set("manifest.text", "[[[ not toml"), "field manifest.text"),
    (_set("splits.val.tiers", [1, 2]), "field splits.val.tiers: expected an object, got list"),
    (_set("splits.val.tiers.100.url", KeyError), "field splits.val.tiers.100.url is missing"),
    (_first("url", None), r"field splits.val.tiers.100.url\[0\]: expected a string, got NoneType"),
    (_first("url", "pipe:rm -rf x.tar"), "is not a relative path inside the shard folder"),
    (_first("sha256", "XYZ"), r"sha256\[0\]: expected a sha256 as 64 lowercase hex digits"),
    (_first("samples", -3), r"samples\[0\]: expected an integer >= 0, got int -3"),
    (_first("bytes", True), r"bytes\[0\]: expected an integer >= 0, got bool True"),
    (_set("splits.val.tiers.abc", {}), "tier names that are percentages"),
    (_set("splits.val.samples", 10**6), "field splits.val.samples: 1000000, but its shards hold"),
    (_set("schema", 1), "index schema 1 .* maestro-data reindex"),
    (_set("schema", 2), "index schema 2 .*georeference.*rebuild the store and shards"),
    (_set("labelled", "no"), "field labelled: expected true or false"),
    (_set("format", None), "not a maestro shard index"),
    (b"[" * 200_000, "JSON nested too deeply"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF binary junk", "not valid UTF-8 JSON"),
    (b'{"format": "maestro-shards", "schema": 2, "seed": 1' + b"9" * 5000 + b"}", "not valid UTF-8 JSON"),
]


@pytest.fixture(scope="module")
def hostile_root(mem, tmp_path_factory):
    return copy_shards(mem, tmp_path_factory.mktemp("hostile") / "shards")


@pytest.mark.parametrize(("edit", "message"), CASES)
def test_a_malformed_index_is_one_error_naming_the_field_everywhere(hostile_root, mem, edit, message):
    if isinstance(edit, bytes):
        raw = edit
    else:
        index = json.loads((mem / "index.json").read_text())
        edit(index)
        raw = json.dumps(index).encode()
    (hostile_root / "index.json").write_bytes(raw)
    where = str(hostile_root / "index.json")
    with pytest.raises(ShardError, match=message) as info:
        verify(hostile_root, full=True)
    assert where in str(info.value)
    with pytest.raises(StreamError, match=message) as info:
        make_loader(StreamConfig(str(hostile_root), "val", mode="eval"))
    assert where in str(info.value)
    result = CliRunner().invoke(data_cli, ["verify", str(hostile_root)])
    assert result.exit_code == 1 and "Traceback" not in result.output and where in result.output
    assert isinstance(result.exception, SystemExit)


def _sidecar(**change) -> bytes:
    body = {"format": "maestro-shard-samples", "schema": 3, "shard_sha256": "a" * 64, "samples": 2,
            "keys": ["k1", "k2"], "tile_ids": ["k1", "k2"], "fields": ["s2", "json"], "layout": [0] * 10}
    body.update(change)
    return json.dumps(body).encode()


@pytest.mark.parametrize(("raw", "message"), [
    (_sidecar(keys=[None, "k2"]), r"field keys\[0\]: expected a sample key"),
    (_sidecar(keys=["../x", "k2"], tile_ids=["../x", "k2"]), r"field keys\[0\]"),
    (_sidecar(tile_ids=["k1", "other"]), r"field tile_ids\[1\]: expected the tile id of key 'k2'"),
    (_sidecar(keys=["k1", "k1"], tile_ids=["k1", "k1"]), "duplicate sample keys"),
    (_sidecar(fields=["s2", "s2"]), "distinct field names"),
    (_sidecar(fields=["s2", "a/b"]), r"field fields\[1\]"),
    (_sidecar(layout=[0] * 9), "a list of 10 values"),
    (_sidecar(layout=[0.5] * 10), r"field layout\[0\]: expected an integer >= 0, got float"),
    (_sidecar(layout=[2**70] * 10), "fit 64 bits"),
    (_sidecar(samples=3), "field samples: 3, the index says 2"),
    (_sidecar(shard_sha256="b" * 64), "describes shard bbbbbbbbbbbb"),
    (_sidecar(format="x"), "field format: expected 'maestro-shard-samples'"),
    (b"\x00\x01garbage", "not valid UTF-8 JSON"),
])
def test_a_malformed_sidecar_is_one_error_naming_the_field(raw, message):
    with pytest.raises(ShardError, match=message) as info:
        parse_sidecar(raw, "s/100-00000.samples.json", 2, "a" * 64, tile_id_of)
    assert "s/100-00000.samples.json" in str(info.value)


def test_the_epoch_plan_is_the_materialised_order_without_materialising_it():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 9, 37)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = len(counts)
    table = ShardTable("x", tuple(f"{i}.tar" for i in range(n)), starts, np.zeros(n, np.int64), ("",) * n,
                       np.zeros(n, np.int64), ("",) * n)
    for repeats, shuffle in ((1, True), (4, True), (4, False)):
        order = epoch_order(table, repeats, seed=7, epoch=2, shuffle=shuffle)
        assert isinstance(order, EpochOrder) and len(order) == starts[-1] * repeats
        full = stream_order(table, repeats, 7, 2, shuffle)
        # the former, materialising definition: shards permuted, each shard's tiles in order, crops consecutive
        shards = permutation(n, 7, 2, "stream/shards") if shuffle else np.arange(n)
        tiles = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards])
        assert np.array_equal(full, (tiles[:, None] * repeats + np.arange(repeats)[None, :]).ravel())
        for train in (True, False):
            for rank in range(3):
                assert np.array_equal(rank_slots(order, 3, rank, 4, train), rank_slots(full, 3, rank, 4, train))
