"""Stream I/O details: normalising into batch rows, the index's member layout, recycled batch memory, the span
cache, device-side normalisation and label tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from streamkit import TREESAT, copy_shards, rewrite_member, run, same_batches

from maestro_data.collate import BatchBuffer, SampleTransform, TransformOptions
from maestro_data.device import to_model_batch
from maestro_data.errors import StreamError
from maestro_data.manifest import load_manifest


def _reference_normalise(x: np.ndarray, log_scale: bool, norm_factor: float) -> np.ndarray:
    """The official order written out with temporaries: float32 copy, log floor + log, / factor, NaN fill."""
    from maestro_data.temporal import LOG_FLOOR, fill_nonfinite

    out = np.array(x, dtype=np.float32, copy=True)
    if log_scale:
        out = np.log(np.maximum(out, np.float32(LOG_FLOOR)))
    out /= np.float32(norm_factor)
    return fill_nonfinite(out)


def test_normalise_into_a_row_equals_the_reference_bit_for_bit():
    from maestro_data.temporal import normalise

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


def test_index_layout_replaces_the_header_scan_and_reads_the_same(mem, tmp_path, monkeypatch):
    import json

    import maestro_data.stream_read as stream_read

    index = json.loads((mem / "index.json").read_text())
    entries = [e for s in index["splits"].values() for t in s["tiers"].values() for e in t]
    assert entries and all(len(e["members"]["samples"]) == e["samples"] for e in entries)
    assert "json" in entries[0]["members"]["fields"]
    kw = dict(batch_size=4, block_samples=8, seed=3)
    monkeypatch.setattr(stream_read, "_SPANS", stream_read.SpanCache())
    monkeypatch.setattr(stream_read, "scan_shard", lambda url: pytest.fail(f"scanned {url}"))
    with_layout = run(mem, **kw)
    old = copy_shards(mem, tmp_path / "old")  # an index written before layouts existed: scanned, same batches
    for e in (e for s in index["splits"].values() for t in s["tiers"].values() for e in t):
        del e["members"]
    (old / "index.json").write_text(json.dumps(index))
    monkeypatch.undo()
    assert same_batches(with_layout, run(old, **kw))


def test_a_layout_that_disagrees_with_the_shard_is_refused_or_rescanned(mem, tmp_path):
    import json

    from maestro_data.stream_read import spans_from_layout

    index = json.loads((mem / "index.json").read_text())
    entry = index["splits"]["val"]["tiers"]["100"][0]
    layout, keys = entry["members"], entry["keys"]
    assert len(spans_from_layout("x.tar", layout, keys)) == len(keys)
    for bad, message in (({**layout, "fields": ["../s2", *layout["fields"][1:]]}, "invalid field names"),
                         ({**layout, "samples": layout["samples"][:-1]}, "samples for"),
                         ({**layout, "samples": [[-1, *layout["samples"][0][1:]]] + layout["samples"][1:]},
                          "not \\[start"),
                         ({"fields": layout["fields"]}, "malformed")):
        with pytest.raises(StreamError, match=message):
            spans_from_layout("x.tar", bad, keys)
    # a layout shifted by one tar block: the tar headers disagree, the reader falls back to scanning the shard
    shifted = copy_shards(mem, tmp_path / "shifted")
    entry["members"]["samples"] = [[r[0] + 512, *r[1:]] for r in entry["members"]["samples"]]
    (shifted / "index.json").write_text(json.dumps(index))
    assert same_batches(run(shifted, "val", mode="eval"), run(mem, "val", mode="eval"))


def test_batch_memory_is_recycled_only_once_released_and_padding_rows_are_zero():
    from maestro_data.collate import POOL_MIN_BYTES, ArrayPool

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
    import hashlib
    import json

    index_path = copy_shards(mem, tmp_path / "shards") / "index.json"
    index = json.loads(index_path.read_text())
    for e in (e for s in index["splits"].values() for t in s["tiers"].values() for e in t):
        del e["members"]  # the spans come from (cached) header scans
    index_path.write_text(json.dumps(index))
    before = run(index_path.parent, "val", mode="eval")
    entry = index["splits"]["val"]["tiers"]["100"][0]
    shard = index_path.parent / entry["url"]
    # the same samples with padded metadata: every later member moves, and the index is rewritten with the shard
    rewrite_member(shard, lambda name, data: data + b" " * 700 if name.endswith(".json") else data)
    entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    index_path.write_text(json.dumps(index))
    assert same_batches(run(index_path.parent, "val", mode="eval"), before)


def test_span_cache_is_bounded_and_least_recently_used_goes_first():
    from maestro_data.stream_read import SpanCache

    cache = SpanCache(size=2)
    cache.put(("a.tar", "1"), [], False)
    cache.put(("b.tar", "1"), [], True)
    assert cache.get(("a.tar", "1")) == ([], False)  # a is now the most recent
    cache.put(("a.tar", "2"), [], False)  # the same url, another shard: a new entry; b goes
    assert len(cache) == 2 and cache.get(("b.tar", "1")) is None and cache.get(("a.tar", "1")) is not None


@pytest.mark.parametrize("log_scale", [False, True])
def test_device_normalisation_is_temporal_normalise(log_scale):
    from maestro_data.device import normalise_tensor
    from maestro_data.temporal import normalise

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
    from maestro_data.device import _label_table

    manifest = load_manifest("pastis-hd")
    batches = run(synthetic("pastis-hd"), "val", manifest, mode="eval", batch_size=2)
    assert len(batches) > 1 and batches[0]["pastis_seg"].dtype == torch.uint8
    _label_table.cache_clear()
    for b in batches:
        to_model_batch(b, manifest, "cpu")
    info = _label_table.cache_info()
    assert info.misses == 1 and info.hits == len(batches) - 1
