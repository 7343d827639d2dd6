"""Real torch.distributed (gloo, CPU) runs of the loader: world sizes 1-4 (sub-groups of one 4-process world) x
workers 0-2 on uneven shards (fewer shards than ranks x workers): every rank sees the world size, yields the same
number of batches (a collective per batch would hang otherwise; the groups have a timeout), and eval sees every
sample exactly once."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fakes import MemorySource

import maestro_data.build.pipeline as build_mod
from maestro_data.build.pipeline import BuildOptions, build_store
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.manifest import load_manifest

TIMEOUT = datetime.timedelta(seconds=30)
# (workers, mode, split): workers 0, 1 and 2 on every world size, train and eval (kept few: each rank is a process)
CASES = ((0, "train", "train"), (1, "train", "pretrain"), (0, "eval", "val"), (2, "eval", "test"))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """13 tiles: train/val/test of 5/4/4 tiles in 2-3 shards of unequal sizes."""
    root = tmp_path_factory.mktemp("dist")
    (root / "raw").mkdir()
    manifest = load_manifest("treesatai-ts")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(build_mod, "open_source", lambda man, r, o=None: MemorySource(man, r, o, n=13))
        build_store(manifest, root / "raw", root / "out", BuildOptions(quiet=True))
    write_shards(root / "out", root / "shards", ShardOptions(shard_bytes=1_200_000, quiet=True))
    return root / "shards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, index: str, out: str) -> None:
    from maestro_data.stream.loader import StreamConfig, make_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        results = []
        for size in range(1, world + 1):  # sub-worlds of 1..world ranks: one process start for all sizes
            group = dist.new_group(list(range(size)), timeout=TIMEOUT)  # every rank must take part in new_group
            if rank >= size:
                continue
            for workers, mode, split in CASES:
                config = StreamConfig(index, split, mode=mode, batch_size=2, num_workers=workers, block_samples=2,
                                      mp_context="fork")  # a spawned worker would re-import torch: slow
                # the full world takes rank and world size from torch.distributed itself
                loader = (make_loader(config) if size == world
                          else make_loader(config, rank=rank, world_size=size))
                n = 0
                seen = []
                for batch in loader:
                    dist.all_reduce(torch.ones(1), group=group)  # hangs (then times out) if a rank had fewer
                    n += 1
                    seen += [(t, int(c)) for t, c, v in zip(batch["tile_id"], batch["crop_index"], batch["valid"],
                                                            strict=True) if v]
                results.append({"size": size, "workers": workers, "mode": mode, "batches": n, "len": len(loader),
                                "world": dist.get_world_size(group), "seen": seen,
                                "num_samples": loader.num_samples})
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def test_equal_batches_on_every_rank_with_gloo(uneven, tmp_path):
    world = 4
    out = tmp_path / "result.pt"
    mp.start_processes(_worker, args=(world, _free_port(), str(uneven), str(out)), nprocs=world, join=True,
                       start_method="spawn")
    per_rank = torch.load(out, weights_only=False)
    assert len(per_rank) == world
    runs_by_case: dict[tuple, list[dict]] = {}
    for results in per_rank:
        for r in results:
            runs_by_case.setdefault((r["size"], r["workers"], r["mode"]), []).append(r)
    assert len(runs_by_case) == world * len(CASES)
    for (size, _, mode), runs in runs_by_case.items():
        assert len(runs) == size and {r["world"] for r in runs} == {size}
        assert len({r["batches"] for r in runs}) == 1 and runs[0]["batches"] == runs[0]["len"] > 0
        if mode == "eval":
            seen = [s for r in runs for s in r["seen"]]
            assert len(seen) == len(set(seen)) == runs[0]["num_samples"]
