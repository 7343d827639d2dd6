"""PASTIS-HD splits as the official reader chooses them, and the record of which files decided them.

Without ``--fold``: MAESTRO's train.csv / val.csv / test.csv when present, else the paper's fold rule (train 1-3,
val 4, test 5); ``--fold k``: ``{stage}_fold_{k}.csv`` when present, else the rule rotated by k-1. The build
report, the store and the shard index say which it was; a store built with the old default (``--fold 1``
implied, reading the fold-1 files) is flagged by ``info``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from maestro_cli.data import main
from maestro_data.build.pipeline import compute_subsets
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import SourceError
from maestro_data.manifest import load_manifest
from maestro_data.sources import SourceOptions, open_source
from maestro_data.stream.loader import StreamConfig, make_loader
from maestro_data.synthetic import generate

MANIFEST = load_manifest("pastis-hd")
STAGES = ("train", "val", "test")


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source holding MAESTRO's default split files and the fold-1 and fold-2 files (10 tiles)."""
    return generate("pastis-hd", tmp_path_factory.mktemp("both"), tiles=10, seed=1, maestro_csvs=True,
                    fold_csvs=(1, 2))


def _listed(root: Path, name: str) -> list[str]:
    """Ids of a split CSV's ``image`` column, read independently of the reader."""
    with (root / name).open(newline="") as fh:
        return [row["image"] for row in csv.DictReader(fh)]


def _splits(root: Path, fold: int | None, on_error: str = "fail") -> tuple[dict[str, str], dict]:
    source = open_source(MANIFEST, root, SourceOptions(fold=fold, on_error=on_error))
    return {r.tile_id: r.split for r in source.list_tiles()}, source.split_origin


def _fold_of(root: Path) -> dict[str, int]:
    meta = json.loads((root / "metadata.geojson").read_text())
    return {str(f["properties"]["ID_PATCH"]): f["properties"]["Fold"] for f in meta["features"]}


def test_default_reads_maestro_split_files_and_differs_from_fold_one(both: Path) -> None:
    default, origin = _splits(both, None)
    assert default == {t: s for s in STAGES for t in _listed(both, f"{s}.csv")}
    assert origin == {"rule": "csv", "fold": None, "files": ["train.csv", "val.csv", "test.csv"], "missing": []}
    fold1, origin1 = _splits(both, 1)
    assert fold1 == {t: s for s in STAGES for t in _listed(both, f"{s}_fold_1.csv")}
    assert origin1["files"] == ["train_fold_1.csv", "val_fold_1.csv", "test_fold_1.csv"]
    assert default != fold1  # the case: the old default (fold 1 files) put tiles elsewhere


def test_fold_option_reads_its_files_else_rotates_the_fold_rule(both: Path) -> None:
    fold2, origin = _splits(both, 2)
    assert fold2 == {t: s for s in STAGES for t in _listed(both, f"{s}_fold_2.csv")}
    assert origin["rule"] == "csv" and origin["fold"] == 2
    fold3, origin = _splits(both, 3)  # no fold-3 files: the Fold column, rotated
    rotated = {3: "train", 4: "train", 5: "train", 1: "val", 2: "test"}
    assert fold3 == {t: rotated[f] for t, f in _fold_of(both).items()}
    assert origin == {"rule": "folds", "fold": 3, "files": ["metadata.geojson"],
                      "assignment": {"train": [3, 4, 5], "val": [1], "test": [2]}}


def test_default_without_maestro_files_is_fold_rule_one_not_the_fold_files(tmp_path: Path) -> None:
    root = generate("pastis-hd", tmp_path, tiles=5, seed=2, fold_csvs=(1,))
    (root / "train_fold_1.csv").write_text(",image\n0,10000\n")  # would differ from the rule if it were read
    got, origin = _splits(root, None)
    rule = {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
    assert got == {t: rule[f] for t, f in _fold_of(root).items()}
    assert origin["rule"] == "folds" and origin["fold"] is None
    assert origin["assignment"] == {"train": [1, 2, 3], "val": [4], "test": [5]}


def test_missing_and_bad_default_split_files(both: Path, tmp_path: Path) -> None:
    root = tmp_path / "pastis-hd"
    shutil.copytree(both, root, copy_function=os.link)
    (root / "test.csv").unlink()
    with pytest.raises(SourceError, match=r"test\.csv: split file for 'test' not found"):
        _splits(root, None)
    with pytest.warns(UserWarning, match="test"):
        got, origin = _splits(root, None, on_error="skip")
    assert set(got.values()) == {"train", "val"} and origin["missing"] == ["test.csv"]
    (root / "test.csv").mkdir()
    with pytest.raises(SourceError, match=r"test\.csv: split file for 'test' is a directory, expected a file"):
        _splits(root, None)
    (root / "test.csv").rmdir()
    (root / "val.csv").unlink()
    (root / "val.csv").write_text(",image\n0,99999\n")
    source = open_source(MANIFEST, root, SourceOptions(on_error="skip"))
    with pytest.warns(UserWarning, match="test"):
        ref = next(r for r in source.list_tiles() if r.tile_id == "99999")
    with pytest.raises(SourceError, match=r"99999.*val\.csv.*no feature"):
        source.probe(ref)
    (root / "val.csv").unlink()
    (root / "val.csv").write_text("patch\n10000\n")
    with pytest.raises(SourceError, match=r"val\.csv.*'image'|'image'.*val\.csv"), pytest.warns(UserWarning):
        _splits(root, None, on_error="skip")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store and shards built with the default from a small source holding both kinds of split files."""
    tmp = tmp_path_factory.mktemp("built")
    src = generate("pastis-hd", tmp / "raw", tiles=5, seed=1, maestro_csvs=True, fold_csvs=(1,))
    out = tmp / "out"
    result = CliRunner().invoke(main, ["build", "pastis-hd", "--src", str(src), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_build_report_store_and_index_say_which_files_decided(built: tuple[Path, str]) -> None:
    out, output = built
    assert "splits from: train.csv, val.csv, test.csv (no --fold)" in output
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["files"] == ["train.csv", "val.csv", "test.csv"]
    info = CliRunner().invoke(main, ["info", str(out / "store.zarr")])
    assert "splits from: train.csv, val.csv, test.csv (no --fold)" in info.output and "warning" not in info.output
    summary = json.loads(CliRunner().invoke(main, ["info", str(out / "store.zarr"), "--json"]).output)
    assert summary["split_origin"] == report["splits"] and summary["old_split_default"] is False
    index = json.loads(CliRunner().invoke(main, ["info", str(out / "shards"), "--json"]).output)
    assert index["split_origin"] == report["splits"] and index["old_split_default"] is False


def test_a_store_built_with_the_old_default_is_reported(built: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = built
    old = tmp_path / "store.zarr"
    shutil.copytree(out / "store.zarr", old)
    root = zarr.open_group(str(old), mode="r+")
    provenance = dict(root.attrs["provenance"])
    del provenance["splits"]  # what a build before split records wrote, with its implied --fold 1
    provenance["source_options"] = {"split_set": None, "fold": 1}
    root.attrs["provenance"] = provenance
    summary = TileStore(old).summary()
    assert summary["old_split_default"] is True and "OLD split default" in summary["splits_from"]
    result = CliRunner().invoke(main, ["info", str(old)])
    assert result.exit_code == 0 and "train.csv / val.csv / test.csv" in result.output
    assert "warning: built with the old split default" in result.output
    provenance["source_options"]["fold"] = 2  # an explicit other fold means the same today: no warning
    root.attrs["provenance"] = provenance
    assert TileStore(old).summary()["old_split_default"] is False


def test_shards_written_before_the_change_still_stream_and_are_flagged(built: tuple[Path, str],
                                                                       tmp_path: Path) -> None:
    out, _ = built
    shards = tmp_path / "shards"
    shutil.copytree(out / "shards", shards, copy_function=os.link)
    index = json.loads((shards / "index.json").read_text())
    del index["split_origin"]
    (shards / "index.json").unlink()
    (shards / "index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(main, ["info", str(shards)])
    assert result.exit_code == 0 and "not recorded" in result.output and "old split default" in result.output
    loader = make_loader(StreamConfig(str(shards), "val", mode="eval", batch_size=4), MANIFEST)
    rows = sum(int(b["valid"].sum()) for b in loader)
    assert rows == 64 * TileStore(out).summary()["splits"]["val"] > 0  # every 8 x 8 crop of every val tile


def test_subsets_of_a_default_build_are_imported_without_a_fold_suffix(built: tuple[Path, str],
                                                                         tmp_path: Path) -> None:
    out, _ = built
    shutil.copytree(out / "store.zarr", tmp_path / "store.zarr")
    store = TileStore(tmp_path)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for split in STAGES:
        first = store.tile_ids[store.split_indices(split)[0]]
        for p in (5, 20):
            (csv_dir / f"{split}_filtered_{p}.csv").write_text(f"image\n{first}\n")
    assert compute_subsets(tmp_path, (5, 20), splits_from=csv_dir) == {s: {5: 1, 20: 1} for s in STAGES}
