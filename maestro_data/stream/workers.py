"""The loader's worker processes: started once, kept across epochs, fed block requests (see ``loader.py``, Workers).

The main process asks worker ``k % W`` for block ``k`` of an epoch, naming the slots (``slots.SlotPool``) it must
fill; the worker plans that epoch itself (``plan.Planner``: only epoch numbers and slot ids cross the pipe), builds
the block into the slots and answers with the tile ids and skipped elements. At most ``prefetch`` requests per
worker are outstanding. Once every block of the epoch is asked for, the next requests are the first blocks of
epoch + 1 (what ``set_epoch(epoch + 1)`` will ask for), so the next epoch's first batch is ready when ``iter()`` is
called; an iteration that asks for something else (another epoch, a resume point, an abandoned epoch) uses the
outstanding answers that fit and gives the others' slots back.

A worker that dies (killed, out of memory) is noticed by its process sentinel while the main process waits: the
pool stops its other workers, frees the slots and raises a ``StreamError`` naming the worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import torch

from maestro_data.errors import MaestroError, StreamError
from maestro_data.stream.blocks import BlockBuilder
from maestro_data.stream.collate import BatchBuffer
from maestro_data.stream.plan import Planner
from maestro_data.stream.slots import Pinner, SlotLayout, SlotPool

log = logging.getLogger(__name__)
WATCHDOG_S = 1.0  # an idle worker checks this often that the main process still exists


@dataclass(frozen=True)
class Request:
    """Build block ``block`` of ``epoch`` without its first ``skip`` batches into ``slots`` (one per batch)."""

    tag: int
    epoch: int
    block: int
    skip: int
    slots: tuple[int, ...]
    attach: dict[int, str] = field(default_factory=dict)  # slot id -> segment name, for slots new to the worker
    forget: tuple[int, ...] = ()  # slots unlinked by the main process: unmap them


@dataclass
class _Want:
    """A block the current iteration yields, in order; ``tag`` is that of the request that builds it."""

    epoch: int
    block: int
    skip: int
    worker: int
    tag: int | None = None


class Block:
    """A built block on the main side: its batches are lent one by one (``take``); ``abandon`` gives back the
    slots of those never handed over."""

    def __init__(self, pool: SlotPool, slots: list[int], tile_ids: list[list[str]], skipped: list[dict]):
        self._pool, self._slots, self._tile_ids, self.skipped = pool, deque(slots), deque(tile_ids), skipped

    def __len__(self) -> int:
        return len(self._slots)

    def take(self) -> dict:
        return self._pool.lend(self._slots.popleft(), self._tile_ids.popleft())

    def abandon(self) -> None:
        while self._slots:
            self._pool.give_back(self._slots.popleft())


def _describe_exit(code: int | None, ring_mb: float) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = {signal.SIGKILL: " (the out-of-memory killer sends it)",
                signal.SIGBUS: f" (is /dev/shm full? each worker's batch slots take up to {ring_mb:.0f} MB)"}
        return f"was killed by {name}{hint.get(-code, '')}"
    return f"exited with status {code}"


def _portable(exc: BaseException) -> tuple[BaseException | None, str]:
    """A toolkit error travels as itself when it pickles; anything else as text with its traceback."""
    if isinstance(exc, MaestroError):
        try:
            return pickle.loads(pickle.dumps(exc)), ""
        except Exception:  # noqa: BLE001 - an unpicklable error still travels as text
            pass
    return None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def _serve(worker: int, conn: Connection, builder: BlockBuilder, planner: Planner, layout: SlotLayout,
           parent: int) -> None:
    """A worker's life: answer block requests until told to stop, the pipe closes or the main process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler forked from the trainer: terminate() must stop it
    torch.set_num_threads(1)
    mapped: dict[int, tuple[SharedMemory, dict]] = {}
    spec, d4_key = builder.buffer_spec()
    try:
        while True:
            if not conn.poll(WATCHDOG_S):
                if os.getppid() != parent:
                    return
                continue
            try:
                req = conn.recv()
            except (EOFError, OSError):
                return
            if req is None:
                return
            for sid in req.forget:
                shm, arrays = mapped.pop(sid)
                arrays.clear()
                shm.close()
            for sid, name in req.attach.items():
                shm = SharedMemory(name)
                mapped[sid] = (shm, layout.arrays(layout.view(shm)))
            buffers: list[BatchBuffer] = []
            try:
                plan = planner.plan(req.epoch)
                buffers = [BatchBuffer(spec, plan.batch_size, d4_key, arrays=mapped[sid][1]) for sid in req.slots]
                skipped = builder.build(plan, req.block, req.skip, buffers)
                answer = ("done", req.tag, [buf.as_dict()["tile_id"] for buf in buffers], skipped)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the main process
                answer = ("error", req.tag, *_portable(exc))
            del buffers
            conn.send(answer)
    finally:
        for shm, arrays in mapped.values():
            arrays.clear()
            shm.close()


class WorkerPool:
    """``workers`` processes building blocks into shared-memory slots for one loader (main process side)."""

    def __init__(self, builder: BlockBuilder, planner: Planner, layout: SlotLayout, workers: int, prefetch: int,
                 context: str | None, pinner: Pinner | None = None):
        self.planner, self.prefetch, self.where = planner, prefetch, builder.table.location
        keep = (prefetch + 1) * planner.block_batches + 2  # blocks asked for, the one consumed, the batch held
        self.slots = SlotPool(layout, workers, keep=keep, pinner=pinner)
        self.ring_mb = keep * layout.nbytes / 2**20
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free < workers * self.ring_mb * 2**20:
            log.warning("/dev/shm has %.0f MB free; %d loader workers may need %.0f MB of batch slots (a worker "
                        "writing past it dies of SIGBUS): enlarge it (docker: --shm-size) or lower block_memory_mb",
                        shutil.disk_usage(shm).free / 2**20, workers, workers * self.ring_mb)
        ctx = multiprocessing.get_context(context)
        # one resource tracker for the family, started before the workers: a worker whose attach started its own
        # would unlink the main process's segments when it exits
        resource_tracker.ensure_running()
        self._conns: list[Connection] = []
        self._procs: list = []
        self.closed = False
        try:
            for w in range(workers):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(w, theirs, builder, planner, layout, os.getpid()),
                                   name=f"maestro-loader-worker-{w}", daemon=True)
                proc.start()
                theirs.close()
                self._conns.append(mine)
                self._procs.append(proc)
        except BaseException:
            self.close()
            raise
        self._pending: list[deque[Request]] = [deque() for _ in range(workers)]
        self._todo: deque[_Want] = deque()
        self._ahead: Iterator[_Want] = iter(())
        self._tag = 0
        self._iteration = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def blocks(self, epoch: int, first_batch: int) -> Iterator[Block]:
        """Blocks of ``epoch`` from batch ``first_batch`` on, in order (one live iteration per pool)."""
        self._iteration += 1
        iteration = self._iteration
        plan = self.planner.plan(epoch)
        first = first_batch // plan.block_batches
        wants = [_Want(epoch, k, first_batch - k * plan.block_batches if k == first else 0, k % len(self._procs))
                 for k in range(first, plan.num_blocks)]
        self._match(wants)
        self._todo = deque(w for w in wants if w.tag is None)
        self._ahead = self._next_epoch(epoch + 1)
        for want in wants:
            if iteration != self._iteration:
                raise StreamError(f"{self.where}: another iteration of this loader started; a loader with "
                                  "workers serves one iteration at a time")
            if self.closed:
                raise StreamError(f"{self.where}: the loader was closed during an iteration")
            yield self._collect(want)

    def _next_epoch(self, epoch: int) -> Iterator[_Want]:
        plan = self.planner.plan(epoch)
        for k in range(plan.num_blocks):
            yield _Want(epoch, k, 0, k % len(self._procs))

    def _match(self, wants: list[_Want]) -> None:
        """Outstanding requests that build wanted blocks in the wanted order serve them (a request that skipped
        fewer batches serves a later start); the others are stale: their answers will be dropped."""
        for w, pending in enumerate(self._pending):
            mine = iter([x for x in wants if x.worker == w])
            want = next(mine, None)
            for req in pending:
                if want is not None and (req.epoch, req.block) == (want.epoch, want.block) and req.skip <= want.skip:
                    want.tag = req.tag
                    want = next(mine, None)

    def _top_up(self) -> None:
        """Send requests in the order they will be consumed while their worker has room."""
        while True:
            if not self._todo:
                ahead = next(self._ahead, None)
                if ahead is None:
                    return
                self._todo.append(ahead)
            want = self._todo[0]
            if len(self._pending[want.worker]) >= self.prefetch:
                return
            self._send(self._todo.popleft())

    def _send(self, want: _Want) -> None:
        self._tag += 1
        want.tag = self._tag
        size = self.planner.plan(want.epoch).block_size(want.block) - want.skip
        slots, attach = self.slots.take(want.worker, size)
        req = Request(self._tag, want.epoch, want.block, want.skip, tuple(slots), attach,
                      tuple(self.slots.forget(want.worker)))
        self._pending[want.worker].append(req)
        try:
            self._conns[want.worker].send(req)
        except OSError:
            self._died(want.worker)

    def _collect(self, want: _Want) -> Block:
        w = want.worker
        while True:
            self._top_up()
            try:
                answer = self._receive(w)
                req = self._pending[w].popleft()
            except BaseException:
                self.close()  # e.g. Ctrl-C: an answer may be lost, so later answers could not be matched
                raise
            if req.tag == want.tag:
                break
            for sid in req.slots:  # a stale request: its block is not wanted now
                self.slots.give_back(sid)
        self._top_up()
        if answer[0] == "error":
            for sid in req.slots:
                self.slots.give_back(sid)
            exc, text = answer[2], answer[3]
            raise exc if exc is not None else StreamError(
                f"{self.where}: loader worker {w} failed on block {req.block} of epoch {req.epoch}: {text}")
        drop = want.skip - req.skip  # the request began earlier than this iteration's resume point
        for sid in req.slots[:drop]:
            self.slots.give_back(sid)
        skipped = [s for batch in answer[3][drop:] for s in batch]
        return Block(self.slots, list(req.slots[drop:]), answer[2][drop:], skipped)

    def _receive(self, w: int) -> tuple:
        """Worker ``w``'s next answer; a worker death (any worker's) raises instead of waiting forever."""
        conn = self._conns[w]
        sentinels = {p.sentinel: i for i, p in enumerate(self._procs)}
        while True:
            ready = wait([conn, *sentinels])
            if conn in ready:
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    self._died(w)
            for s in ready:
                if s in sentinels:
                    self._died(sentinels[s])

    def _died(self, w: int) -> None:
        proc = self._procs[w]
        proc.join(timeout=1.0)
        pending = self._pending[w]
        doing = f" while building block {pending[0].block} of epoch {pending[0].epoch}" if pending else ""
        pid, how = proc.pid, _describe_exit(proc.exitcode, self.ring_mb)
        self.close()
        raise StreamError(f"{self.where}: loader worker {w} (pid {pid}) {how}{doing}; the loader stopped its "
                          "other workers and freed its batch memory. Iterating again starts new workers; a trainer "
                          "resumes from its last checkpoint")

    def close(self) -> None:
        """Stop the workers (they hold nothing to save: the main process owns the slots), then free every slot."""
        if self.closed:
            return
        self.closed = True
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self.slots.close()
