"""The streaming loader: contract shapes on all four datasets, determinism across workers and ranks, equal batches,
every eval crop once, exact resume, D4 through the loader, bad inputs, and the REAL tile against the official reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from streamkit import TREESAT, build_shards, copy_shards, npy_bytes, rewrite_member, rows, run, same_batches

from maestro_data.build.pipeline import BuildOptions, build_store
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.errors import StreamError
from maestro_data.manifest import load_manifest
from maestro_data.stream.augment import d4_apply, d4_inverse
from maestro_data.stream.batch import BatchError, check_batch, check_loader_batch
from maestro_data.stream.collate import BatchBuffer, SampleTransform, TransformOptions, label_dtype, label_table
from maestro_data.stream.device import d4_apply_torch, to_model_batch
from maestro_data.stream.loader import StreamConfig, make_loader, rank_slots


@pytest.mark.parametrize("dataset", ["treesatai-ts", "pastis-hd", "flair-hub", "flair2"])
def test_every_dataset_and_split_follows_the_batch_contract(synthetic, dataset):
    manifest = load_manifest(dataset)
    index = synthetic(dataset)
    crops = manifest.repeats ** 2
    for split, mode in (("train", "train"), ("val", "eval"), ("test", "eval")):
        loader = make_loader(StreamConfig(str(index), split, mode=mode, batch_size=4, block_samples=16), manifest)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        for b in batches:
            assert check_loader_batch(manifest, b, targets=True) == 4
            on_device = to_model_batch(b, manifest, "cpu")
            check_batch(manifest, on_device, targets=True, values=True)  # the model's contract: int64 labels
            for t in manifest.targets.values():
                if t.type == "segmentation":  # stored uint8 classes in the loader, refused by the model's check
                    assert b[t.name].dtype == torch.uint8
                    table = torch.from_numpy(label_table(t, 256).astype(np.int64))
                    mapped = torch.stack([d4_apply_torch(table[x.long()], int(k)) for x, k in zip(
                        b[t.name], b.get("d4", torch.zeros(4, dtype=torch.int64)), strict=True)])
                    assert torch.equal(on_device[t.name], mapped)
                    with pytest.raises(BatchError, match=f"{t.name}.*dtype uint8, expected int64"):
                        check_batch(manifest, b, targets=True)
            assert all(on_device[m].dtype == torch.float32 for m in manifest.modalities)
        if mode == "eval":  # every (tile, crop) exactly once; PASTIS-HD: 64 crops per tile
            got = [(t, int(c)) for b in batches for t, c, v in zip(b["tile_id"], b["crop_index"], b["valid"],
                                                                   strict=True) if v]
            assert len(got) == len(set(got)) == loader.num_samples
            assert {c for _, c in got} == set(range(crops))
    if dataset == "pastis-hd":
        assert crops == 64


def test_same_batches_with_0_1_2_3_workers_and_a_new_epoch_changes_them(mem):
    kw = dict(batch_size=4, block_samples=8, seed=3)
    base = run(mem, num_workers=0, **kw)
    for workers in (1, 2, 3):
        assert same_batches(base, run(mem, num_workers=workers, **kw)), workers
    loader = make_loader(StreamConfig(str(mem), "train", **kw), TREESAT)
    loader.set_epoch(1)
    other = list(loader)
    assert not same_batches(base, other)
    r0, r1 = rows(base), rows(other)
    assert any(not np.array_equal(r0[k]["s2"], r1[k]["s2"]) for k in r0.keys() & r1.keys())


@pytest.mark.parametrize("mode, split", [("train", "train"), ("eval", "val")])
def test_same_sample_same_augmentation_on_1_2_4_ranks_and_equal_lengths(mem, mode, split):
    kw = dict(mode=mode, batch_size=3, block_samples=6, seed=5)
    reference = None
    for world in (1, 2, 4):
        loaders = [make_loader(StreamConfig(str(mem), split, **kw), TREESAT, rank=r, world_size=world)
                   for r in range(world)]
        assert len({len(x) for x in loaders}) == 1
        per_rank = [list(x) for x in loaders]
        assert all(len(p) == len(loaders[0]) for p in per_rank)
        merged = rows([b for p in per_rank for b in p])
        if mode == "eval":
            valid = sum(int(b["valid"].sum()) for p in per_rank for b in p)
            assert valid == len(merged) == loaders[0].num_samples
        reference = reference or merged
        assert merged.keys() == reference.keys()
        for key in merged:
            for k, v in merged[key].items():
                assert np.array_equal(v, reference[key][k], equal_nan=True), (world, key, k)


def test_equal_batches_with_fewer_shards_than_ranks_times_workers(tmp_path_factory, memory_source):
    root = tmp_path_factory.mktemp("one_shard")
    (root / "raw").mkdir()
    memory_source.update(n=11)
    index = build_shards(root, TREESAT, root / "raw", shard_bytes=1 << 30, percents=(20,))
    lengths = set()
    for world in (1, 4):
        for r in range(world):
            for mode, split in (("train", "pretrain"), ("eval", "train")):
                loader = make_loader(StreamConfig(str(index), split, mode=mode, batch_size=2, num_workers=3,
                                                  block_samples=2), TREESAT, rank=r, world_size=world)
                got = list(loader)
                assert len(got) == len(loader)
                lengths.add((world, mode, len(loader)))
    assert len(lengths) == 4  # one length per (world, mode): equal on every rank


def test_padding_and_drop_policies():
    order = np.arange(10)
    shares = [rank_slots(order, 3, r, 2, train=True) for r in range(3)]
    assert all(len(s) == 4 for s in shares) and set(np.concatenate(shares)) == set(range(10))
    dropped = [rank_slots(order, 3, r, 2, train=True, pad_policy="drop") for r in range(3)]
    assert all(len(s) == 2 for s in dropped) and len(set(np.concatenate(dropped))) == 6
    evals = [rank_slots(order, 4, r, 2, train=False) for r in range(4)]
    assert all(len(s) == 4 for s in evals)
    assert sorted(np.concatenate(evals)[np.concatenate(evals) >= 0]) == list(range(10))
    with pytest.raises(StreamError, match="world size 11 is larger than the 10 samples"):
        rank_slots(order, 11, 0, 1, train=False)
    with pytest.raises(StreamError, match="leaves no batch"):
        rank_slots(order, 3, 0, 4, train=True, pad_policy="drop")


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_yields_exactly_the_remaining_batches(mem, workers):
    cfg = StreamConfig(str(mem), "train", batch_size=2, block_samples=6, num_workers=workers, seed=1)
    full = make_loader(cfg, TREESAT)
    full.set_epoch(2)
    expected = list(full)
    loader = make_loader(cfg, TREESAT)
    loader.set_epoch(2)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 5:
            break
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == 5
    resumed = make_loader(cfg, TREESAT)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's usual call keeps the resume point
    tail = list(resumed)
    assert same_batches(head + tail, expected)
    assert resumed.state_dict()["batches_consumed"] == len(expected)
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed)
    with pytest.raises(StreamError, match="world_size"):
        make_loader(cfg, TREESAT, rank=0, world_size=2).load_state_dict(state)


def test_d4_is_shared_by_every_raster_and_the_labels(synthetic):
    manifest = load_manifest("pastis-hd")
    index = synthetic("pastis-hd")
    kw = dict(mode="eval", batch_size=8, block_samples=64, seed=2)  # eval: D4 is on there too, 64 crops of a tile
    plain = run(index, "val", manifest, d4=False, **kw)
    device, host = (run(index, "val", manifest, d4_on_device=on, **kw) for on in (True, False))
    all_host = run(index, "val", manifest, d4_on_device=False, normalize_on_device=False, **kw)
    assert device[0]["pastis_seg"].dtype == torch.uint8 and all_host[0]["pastis_seg"].dtype == torch.int8
    all_host = rows([to_model_batch(b, manifest, "cpu") for b in all_host])
    assert "d4" in device[0] and "d4" not in host[0]
    moved = [to_model_batch(b, manifest, "cpu") for b in device]
    assert "d4" not in moved[0] and "d4" in device[0]  # applied once; the loader's batch is left untouched
    plain = rows([to_model_batch(b, manifest, "cpu") for b in plain])
    flipped = rows(moved)
    host = rows([to_model_batch(b, manifest, "cpu") for b in host])
    assert plain.keys() == flipped.keys() == host.keys()
    for key, row in host.items():  # host D4 == device D4, host label mapping == device label mapping
        assert all(np.array_equal(row[m], flipped[key][m]) for m in (*manifest.modalities, "pastis_seg")), key
        assert all(np.array_equal(row[m], all_host[key][m]) for m in row), key
    rasters = [*manifest.modalities, *manifest.targets]
    used = set()
    for key, row in plain.items():
        matches = [k for k in range(8)
                   if all(np.array_equal(d4_apply(row[r], k), flipped[key][r]) for r in rasters)]
        assert matches, key
        used.add(matches[0])
    assert len(used) == 8


def test_torch_d4_equals_numpy_d4():
    x = np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    for k in range(8):
        assert np.array_equal(d4_apply_torch(torch.from_numpy(x), k).numpy(), d4_apply(x, k))


def test_bad_samples_raise_with_shard_and_key_or_are_skipped(mem, tmp_path):
    index = copy_shards(mem, tmp_path / "shards")
    shard = sorted((index / "val").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = b"\x01" * (len(data) - len(data) // 2)  # garbage from the middle on
    shard.write_bytes(bytes(data))
    with pytest.raises(StreamError, match=rf"{shard.name}.*sample '"):
        run(index, "val", mode="eval")
    loader = make_loader(StreamConfig(str(index), "val", mode="eval", on_error="skip"), TREESAT)
    batches = list(loader)
    assert len(batches) == len(loader) and loader.skipped
    assert sum(int(b["valid"].sum()) for b in batches) == loader.num_samples - len(loader.skipped)
    assert all(shard.name in s["reason"] for s in loader.skipped)


@pytest.mark.parametrize("edit, message", [
    (lambda name, data: None if name.endswith(".s1_asc.npy") else data, "lacks 's1_asc'"),
    (lambda name, data: npy_bytes(np.zeros((2, 3, 6, 6), np.uint16)) if name.endswith(".s2.npy") else data,
     r"s2: uint16\(2, 3, 6, 6\), expected uint16\(T, 10, 6, 6\)"),
])
def test_missing_modality_and_wrong_shape_name_the_sample(mem, tmp_path, edit, message):
    index = copy_shards(mem, tmp_path / "shards")
    shard = sorted((index / "test").glob("*.tar"))[0]
    rewrite_member(shard, edit)
    with pytest.raises(StreamError, match=message) as info:
        run(index, "test", mode="eval")
    assert shard.name in str(info.value) and "sample '" in str(info.value)


def test_index_from_another_manifest_bad_config_and_too_many_ranks(mem):
    with pytest.raises(StreamError, match="differ from 'flair-hub'"):
        make_loader(StreamConfig(str(mem), "train"), load_manifest("flair-hub"))
    with pytest.raises(StreamError, match="mode 'fit'.*eval_offset 'last'.*subset 0 is not a percentage"):
        make_loader(StreamConfig(str(mem), "train", mode="fit", eval_offset="last", subset=0), TREESAT)
    with pytest.raises(StreamError, match=r"index.json: index has no 7 % subset for 'train' \(tiers: "):
        make_loader(StreamConfig(str(mem), "train", subset=7), TREESAT)
    n = make_loader(StreamConfig(str(mem), "val", mode="eval"), TREESAT).num_samples
    with pytest.raises(StreamError, match=f"world size {n + 1} is larger than the {n} samples"):
        make_loader(StreamConfig(str(mem), "val", mode="eval"), TREESAT, rank=0, world_size=n + 1)


def test_subsets_are_nested_and_pretrain_is_train_plus_val(mem):
    ids = {p: {t for b in run(mem, "train", subset=p, mode="eval") for t, v in zip(b["tile_id"], b["valid"],
                                                                                    strict=True) if v}
           for p in (5, 20, 100)}
    assert ids[5] <= ids[20] <= ids[100] and len(ids[5]) < len(ids[100])
    val = {t for b in run(mem, "val", mode="eval") for t, v in zip(b["tile_id"], b["valid"], strict=True) if v}
    pre = make_loader(StreamConfig(str(mem), "pretrain", mode="eval"), TREESAT)
    assert pre.num_samples == len(ids[100] | val)


def test_subset_is_any_tier_the_build_wrote(mem, tmp_path):
    import json

    index_path = copy_shards(mem, tmp_path / "shards") / "index.json"
    index = json.loads(index_path.read_text())
    for info in index["splits"].values():  # as if built with --percents 5 30
        info["tiers"]["30"] = info["tiers"].pop("20")
    index_path.write_text(json.dumps(index))
    got = run(index_path.parent, "train", subset=30, mode="eval")
    assert same_batches(got, run(mem, "train", subset=20, mode="eval"))
    with pytest.raises(StreamError, match=r"no 20 % subset for 'train' \(tiers: .*30"):
        make_loader(StreamConfig(str(index_path.parent), "train", subset=20), TREESAT)


def test_short_and_empty_series_give_finite_rows_without_nan():
    transform = SampleTransform(TREESAT, TransformOptions(mode="train", normalize_on_device=False))
    rng = np.random.default_rng(0)
    sample = {"__key__": "k", "meta": {"ref_date": [2019, 182, 5]},
              "aerial": rng.integers(0, 255, (1, 4, 300, 300), dtype=np.uint8),
              "aerial_dates": np.array([[2019, 182, 5]], np.int16),
              "s2": rng.integers(0, 9999, (5, 10, 6, 6), dtype=np.uint16),  # T < D = 16
              "s2_dates": np.array([[2019, d, 3] for d in range(1, 6)], np.int16),
              "s2_mask": np.zeros((5, 2, 6, 6), np.float32),
              "s1_asc": np.zeros((0, 2, 6, 6), np.float32), "s1_asc_dates": np.zeros((0, 3), np.int16),  # T = 0
              "s1_des": np.full((6, 2, 6, 6), np.nan, np.float32),  # every value NaN
              "s1_des_dates": np.array([[2019, d, 0] for d in range(6)], np.int16),
              "treesat_mlc_thresh": np.array([0.5, 0.07, np.nan] + [0.0] * 12, np.float32)}
    buffer = BatchBuffer(transform.output_spec(), 1, d4_key=True)
    buffer.fill(0, transform, sample, 0, 0, "k")
    out = {k: v[0] for k, v in buffer.arrays.items()}
    assert out["s2"].shape == (16, 10, 6, 6)
    assert out["s2_dates"][:, 1].tolist() == [1 + d * 5 // 16 for d in range(16)]
    assert not out["s2_dates"][:, 2].any() and not out["ref_date"][:, 2].any()  # hours zeroed
    assert out["s1_asc_missing"] and not out["s1_asc"].any() and not out["s1_asc_dates"].any()
    assert not out["s2_missing"] and all(np.isfinite(out[m]).all() for m in TREESAT.modalities)
    assert out["treesat_mlc_thresh"][:3].tolist() == [1.0, 0.0, -1.0]  # strict > threshold, NaN -> missing


def test_segmentation_ignore_classes_become_the_missing_value():
    manifest = load_manifest("flair2")
    transform = SampleTransform(manifest, TransformOptions(mode="eval", d4=False, normalize_on_device=False))
    labels = (np.arange(512 * 512) % 19).astype(np.uint8).reshape(512, 512)
    assert label_dtype(manifest.targets["cosia"]) == np.int8
    wide = labels.astype(np.uint16)
    wide[0, :7] = 300  # no class: missing too
    for raw in (labels, wide):  # the uint8 table and the general path
        for k in (0, 5):  # with and without a host D4
            out = np.zeros((512, 512), label_dtype(manifest.targets["cosia"]))
            transform._segmentation(raw, manifest.targets["cosia"], out, k)
            out = d4_apply(out, d4_inverse(k))
            for cls in np.unique(raw).tolist():
                want = manifest.targets["cosia"].missing_value if cls in manifest.targets["cosia"].ignore else cls
                assert set(np.unique(out[raw == cls]).tolist()) == ({-1} if cls == 300 else {want})


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    from conftest import REAL_SAMPLE, require

    root = tmp_path_factory.mktemp("real")
    raw = require(REAL_SAMPLE)
    build_store(TREESAT, raw, root / "out", BuildOptions(quiet=True, on_error="skip"))  # train.csv only
    write_shards(root / "out", root / "shards", ShardOptions(quiet=True))
    return root / "shards"


@pytest.mark.filterwarnings("ignore:.*split file for")
@pytest.mark.parametrize("on_device", [False, True])
def test_real_tile_through_store_shards_stream_equals_the_official_reader(real_shards, oracle_dir, on_device):
    expected = np.load(oracle_dir / "treesat_real_val" / "expected.npz")
    loader = make_loader(StreamConfig(str(real_shards), "train", mode="eval", d4=False, eval_offset="first",
                                      batch_size=1, normalize_on_device=on_device), TREESAT)
    (batch,) = list(loader)
    batch = to_model_batch(batch, TREESAT, "cpu")
    for m in TREESAT.modalities:
        np.testing.assert_array_equal(batch[m][0].numpy(), expected[m], err_msg=m)
        np.testing.assert_array_equal(batch[f"{m}_dates"][0].numpy(), expected[f"{m}_dates"], err_msg=m)
