"""Subsets stored in the tile store: FPS per split, nested tiers, and MAESTRO's published CSVs imported instead."""

from __future__ import annotations

import numpy as np
import pytest

from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.subsets import fps_subsets, subset_count
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import StoreError
from maestro_data.manifest import load_manifest

MANIFEST = load_manifest("treesatai-ts")


@pytest.fixture
def store_path(tmp_path, memory_source):
    memory_source.update(n=60)
    (tmp_path / "raw").mkdir()
    build_store(MANIFEST, tmp_path / "raw", tmp_path / "out", BuildOptions(quiet=True, block_tiles=16))
    return tmp_path / "out"


def test_fps_subsets_are_stored_per_split_and_nested(store_path):
    counts = compute_subsets(store_path, (5, 20))
    store = TileStore(store_path)
    for split in ("train", "val", "test"):
        idx = store.split_indices(split)
        n = len(idx)
        assert counts[split] == {5: subset_count(n, 5), 20: subset_count(n, 20)}
        order, stored = store.subsets(split)
        assert stored == counts[split] and len(order) == counts[split][20]
        expected = fps_subsets([store.tile_ids[i] for i in idx], store.lon[idx], store.lat[idx], (5, 20))
        assert [store.tile_ids[i] for i in order] == expected[20]
        tiers = dict(store.tiers(split))
        assert sorted(np.concatenate(list(tiers.values())).tolist()) == sorted(idx.tolist())
        assert len(tiers["5"]) == counts[split][5]
    assert TileStore(store_path).attrs["complete"]


def _write_csv(path, ids):
    path.write_text("aerial_name,sen_name,aerial_date\n" + "".join(f"{t}.tif,{t}_2019.h5,20190701\n" for t in ids))


def test_published_split_csvs_are_imported(store_path, tmp_path):
    store = TileStore(store_path)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    chosen = {}
    for split in ("train", "val", "test"):
        ids = [store.tile_ids[i] for i in store.split_indices(split)]
        chosen[split] = ids
        _write_csv(csv_dir / f"{split}_filtered_20.csv", ids[-4:])
        _write_csv(csv_dir / f"{split}_filtered_5.csv", ids[-2:])
    counts = compute_subsets(store_path, (5, 20), splits_from=csv_dir)
    assert counts["train"] == {5: 2, 20: 4}
    order, _ = TileStore(store_path).subsets("train")
    assert [store.tile_ids[i] for i in order[:2]] == chosen["train"][-2:]
    assert set(store.tile_ids[i] for i in order) == set(chosen["train"][-4:])
    _write_csv(csv_dir / "train_filtered_5.csv", chosen["train"][:1])
    with pytest.raises(StoreError, match="train: the 20 % subset does not contain the smaller subsets"):
        compute_subsets(store_path, (5, 20), splits_from=csv_dir)
    _write_csv(csv_dir / "train_filtered_5.csv", ["no-such-tile"])
    with pytest.raises(StoreError, match="train_filtered_5.csv: 1 tile ids are not in the store"):
        compute_subsets(store_path, (5, 20), splits_from=csv_dir)


@pytest.mark.parametrize("percents", [(5, 100), (2.5, 20), (0, 20), (20, 20)])
def test_subset_percentages_must_name_distinct_tiers(store_path, percents):
    with pytest.raises(StoreError, match="distinct whole numbers between 0 and 100"):
        compute_subsets(store_path, percents)


def test_pastis_subsets_are_imported_for_the_built_fold(tmp_path):
    from maestro_data.sources import SourceOptions
    from maestro_data.synthetic import generate

    src = generate("pastis-hd", tmp_path / "raw", tiles=10, seed=4)
    manifest = load_manifest("pastis-hd")
    build_store(manifest, src, tmp_path / "out", BuildOptions(quiet=True, source=SourceOptions(fold=2)))
    store = TileStore(tmp_path / "out")
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for split in ("train", "val", "test"):
        ids = [store.tile_ids[i] for i in store.split_indices(split)]
        for p in (5, 20):
            (csv_dir / f"{split}_filtered_{p}_fold_2.csv").write_text("image\n" + "".join(f"{t}\n" for t in ids[:1]))
    counts = compute_subsets(tmp_path / "out", (5, 20), splits_from=csv_dir)
    assert all(c == {5: 1, 20: 1} for split, c in counts.items() if len(store.split_indices(split)))
