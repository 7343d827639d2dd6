"""Shared fixtures: the REAL data in ../shared (skipped with a reason where absent) and synthetic layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_SAMPLE = SHARED / "data" / "treesatai-ts-sample"
REAL_MINI = SHARED / "data" / "treesatai-ts-mini"
FLAIR_TOY_SPLITS = SHARED / "data" / "flair-hub-toy-splits"
ORACLE = SHARED / "reference" / "oracle"

pytest_plugins = ("fakes", "streamkit")  # memory_source; the stream tests' shard sets (mem, synthetic)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared/ folder beside the repository holds the real data)")
    return path


@pytest.fixture
def real_sample() -> Path:
    return require(REAL_SAMPLE)


@pytest.fixture
def real_mini() -> Path:
    return require(REAL_MINI)


@pytest.fixture
def oracle_dir() -> Path:
    return require(ORACLE)
