"""Options are refused before any work, empty subsets are said, and a failed write (disk full) is one line that a
--resume recovers from, ending with the store an uninterrupted build writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from maestro_cli.data import main
from maestro_data.build.tile_store import TileStore
from maestro_data.synthetic import generate


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return generate("treesatai-ts", tmp_path_factory.mktemp("raw") / "src", tiles=6, seed=5)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--percents", "", "is not a comma-separated list of whole percentages"),
    ("--percents", "abc", "is not a comma-separated list"),
    ("--percents", "2.5", "is not a comma-separated list"),
    ("--percents", "120", "between 0 and 100"),
    ("--percents", "5,5", "distinct"),
    ("--shard-size", "-1GB", "at least 1 KiB"),
    ("--shard-size", "12 parsecs", "is not a size"),
    ("--block-tiles", "0", "0 is not in the range x>=1"),
    ("--workers", "0", "0 is not in the range x>=1"),
    ("--limit", "-3", "-3 is not in the range x>=1"),
])
def test_bad_options_fail_before_any_tile_is_read(raw, tmp_path, option, value, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(raw), "--out", str(out), "--quiet",
                                       option, value])
    assert result.exit_code == 2 and message in result.output and option in result.output
    assert not out.exists()


def test_empty_subset_tiers_are_said_at_build_and_by_info(raw, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "treesatai-ts", "--src", str(raw), "--out", str(out), "--quiet",
                                       "--no-shards"])
    assert result.exit_code == 0, result.output
    assert "warning: the 5 % subset of split 'val' is empty: 5 % of its" in result.output
    info = CliRunner().invoke(main, ["info", str(out)])
    assert "(empty 5%: 5 % of" in info.output and "tiles rounds to 0)" in info.output


WRITER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from maestro_cli.data import main
sys.exit(main())
"""


def _disk(tmp_path: Path) -> tuple[Path, int | None]:
    """A 200 kB tmpfs (a real 'No space left on device') where this machine lets us mount one, else None: the
    build is then limited by RLIMIT_FSIZE ('File too large'), the same failure of a write for the code."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True).returncode
    return mnt, (None if ok == 0 else 60_000)


def test_a_full_disk_is_one_line_and_resume_completes(raw, tmp_path):
    mnt, fsize = _disk(tmp_path)
    try:
        out = mnt / "out"
        args = ["build", "treesatai-ts", "--src", str(raw), "--out", str(out), "--quiet", "--no-shards",
                "--block-tiles", "1"]
        (tmp_path / "writer.py").write_text(textwrap.dedent(WRITER))
        cmd = [sys.executable, str(tmp_path / "writer.py"), str(fsize or 1 << 40), *args]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
        assert first.returncode == 1, first.stderr
        err = first.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and "Traceback" not in first.stderr
        assert ("No space left on device" in err[0]) if fsize is None else ("File too large" in err[0])
        assert str(out) in err[0] and "--resume" in err[0]
        if fsize is None:  # free space: grow the disk
            subprocess.run(["mount", "-o", "remount,size=50m", str(mnt)], check=True)
        second = CliRunner().invoke(main, [*args, "--resume"])
        assert second.exit_code == 0, second.output
        whole = tmp_path / "whole"
        assert CliRunner().invoke(main, [*args[:5], str(whole), *args[6:]]).exit_code == 0
        a, b = TileStore(out), TileStore(whole)
        assert a.tile_ids == b.tile_ids and a.verify(full=True) == []
        for i in range(len(a)):
            ta, tb = a.read_tile(i), b.read_tile(i)
            assert all(np.array_equal(ta.series[m].data, tb.series[m].data, equal_nan=True) for m in ta.series)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
