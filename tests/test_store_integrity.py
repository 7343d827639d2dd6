"""A tile store never serves fill values for data that was written and then lost: deleted, truncated or altered
chunk files are named with their tiles by reads, `verify`, `shard`, and converted again by `build --resume`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from maestro_cli.data import main
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.build.tile_store import TileStore
from maestro_data.errors import StoreError
from maestro_data.manifest import load_manifest
from maestro_data.synthetic import generate

MANIFEST = load_manifest("treesatai-ts")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return generate("treesatai-ts", tmp_path_factory.mktemp("raw") / "src", tiles=6, seed=3)


def _build(raw: Path, out: Path, **kw) -> Path:
    build_store(MANIFEST, raw, out, BuildOptions(quiet=True, block_tiles=2, **kw))
    compute_subsets(out)
    return out / "store.zarr"


def _arrays(store: TileStore) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for i in range(len(store)):
        tile = store.read_tile(i)
        for m, s in tile.series.items():
            out.setdefault(m, []).extend([s.data, s.dates] + ([s.mask] if s.mask is not None else []))
        for t, v in tile.targets.items():
            out.setdefault(t, []).append(v)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a[k], b[k], strict=True))
        for k in a)


@pytest.fixture
def built(raw, tmp_path) -> tuple[Path, dict]:
    store = _build(raw, tmp_path / "out")
    return store, _arrays(TileStore(store))


def test_a_deleted_chunk_is_named_never_read_as_zeros(built, tmp_path, raw):
    store, expected = built
    lost = store / "s2" / "data" / "c" / "1" / "0" / "0" / "0"  # block 1 = tiles 2 and 3
    lost.unlink()
    ts = TileStore(store)
    block1 = ts.tile_ids[2:4]
    with pytest.raises(StoreError, match=rf"{lost}: missing \(written by the build, \d+ bytes\) \(tiles "
                                         rf"{block1[0]}, {block1[1]}\)"):
        ts.read_tile(2)
    assert np.array_equal(ts.read_tile(0).series["s2"].data, TileStore(store).read_tile(0).series["s2"].data)
    result = CliRunner().invoke(main, ["verify", str(store)])
    assert result.exit_code == 1 and f"BAD {lost}: missing" in result.output and block1[0] in result.output
    with pytest.raises(StoreError, match=rf"refusing to write shards from a damaged tile store: {lost}"):
        write_shards(store.parent, tmp_path / "shards", ShardOptions(quiet=True))
    assert not (tmp_path / "shards" / "index.json").exists()
    build_store(MANIFEST, raw, store.parent, BuildOptions(quiet=True, block_tiles=2, resume=True))
    again = TileStore(store)
    assert again.verify(full=True) == [] and _same(_arrays(again), expected)


def test_truncated_and_altered_chunks(built, raw):
    store, expected = built
    chunk = store / "aerial" / "data" / "c" / "0" / "0" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=rf"{chunk}: {len(data) // 2} bytes, the build wrote {len(data)}"):
        TileStore(store).read_tile(0)
    chunk.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])  # same size, other contents
    assert TileStore(store).verify() == []  # sizes only
    assert TileStore(store).verify(full=True)[0].startswith(f"{chunk}: sha256 differs from what the build wrote")
    result = CliRunner().invoke(main, ["verify", str(store.parent), "--full"])
    assert result.exit_code == 1 and "sha256 differs" in result.output
    build_store(MANIFEST, raw, store.parent, BuildOptions(quiet=True, block_tiles=2, resume=True))
    assert TileStore(store).verify(full=True) == [] and _same(_arrays(TileStore(store)), expected)


def test_undecodable_chunk_is_one_line_naming_the_file(built):
    store, _ = built
    chunk = store / "s1_des" / "data" / "c" / "0" / "0" / "0" / "0"
    size = chunk.stat().st_size
    chunk.write_bytes(b"\0" * size)  # same size: passes the cheap check, fails to decode
    with pytest.raises(StoreError, match=r"s1_des/data: chunk of tile '.*' cannot be decoded .*verify"):
        TileStore(store).read_tile(0)


def test_lost_tile_table_and_subsets_are_noticed(built):
    store, _ = built
    (store / "tiles" / "split" / "c" / "0").unlink()
    with pytest.raises(StoreError, match=r"tiles/split/c/0: missing .*the tile table"):
        TileStore(store)


def test_stores_without_integrity_records_are_refused_with_what_to_do(built):
    import zarr

    store, _ = built
    zarr.open_group(str(store), mode="r+").attrs["schema"] = 1
    with pytest.raises(StoreError, match=r"store schema 1 \(built before chunk integrity was recorded\).*--overwrite"):
        TileStore(store)
    zarr.open_group(str(store), mode="r+").attrs["schema"] = 2
    with pytest.raises(StoreError, match=r"store schema 2 \(built before tiles kept their georeference\).*--overwrite"):
        TileStore(store)


def test_info_and_verify_name_absent_paths(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 1 and f"{tmp_path / 'nope'}: does not exist" in result.output
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "afile")])
    assert "is a file, not a tile store folder" in result.output
