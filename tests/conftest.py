"""Shared fixtures: the REAL data and the official-model oracle, and synthetic layouts.

Real data and oracle come from the full fixtures in ``../shared`` (beside the repository) when that folder holds them,
else from the compact copies committed under ``tests/data`` (see tests/data/README.md), so a fresh clone runs every
real-data and oracle test. Set ``MAESTRO_TESTS_COMPACT=1`` to use the committed copies even where ../shared exists.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"  # committed: the official test tile, the compact oracle, the FLAIR-HUB toy split CSVs
SHARED = TESTS.parent.parent / "shared"
USE_SHARED = SHARED.is_dir() and os.environ.get("MAESTRO_TESTS_COMPACT", "") in ("", "0")


def _pick(shared: str, committed: Path) -> Path:
    """The ../shared copy when present (and not overridden), else the committed one."""
    full = SHARED / shared
    return full if USE_SHARED and full.exists() else committed


REAL_SAMPLE = _pick("data/treesatai-ts-sample", DATA / "treesatai-ts-sample")
# six real tiles (train/val/test) in ../shared; a fresh clone uses the one committed tile (train.csv only):
# tests over REAL_MINI derive their expected counts from the split CSVs (see real_split_counts)
REAL_MINI = _pick("data/treesatai-ts-mini", REAL_SAMPLE)
FLAIR_TOY_SPLITS = _pick("data/flair-hub-toy-splits", DATA / "flair-hub-toy-splits")
ORACLE = _pick("reference/oracle", DATA / "oracle")
ORACLE_IS_COMPACT = ORACLE == DATA / "oracle"
# model-oracle cases available in ORACLE: all four with ../shared, treesat_intergroup in the compact copy
ORACLE_CASES = (
    tuple(sorted(p.name for p in ORACLE.iterdir() if (p / "config.json").is_file())) if ORACLE.is_dir() else ()
)
# official resize_and_rescale outputs (only committed; not part of ../shared): tests/data/README.md
RESIZE_ORACLE = DATA / "oracle" / "resize_rescale.npz"

pytest_plugins = ("fakes", "streamkit")  # memory_source; the stream tests' shard sets (mem, synthetic)


def require(path: Path) -> Path:
    """Committed test data is always there: a missing path is a broken checkout, a failure rather than a skip."""
    if not path.exists():
        pytest.fail(f"{path} is absent: tests/data is part of the repository (see tests/data/README.md)")
    return path


def real_split_counts(root: Path) -> dict[str, int]:
    """Tiles per split as the TreeSatAI-TS split CSVs in ``root`` list them (0 where a CSV is absent)."""
    counts = {}
    for split in ("train", "val", "test"):
        path = root / f"{split}.csv"
        counts[split] = sum(1 for _ in csv.DictReader(path.open())) if path.is_file() else 0
    return counts


@pytest.fixture
def real_sample() -> Path:
    return require(REAL_SAMPLE)


@pytest.fixture
def real_mini() -> Path:
    return require(REAL_MINI)


@pytest.fixture
def oracle_dir() -> Path:
    return require(ORACLE)
