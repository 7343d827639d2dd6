"""Loader worker processes: the in-process batches over several epochs from workers that live across them, batch
memory reused (never a new segment in the steady state), page-locked once per slot, released by the consumer, a
killed worker named (no hang) and resumed from exactly, and no shared-memory segment left behind."""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import signal
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from streamkit import TREESAT, same_batches

import maestro_data.stream.loader as stream_mod
import maestro_data.stream.slots as slots_mod
import maestro_data.stream.workers as workers_mod
from maestro_data.errors import StreamError
from maestro_data.stream.collate import BatchBuffer
from maestro_data.stream.loader import StreamConfig, make_loader

KW = dict(batch_size=2, block_samples=4, seed=3)


@pytest.fixture(autouse=True)
def segments(monkeypatch) -> list[str]:
    """Names of the shared-memory segments the loaders of a test create; none may outlive the test."""
    names: list[str] = []

    class Recorded(slots_mod.SharedMemory):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            names.append(self.name)

    monkeypatch.setattr(slots_mod, "SharedMemory", Recorded)
    yield names
    gc.collect()
    left = [n for n in names if Path("/dev/shm", n.lstrip("/")).exists()]
    assert not left, f"shared-memory segments left behind: {left}"


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: the loader must notice a dead worker by itself."""
    def expired(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def epochs(index: Path, workers: int, count: int, **kw) -> list[list[dict]]:
    loader = make_loader(StreamConfig(str(index), "train", num_workers=workers, **{**KW, **kw}), TREESAT)
    out = []
    for e in range(count):
        loader.set_epoch(e)
        out.append(list(loader))
    loader.close()
    return out


def test_workers_live_across_epochs_and_reuse_their_batch_memory(mem):
    expected = epochs(mem, 0, 3)
    for workers in (1, 2):
        loader = make_loader(StreamConfig(str(mem), "train", num_workers=workers, **KW), TREESAT)
        pids, created = None, []
        for e in range(3):
            loader.set_epoch(e)
            n = 0
            for i, batch in enumerate(loader):  # one batch held at a time, as a training loop does
                assert same_batches([batch], [expected[e][i]]), (workers, e, i)
                n += 1
            assert n == len(expected[e]) == len(loader)
            pids = pids or loader.worker_pids
            assert loader.worker_pids == pids and len(pids) == workers
            created.append(loader._workers.slots.created)
        assert created[1] == created[2]  # the steady state makes no segment: the epochs reuse the ring
        loader.close()
        assert loader.worker_pids == [] and all(_gone(p) for p in pids)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_batches_held_by_the_consumer_stay_valid_and_extra_memory_is_given_back(mem, segments):
    kw = {**KW, "batch_size": 1, "block_samples": 1, "prefetch_factor": 1}  # a ring of 4 batches
    expected = epochs(mem, 0, 2, **kw)
    loader = make_loader(StreamConfig(str(mem), "train", num_workers=1, **kw), TREESAT)
    held = list(loader)  # every batch of the epoch at once: more than the ring holds
    keep = loader._workers.slots.keep
    assert len(held) > keep and same_batches(held, expected[0])
    del held
    gc.collect()
    live = [n for n in segments if Path("/dev/shm", n.lstrip("/")).exists()]
    assert len(live) <= keep  # released beyond the ring: unlinked
    loader.set_epoch(1)
    assert same_batches(list(loader), expected[1])  # the worker unmapped them and goes on
    loader.close()


def test_an_abandoned_epoch_a_resume_point_and_a_skipped_epoch_reuse_or_drop_prefetched_blocks(mem):
    expected = epochs(mem, 0, 4)
    loader = make_loader(StreamConfig(str(mem), "train", num_workers=2, **KW), TREESAT)
    for i, _ in enumerate(loader):
        if i == 2:
            break  # blocks of epoch 0 still asked for: dropped below
    loader.set_epoch(2)  # not the epoch built ahead (1)
    assert same_batches(list(loader), expected[2])
    loader.set_epoch(3)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 3:
            break
    state = loader.state_dict()
    loader.load_state_dict(state)  # from batch 3: the outstanding blocks from 0 on serve the resume
    assert same_batches(head + list(loader), expected[3])
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)
    with pytest.raises(StreamError, match="one iteration at a time"):
        list(first)
    loader.close()


def test_a_killed_worker_is_named_and_the_loader_resumes_exactly(mem):
    cfg = StreamConfig(str(mem), "train", num_workers=2, batch_size=1, block_samples=1, seed=3)
    reference = make_loader(StreamConfig(str(mem), "train", batch_size=1, block_samples=1, seed=3), TREESAT)
    reference.set_epoch(1)
    expected = list(reference)
    loader = make_loader(cfg, TREESAT)
    loader.set_epoch(1)
    head = []
    with deadline(60), pytest.raises(StreamError) as info:
        for batch in loader:
            head.append(batch)
            if len(head) == 1:
                victim = loader.worker_pids[1]
                os.kill(victim, signal.SIGKILL)
    message = str(info.value)
    assert f"loader worker 1 (pid {victim}) was killed by SIGKILL" in message and "block" in message
    assert loader.worker_pids == []  # the other worker was stopped too
    state = loader.state_dict()
    assert state["batches_consumed"] == len(head) < len(expected)
    resumed = make_loader(cfg, TREESAT)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert same_batches(head + list(resumed), expected)
    loader.load_state_dict(state)  # the same loader starts new workers
    assert same_batches(head + list(loader), expected)
    for x in (loader, resumed):
        x.close()


def test_a_failing_sample_in_a_worker_raises_the_toolkit_error(mem, tmp_path):
    from streamkit import copy_shards

    index = copy_shards(mem, tmp_path / "shards")
    shard = sorted((index / "val").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = b"\x01" * (len(data) - len(data) // 2)
    shard.write_bytes(bytes(data))
    loader = make_loader(StreamConfig(str(index), "val", mode="eval", num_workers=1), TREESAT)
    with pytest.raises(StreamError, match=rf"{shard.name}.*sample '"):
        list(loader)
    skip = make_loader(StreamConfig(str(index), "val", mode="eval", num_workers=1, on_error="skip"), TREESAT)
    batches = list(skip)
    assert len(batches) == len(skip) and skip.skipped
    assert sum(int(b["valid"].sum()) for b in batches) == skip.num_samples - len(skip.skipped)
    for x in (loader, skip):
        x.close()


def test_pin_memory_locks_each_slot_once_and_waits_for_copies_before_reuse(mem, monkeypatch):
    log: list[tuple[str, int]] = []

    class Pinner:  # CudaPinner's calls, recorded (no CUDA here)
        def register(self, slot, shm):
            log.append(("register", slot))

        def released(self, slot):
            log.append(("released", slot))

        def ready(self, slot):
            log.append(("ready", slot))

        def unregister(self, slot):
            log.append(("unregister", slot))

    monkeypatch.setattr(stream_mod, "make_pinner", lambda pin: Pinner() if pin else None)
    expected = epochs(mem, 0, 3)
    loader = make_loader(StreamConfig(str(mem), "train", num_workers=1, pin_memory=True, **KW), TREESAT)
    consumed = 0
    for e in range(3):
        loader.set_epoch(e)
        for i, batch in enumerate(loader):
            assert same_batches([batch], [expected[e][i]])
            consumed += 1
    created = loader._workers.slots.created
    loader.close()  # the last batch is still held: its slot is unlocked and unmapped once released
    del batch
    calls = {k: [s for c, s in log if c == k] for k in ("register", "released", "ready", "unregister")}
    assert sorted(calls["register"]) == list(range(created))  # once per slot, never again on reuse
    assert len(calls["released"]) == consumed  # an event recorded per released batch
    last: dict[int, str] = {}
    for call, slot in log:  # a slot is refilled (ready) only after its last lending was released
        assert call != "ready" or last.get(slot) == "released", (call, slot)
        last[slot] = call
    assert calls["ready"] and sorted(calls["unregister"]) == sorted(calls["register"])


def test_pin_memory_without_cuda_warns_and_keeps_pageable_batches(caplog):
    with caplog.at_level("WARNING", logger="maestro_data.stream.slots"):
        pinner = slots_mod.make_pinner(True)
    if torch.cuda.is_available():
        pytest.skip("a CUDA host pins for real")
    assert pinner is None and "no CUDA device" in caplog.text
    assert slots_mod.make_pinner(False) is None


def test_what_a_spawned_worker_receives_pickles_and_a_small_dev_shm_is_announced(mem, monkeypatch, caplog):
    loader = make_loader(StreamConfig(str(mem), "val", mode="eval", **KW), TREESAT)
    builder, plan = loader._builder(), loader.plan(0)
    spec, d4_key = builder.buffer_spec()
    builder.build(plan, 0, 0, [BatchBuffer(spec, plan.batch_size, d4_key) for _ in range(plan.block_size(0))])
    assert builder.reader is not None
    again = pickle.loads(pickle.dumps((builder, loader.planner)))  # what a spawned worker is started with
    assert again[1].plan(0).slots.tolist() == loader.plan(0).slots.tolist() and again[0].reader is None
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1 << 20))
    with caplog.at_level("WARNING", logger="maestro_data.stream.workers"):
        small = make_loader(StreamConfig(str(mem), "val", mode="eval", num_workers=1, **KW), TREESAT)
        list(small)
        small.close()
    assert "/dev/shm has 1 MB free" in caplog.text and "--shm-size" in caplog.text
    assert "is /dev/shm full?" in workers_mod._describe_exit(-signal.SIGBUS, 800)
