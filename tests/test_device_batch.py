"""to_model_batch's fast paths against a straightforward per-row numpy reference (issue 14): every D4 element,
integer and float modalities, stored and mapped labels, flags passed through, the caller's batch untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from maestro_data.manifest import load_manifest
from maestro_data.stream.augment import d4_apply
from maestro_data.stream.collate import label_table
from maestro_data.stream.device import _device_raster, _HostBuffers, _label_table, to_model_batch
from maestro_data.stream.temporal import normalise

FLAIR = load_manifest("flair-hub")
# an integer log-scale modality exists in no dataset: make one, so the in-place log path is compared too
LOGGED = dataclasses.replace(FLAIR, modalities={**FLAIR.modalities,
                                                "s2": dataclasses.replace(FLAIR.modalities["s2"], log_scale=True)})


def random_batch(rng: np.random.Generator, elements: list[int], size: int = 64) -> dict:
    """A loader-like batch: large planes (the plane-wise transpose) and small ones (the batched one)."""
    b = len(elements)
    return {
        "aerial": torch.from_numpy(rng.integers(0, 256, (b, 1, 4, size, size), dtype=np.uint8)),
        "dem": torch.from_numpy(rng.normal(size=(b, 1, 2, size, size)).astype(np.float32)),
        "s2": torch.from_numpy(rng.integers(0, 65536, (b, 3, 10, 10, 10), dtype=np.uint16)),
        "s1_asc": rng.normal(size=(b, 4, 2, 10, 10)).astype(np.float32),  # numpy arrays are accepted too
        "cosia": torch.from_numpy(rng.integers(0, 256, (b, size, size), dtype=np.uint8)),  # stored classes
        "aerial_missing": torch.from_numpy(rng.random(b) < 0.3),
        "s2_dates": torch.from_numpy(rng.integers(1, 366, (b, 3, 3), dtype=np.int16)),
        "valid": torch.from_numpy(rng.random(b) < 0.8),
        "tile_id": [f"t{i}" for i in range(b)],
        "d4": torch.tensor(elements, dtype=torch.int64),
    }


def reference(batch: dict, manifest) -> dict:
    """Row by row in numpy: D4 view, then the manifest's normalisation or label table (what the contract says)."""
    ks = batch["d4"].tolist()
    out = {}
    for key, value in batch.items():
        if key == "d4":
            continue
        arr = value.numpy() if isinstance(value, torch.Tensor) else value
        spec, target = manifest.modalities.get(key), manifest.targets.get(key)
        if spec is not None:
            rows = [d4_apply(a, k) for a, k in zip(arr, ks, strict=True)]
            if arr.dtype.kind in "iu":
                rows = [normalise(np.ascontiguousarray(r), spec.log_scale, spec.norm_factor) for r in rows]
            out[key] = np.stack(rows).astype(np.float32)
        elif target is not None:
            table = label_table(target, 256).astype(np.int64)
            mapped = table[arr] if arr.dtype == np.uint8 else arr.astype(np.int64)
            out[key] = np.stack([d4_apply(a, k) for a, k in zip(mapped, ks, strict=True)])
        else:
            out[key] = arr
    return out


def compare(got: dict, want: dict, log_key: str | None = None) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        if isinstance(w, list):
            assert g == w
            continue
        g = g.numpy()
        assert g.dtype == w.dtype and g.shape == w.shape, key
        if key == log_key:  # torch's and numpy's float32 log may round differently
            np.testing.assert_array_max_ulp(g, w, maxulp=2)
        else:
            assert np.array_equal(g, w), key


@pytest.mark.parametrize("manifest", [FLAIR, LOGGED], ids=["flair-hub", "log-scale-s2"])
def test_every_d4_element_matches_the_reference(manifest):
    rng = np.random.default_rng(14)
    for elements in (list(range(8)), [5, 5, 0, 5, 3, 3], [0, 0, 0], rng.integers(0, 8, 9).tolist()):
        batch = random_batch(rng, elements)
        before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        got = to_model_batch(batch, manifest, "cpu")
        compare(got, reference(batch, manifest), "s2" if manifest is LOGGED else None)
        assert all(torch.equal(batch[k], v) for k, v in before.items())  # the caller's batch is never modified


def test_mapped_labels_and_no_pending_d4():
    rng = np.random.default_rng(15)
    batch = random_batch(rng, [0] * 4)
    target = FLAIR.targets["cosia"]
    batch["cosia"] = torch.from_numpy(label_table(target, 256)[batch["cosia"].numpy()])  # int8 training labels
    assert batch["cosia"].dtype == torch.int8 and int(batch["cosia"].min()) == target.missing_value
    want = reference(batch, FLAIR)
    del batch["d4"]
    got = to_model_batch(batch, FLAIR, "cpu")
    compare(got, want)
    assert got["dem"] is batch["dem"]  # nothing to do: not copied


def test_device_path_matches_the_host_path():
    """The accelerator's kernels (one conversion, D4 per group of rows), run here on the CPU."""
    rng = np.random.default_rng(16)
    elements = [3, 7, 3, 0, 4, 6, 1, 2, 5, 7]
    batch = random_batch(rng, elements)
    host = to_model_batch(batch, FLAIR, "cpu")
    table = _label_table(FLAIR.targets["cosia"], torch.device("cpu"))
    assert torch.equal(_device_raster(batch["cosia"], elements, torch.int64, table), host["cosia"])
    assert torch.equal(_device_raster(batch["dem"], elements, torch.float32, None), host["dem"])
    aerial = _device_raster(batch["aerial"], elements, torch.float32, None) / 255.0
    assert torch.equal(aerial, host["aerial"])


def test_output_memory_is_reused_only_when_nobody_holds_it():
    pool = _HostBuffers(min_bytes=1, per_size=2)
    shape = torch.Size((4, 8))
    a = pool.empty(shape, torch.float32)
    ptr = a.data_ptr()
    view = a[1:]
    del a
    b = pool.empty(shape, torch.float32)  # a's memory is still seen through its view
    assert b.data_ptr() != ptr
    array = b.numpy()
    del view, b
    c = pool.empty(shape, torch.float32)  # a's memory is free again; b's is held by the numpy array
    assert c.data_ptr() == ptr and c.shape == shape
    d = pool.empty(shape, torch.float32)
    assert d.data_ptr() not in (ptr, array.ctypes.data)
    del c, d
    shared = pool.empty(shape, torch.float32).share_memory_()  # another process may read it from now on
    moved = shared.data_ptr()
    del shared
    assert pool.empty(shape, torch.float32).data_ptr() not in (moved, array.ctypes.data)  # not handed out again
