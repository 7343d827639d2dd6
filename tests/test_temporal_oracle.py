"""The REAL TreeSatAI-TS tile through our temporal selection + normalisation equals the official reader's output
(``reference/oracle/treesat_real_val``: validation mode, no D4, truncation offset 0 and T mod D).

With the compact committed oracle (tests/data/oracle) ``expected_offset_last.npz`` leaves out the aerial array, which
is identical to the one in ``expected.npz`` (aerial has one date: offset 0 either way, checked on the full oracle);
the aerial output is then compared with ``expected.npz``'s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maestro_data.dates import dates_array
from maestro_data.manifest import load_manifest
from maestro_data.stream.temporal import apply_selection, normalise, select_steps

TILE = "Betula_spec._1_15679_WEFL_NLF"
# HDF5 dataset, products dataset, date token of the product name (official reader, day resolution)
SENTINEL = {
    "s2": ("sen-2-data", "sen-2-products", 2),
    "s1_asc": ("sen-1-asc-data", "sen-1-asc-products", 4),
    "s1_des": ("sen-1-des-data", "sen-1-des-products", 4),
}


@pytest.fixture
def raw_tile(real_sample: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """Raw series (data in the manifest dtype, mask, dates) of the real tile, read as the official reader does."""
    h5py = pytest.importorskip("h5py")
    rasterio = pytest.importorskip("rasterio")
    root = real_sample
    manifest = load_manifest("treesatai-ts")
    out = {}
    with h5py.File(root / "sentinel-ts" / f"{TILE}_2019.h5", "r") as h5:
        for name, (data_key, products_key, token) in SENTINEL.items():
            spec = manifest.modalities[name]
            data = h5[data_key][:]
            if spec.dtype == "uint16":  # as the tile store keeps it: exact integers in a float32 file
                as_int = data.astype(np.uint16)
                assert np.array_equal(as_int, data)
                data = as_int
            mask = None
            if spec.cloud_mask is not None:
                mask_key = spec.cloud_mask.source.split("#")[1]
                mask = h5[mask_key][:, : len(spec.cloud_mask.bands)]
            products = [p.decode() if isinstance(p, bytes) else str(p) for p in h5[products_key][:]]
            dates = dates_array([p.split("_")[token][:8] for p in products])
            out[name] = (data, mask, dates)
    with rasterio.open(root / "aerial" / f"{TILE}.tif") as src:
        aerial = src.read()[:, 2:302, 2:302][None]  # official 2 px shift: 304 -> 300
    out["aerial"] = (aerial, None, dates_array(["20190701"]))
    return out


@pytest.mark.parametrize("fixture, last", [("expected.npz", False), ("expected_offset_last.npz", True)])
def test_eval_selection_matches_official_reader(raw_tile, oracle_dir, fixture, last):
    expected = np.load(oracle_dir / "treesat_real_val" / fixture)
    first = np.load(oracle_dir / "treesat_real_val" / "expected.npz")
    raw_dates = np.load(oracle_dir / "treesat_real_val" / "raw_dates.npz")
    manifest = load_manifest("treesatai-ts")
    compared = []
    for name, spec in manifest.modalities.items():
        data, mask, dates = raw_tile[name]
        if f"{name}_dates" in raw_dates:
            assert np.array_equal(dates, raw_dates[f"{name}_dates"]), name
        t, d = data.shape[0], spec.temporal_bins
        threshold = spec.cloud_mask.threshold if spec.cloud_mask else 0.0
        idx = select_steps(data, d, mask=mask, threshold=threshold, mode="eval",
                           offset=t % d if last and t > d else 0)
        if f"{name}_selected_index" in expected:
            assert idx.tolist() == expected[f"{name}_selected_index"].tolist(), name
        x, chosen_dates = apply_selection(data, dates, idx)
        out = normalise(x, spec.log_scale, spec.norm_factor)
        ref = expected[name] if name in expected or name != "aerial" else first["aerial"]  # compact oracle
        assert out.dtype == np.float32 and out.shape == ref.shape, name
        np.testing.assert_array_equal(out, ref, err_msg=name)
        np.testing.assert_array_equal(chosen_dates, expected[f"{name}_dates"], err_msg=name)
        compared.append(name)
    assert compared == list(manifest.modalities) and len(compared) == 4, compared
    if "aerial" in expected and last:  # the full oracle: the aerial output does not depend on the offset
        np.testing.assert_array_equal(expected["aerial"], first["aerial"])


def test_s2_mask_flags_match_official(raw_tile, oracle_dir):
    expected = np.load(oracle_dir / "treesat_real_val" / "expected.npz")
    data, mask, _ = raw_tile["s2"]
    threshold = load_manifest("treesatai-ts").modalities["s2"].cloud_mask.threshold
    flags = (mask > threshold).any(axis=(1, 2, 3))
    assert np.array_equal(flags, expected["s2_raw_step_has_masked_pixel"])
