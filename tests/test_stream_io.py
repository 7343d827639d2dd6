"""Stream I/O details: normalising into batch rows, sidecar layouts (checked against the shard and its tar
headers), old indexes, recycled batch memory, the span cache, device-side normalisation and label tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from streamkit import TREESAT, copy_shards, rewrite_member, run, same_batches

from maestro_data.errors import StreamError
from maestro_data.manifest import load_manifest
from maestro_data.stream.collate import BatchBuffer, SampleTransform, TransformOptions
from maestro_data.stream.device import to_model_batch


def _reference_normalise(x: np.ndarray, log_scale: bool, norm_factor: float) -> np.ndarray:
    """The official order written out with temporaries: float32 copy, log floor + log, / factor, NaN fill."""
    from maestro_data.stream.temporal import LOG_FLOOR, fill_nonfinite

    out = np.array(x, dtype=np.float32, copy=True)
    if log_scale:
        out = np.log(np.maximum(out, np.float32(LOG_FLOOR)))
    out /= np.float32(norm_factor)
    return fill_nonfinite(out)


def test_normalise_into_a_row_equals_the_reference_bit_for_bit():
    from maestro_data.stream.temporal import normalise

    rng = np.random.default_rng(1)
    x = rng.random((3, 2, 70, 70), dtype=np.float32) * 3
    x[0, 0, 5, 5], x[1, 1, 0, 0], x[2, 0, 1, 1] = np.nan, np.inf, 0.0
    ints = rng.integers(0, 60000, (3, 2, 70, 70)).astype(np.uint16)
    for data in (x, ints, x[:, :, ::-1, :].swapaxes(-1, -2)):  # a strided D4 view too
        for log_scale in (False, True):
            want = _reference_normalise(data, log_scale, 5.0)
            out = np.full(data.shape, 7.0, np.float32)
            assert normalise(data, log_scale, 5.0, out=out) is out
            np.testing.assert_array_equal(out, want)
            np.testing.assert_array_equal(normalise(data, log_scale, 5.0), want)
    with pytest.raises(StreamError, match="out must be float32"):
        normalise(x, False, 5.0, out=np.zeros(x.shape, np.float64))


def _sidecar_of(root, entry):
    from maestro_data.stream.index_format import parse_sidecar, tile_id_of

    raw = (root / entry["url"].removesuffix(".tar")).with_suffix(".samples.json").read_bytes()
    return parse_sidecar(raw, "x.samples.json", entry["samples"], entry["sha256"], tile_id_of)


def test_sidecar_layouts_are_the_tar_headers_and_a_schema_1_index_is_refused_then_reindexed(mem, tmp_path):
    import json

    from maestro_data.stream.index_format import all_entries
    from maestro_data.stream.layout import scan_shard, spans_from_sidecar
    from maestro_data.stream.reindex import reindex
    from maestro_data.stream.remote import AccessOptions, open_source

    index = json.loads((mem / "index.json").read_text())
    old = copy_shards(mem, tmp_path / "old")
    v1 = {**index, "schema": 1, "splits": {}}
    for entry in all_entries(index):
        sidecar = _sidecar_of(mem, entry)
        with open_source(str(mem / entry["url"]), entry["bytes"], AccessOptions()) as source:
            assert spans_from_sidecar(sidecar, "x.tar", entry["bytes"]) == scan_shard(source)
        info = v1["splits"].setdefault(entry["split"], {**index["splits"][entry["split"]], "tiers": {}})
        info["tiers"].setdefault(entry["tier"], []).append(
            {"url": entry["url"], "samples": entry["samples"], "bytes": entry["bytes"], "sha256": entry["sha256"],
             "keys": list(sidecar.keys), "tile_ids": list(sidecar.tile_ids)})
        (old / entry["url"].removesuffix(".tar")).with_suffix(".samples.json").unlink()
    (old / "index.json").write_text(json.dumps(v1))
    with pytest.raises(StreamError, match=r"index schema 1 .*no longer read.*maestro-data reindex"):
        run(old)
    rewritten = reindex(old)
    assert rewritten["splits"] == index["splits"]  # the same sidecars, byte for byte (their sha256 agree)
    assert same_batches(run(old, batch_size=4, seed=3), run(mem, batch_size=4, seed=3))


def test_hostile_sidecar_layouts_are_refused_before_any_read(mem, tmp_path, monkeypatch):
    import dataclasses
    import hashlib
    import json

    from maestro_data.errors import ShardError
    from maestro_data.stream.index_format import shard_entries
    from maestro_data.stream.layout import spans_from_sidecar

    index = json.loads((mem / "index.json").read_text())
    entry = max(shard_entries(index, "train"), key=lambda e: e["samples"])
    assert entry["samples"] >= 2
    sidecar = _sidecar_of(mem, entry)
    size = entry["bytes"]

    def edited(row, col, value):
        layout = sidecar.layout.copy()
        layout[row, col] = value
        return dataclasses.replace(sidecar, layout=layout)

    for bad, message in ((edited(0, 2, 2 << 30), "beyond the shard's"),  # a 2 GiB member in a small shard
                         (edited(0, 2, 1 << 40), "beyond the shard's"),  # 1 TiB: no MemoryError
                         (edited(0, 3, sidecar.layout[0, 1]), "not separated by one tar header"),
                         (edited(0, 1, 700), "off the 512-byte blocks"),
                         (edited(1, 0, sidecar.layout[0, 0]), "overlap")):
        with pytest.raises(ShardError, match=message) as info:
            spans_from_sidecar(bad, "x.tar", size)
        assert repr(sidecar.keys[0]) in str(info.value) or repr(sidecar.keys[1]) in str(info.value)
    # a layout shifted by one tar block, signed into the index: the tar headers disagree, the stream refuses it
    shifted = copy_shards(mem, tmp_path / "shifted")
    path = (shifted / entry["url"].removesuffix(".tar")).with_suffix(".samples.json")
    body = json.loads(path.read_text())
    width = 1 + 2 * len(body["fields"])
    last = entry["samples"] - 1  # the last sample: shifted, it still ends inside the shard (tar's end padding)
    body["layout"] = [v + 512 if i == last * width else v for i, v in enumerate(body["layout"])]
    path.write_text(json.dumps(body))
    tier = entry["url"].split("/")[1].split("-")[0]
    columns = index["splits"]["train"]["tiers"][tier]
    i = columns["url"].index(entry["url"])
    columns["sidecar_bytes"][i] = path.stat().st_size
    columns["sidecar_sha256"][i] = hashlib.sha256(path.read_bytes()).hexdigest()
    (shifted / "index.json").write_text(json.dumps(index))
    with pytest.raises(StreamError, match=rf"{entry['url']}: sample '.*': the tar header before byte \d+"):
        run(shifted, "train", mode="eval")
    from maestro_data.stream.verify import verify

    assert verify(shifted) == []  # in bounds and well formed: only the full check reads the headers
    (problem,) = verify(shifted, full=True)
    assert entry["url"] in problem and "differs from the tar headers" in problem
    body["layout"][2] = 2 << 30  # a 2 GiB member: verify names it without reading the shard's headers
    path.write_text(json.dumps(body))
    columns["sidecar_bytes"][i] = path.stat().st_size
    columns["sidecar_sha256"][i] = hashlib.sha256(path.read_bytes()).hexdigest()
    (shifted / "index.json").write_text(json.dumps(index))
    (problem,) = verify(shifted)
    assert entry["url"] in problem and "beyond the shard's" in problem
    # a sidecar that does not match the index's digest is refused (by a process that has not read it yet)
    import maestro_data.stream.shard_table as stream_read

    monkeypatch.setattr(stream_read, "_SPANS", stream_read.SpanCache())
    path.write_text(path.read_text() + " ")
    with pytest.raises(StreamError, match="samples.json: .*the index says"):
        run(shifted, "train", mode="eval")


def test_batch_memory_is_recycled_only_once_released_and_padding_rows_are_zero():
    from maestro_data.stream.collate import POOL_MIN_BYTES, ArrayPool

    pool = ArrayPool(keep=1)
    shape = (POOL_MIN_BYTES,)
    a = pool.empty(shape, np.uint8)
    a[...] = 7
    b = pool.empty(shape, np.uint8)  # a is alive: fresh memory
    assert not np.shares_memory(a, b)
    held = torch.from_numpy(a)
    base = a.base
    del a
    c = pool.empty(shape, np.uint8)  # the tensor still holds a's memory
    assert not np.shares_memory(c, base)
    del held
    d = pool.empty(shape, np.uint8)  # released: recycled
    assert np.shares_memory(d, base) and d.max() == 7
    assert pool.empty((4,), np.uint8).base is None  # small arrays bypass the pool
    transform = SampleTransform(TREESAT, TransformOptions())
    buffer = BatchBuffer(transform.output_spec(), 2, d4_key=True, pool=ArrayPool())
    for v in buffer.arrays.values():
        v.fill(1) if v.dtype != bool else v.fill(True)
    buffer.arrays["valid"][:] = [True, False]
    out = buffer.as_dict()
    assert all(not np.any(v[1]) for k, v in out.items() if k not in ("tile_id", "crop_index"))
    assert out["crop_index"].tolist() == [1, -1]
    assert all(np.all(v[0] == 1) for k, v in out.items() if k not in ("tile_id", "valid", "d4", "crop_index"))


def test_a_shard_rewritten_at_the_same_url_is_not_read_with_stale_offsets(mem, tmp_path):
    root = copy_shards(mem, tmp_path / "shards")
    before = run(root, "val", mode="eval")
    shard = sorted((root / "val").glob("*.tar"))[0]
    # the same samples with padded metadata: every later member moves; the index and sidecar are rewritten too
    rewrite_member(shard, lambda name, data: data + b" " * 700 if name.endswith(".json") else data)
    assert same_batches(run(root, "val", mode="eval"), before)


def test_span_cache_is_bounded_and_least_recently_used_goes_first():
    from maestro_data.stream.shard_table import SpanCache

    cache = SpanCache(size=2)
    cache.put(("a.tar", "1"), [])
    cache.put(("b.tar", "1"), [])
    assert cache.get(("a.tar", "1")) == []  # a is now the most recent
    cache.put(("a.tar", "2"), [])  # the same url, another shard: a new entry; b goes
    assert len(cache) == 2 and cache.get(("b.tar", "1")) is None and cache.get(("a.tar", "1")) is not None


@pytest.mark.parametrize("log_scale", [False, True])
def test_device_normalisation_is_temporal_normalise(log_scale):
    from maestro_data.stream.device import normalise_tensor
    from maestro_data.stream.temporal import normalise

    rng = np.random.default_rng(4)
    for x in (rng.integers(0, 65535, (3, 2, 9, 9)).astype(np.uint16), rng.integers(-500, 9000, (4, 7)).astype(
            np.int16), rng.integers(0, 255, (2, 5)).astype(np.uint8)):
        got = normalise_tensor(torch.from_numpy(x), log_scale, 10000.0)
        assert got.dtype == torch.float32
        if log_scale:  # torch's and numpy's float32 log may round differently (no integer log-scale modality)
            np.testing.assert_array_max_ulp(got.numpy(), normalise(x, log_scale, 10000.0), maxulp=2)
        else:
            np.testing.assert_array_equal(got.numpy(), normalise(x, log_scale, 10000.0))


def test_label_table_is_built_once_per_target_and_device(synthetic):
    from maestro_data.stream.device import _label_table

    manifest = load_manifest("pastis-hd")
    batches = run(synthetic("pastis-hd"), "val", manifest, mode="eval", batch_size=2)
    assert len(batches) > 1 and batches[0]["pastis_seg"].dtype == torch.uint8
    _label_table.cache_clear()
    for b in batches:
        to_model_batch(b, manifest, "cpu")
    info = _label_table.cache_info()
    assert info.misses == 1 and info.hits == len(batches) - 1


def test_a_member_read_into_a_row_is_a_view_only_when_it_has_the_rows_shape():
    import io

    from maestro_data.stream.shard_table import _decode_direct

    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    f = io.BytesIO()
    np.save(f, arr)
    member = f.getvalue()
    for shape, view in (((2, 3, 4), True), ((1, 3, 4), False)):  # the row's shape; one step (a cut series)
        row = np.empty(shape, np.float32)
        cut = len(member) - row.nbytes  # what layout.read_sample leaves in the sample buffer
        row.reshape(-1).view(np.uint8)[:] = np.frombuffer(member[cut:], np.uint8)
        got = _decode_direct(memoryview(bytearray(member[:cut])), row, "m")
        assert np.shares_memory(got, row) == view and np.array_equal(got, arr)
