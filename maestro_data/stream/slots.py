"""Batch memory shared by the loader's worker processes and its main process (see ``loader.py``, Workers).

A *slot* holds one batch: every array of ``collate.batch_shapes`` at a fixed offset (:class:`SlotLayout`) of one
``multiprocessing.shared_memory`` segment. The main process owns every slot (:class:`SlotPool`): it creates it
(and, with ``pin_memory`` on a CUDA host, page-locks it once), lends it to one worker per block request, hands the
filled slot to the consumer as tensors that view it (no copy), and takes it back once the consumer has released
the batch (no reference left to it or to any tensor made from it). A slot's pages are therefore faulted in once per
process instead of once per block, and a worker killed at any moment leaks nothing: only the main process unlinks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Protocol

import numpy as np
import torch

from maestro_data.errors import StreamError

log = logging.getLogger(__name__)
ALIGN = 64  # bytes: every array of a slot starts on a cache line


@dataclass(frozen=True)
class SlotLayout:
    """Where each array of one batch lies in a slot: (key, shape, dtype, byte offset)."""

    fields: tuple[tuple[str, tuple[int, ...], str, int], ...]
    nbytes: int

    @classmethod
    def of(cls, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> SlotLayout:
        fields, offset = [], 0
        for key, (shape, dtype) in shapes.items():
            fields.append((key, tuple(shape), np.dtype(dtype).str, offset))
            offset += math.ceil(math.prod(shape) * np.dtype(dtype).itemsize / ALIGN) * ALIGN
        return cls(tuple(fields), max(offset, ALIGN))

    def view(self, shm: SharedMemory) -> np.ndarray:
        """The slot's bytes as uint8. Through ``np.frombuffer``, which holds a buffer export: the segment cannot be
        unmapped while any array made from it lives (``np.ndarray(buffer=...)`` keeps only a reference, and an
        unmap under it would leave dangling pointers)."""
        return np.frombuffer(shm.buf, np.uint8, count=self.nbytes)

    def arrays(self, data: np.ndarray) -> dict[str, np.ndarray]:
        """Every array of the batch as a view of ``data`` (``view``)."""
        out = {}
        for key, shape, dtype, offset in self.fields:
            dtype = np.dtype(dtype)
            out[key] = data[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        return out


class Pinner(Protocol):
    """Page-locks slots for asynchronous host -> device copies (:class:`CudaPinner`; tests use a recorder)."""

    def register(self, slot: int, shm: SharedMemory) -> None: ...
    def released(self, slot: int) -> None: ...
    def ready(self, slot: int) -> None: ...
    def unregister(self, slot: int) -> None: ...


class CudaPinner:
    """``cudaHostRegister`` once per slot: copies with ``non_blocking=True`` from it are asynchronous. Such a copy
    may still be running when the consumer drops the batch, so a released slot records an event on the current
    stream and the slot is not lent to a worker again before that event has completed."""

    def __init__(self) -> None:
        self._cudart = torch.cuda.cudart()
        self._ptrs: dict[int, int] = {}
        self._events: dict[int, torch.cuda.Event] = {}

    def _check(self, result, call: str) -> None:
        code = result[0] if isinstance(result, tuple) else result
        if int(code) != 0:
            raise StreamError(f"pin_memory: {call} failed with CUDA error {int(code)}")

    def register(self, slot: int, shm: SharedMemory) -> None:
        ptr = np.frombuffer(shm.buf, np.uint8).ctypes.data  # a temporary view: no export outlives this line
        self._check(self._cudart.cudaHostRegister(ptr, shm.size, 0), "cudaHostRegister")
        self._ptrs[slot] = ptr

    def released(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event

    def ready(self, slot: int) -> None:
        event = self._events.pop(slot, None)
        if event is not None:
            event.synchronize()

    def unregister(self, slot: int) -> None:
        self.ready(slot)
        ptr = self._ptrs.pop(slot, None)
        if ptr is not None:
            self._check(self._cudart.cudaHostUnregister(ptr), "cudaHostUnregister")


def make_pinner(pin_memory: bool) -> Pinner | None:
    """The loader's pinner: CUDA page-locking when asked for and a CUDA device is present, else none (batches
    stay in pageable memory, as torch's DataLoader does without CUDA)."""
    if not pin_memory:
        return None
    if not torch.cuda.is_available():
        log.warning("pin_memory=True but no CUDA device is available: batches stay in pageable memory")
        return None
    return CudaPinner()


def _unlink(shm: SharedMemory) -> None:
    with contextlib.suppress(FileNotFoundError):  # already gone (e.g. removed by hand from /dev/shm)
        shm.unlink()


@dataclass
class _Slot:
    shm: SharedMemory
    owner: int  # the worker that writes it
    lent: bool = False  # handed to the consumer as a batch, not yet released
    closed: bool = False  # the pool was closed while it was lent: unmap it when released


class SlotPool:
    """Every slot of one loader (main process side). ``take`` gives a worker slots to fill (its free ones, else new
    ones), ``lend`` turns a filled slot into a batch, released automatically once unreferenced, ``give_back`` returns
    a slot whose batch was never handed over. A worker keeps at most ``keep`` slots; a slot released beyond that
    (a consumer that held many batches at once) is unlinked, and the worker is told to unmap it (``forget``)."""

    def __init__(self, layout: SlotLayout, workers: int, keep: int, pinner: Pinner | None = None):
        self.layout, self.keep, self.pinner = layout, keep, pinner
        self._slots: dict[int, _Slot] = {}
        self._free: list[list[int]] = [[] for _ in range(workers)]
        self._owned = [0] * workers
        self._forget: list[list[int]] = [[] for _ in range(workers)]
        self._next = 0
        self._lock = threading.RLock()  # a batch may be released (its finalizer run) by any thread
        self.created = 0  # segments created so far (a steady state creates none)
        self.closed = False

    def take(self, worker: int, n: int) -> tuple[list[int], dict[int, str]]:
        """``n`` slots for ``worker`` to fill: (ids, {id: segment name} of those the worker has not mapped yet)."""
        with self._lock:
            free = self._free[worker]
            ids = [free.pop() for _ in range(min(n, len(free)))]
        if self.pinner is not None:
            for sid in ids:
                self.pinner.ready(sid)
        new = {}
        while len(ids) < n:
            sid = self._create(worker)
            ids.append(sid)
            new[sid] = self._slots[sid].shm.name
        return ids, new

    def forget(self, worker: int) -> list[int]:
        """Slots of ``worker`` unlinked since the last call: the worker unmaps them."""
        with self._lock:
            out, self._forget[worker] = self._forget[worker], []
        return out

    def _create(self, worker: int) -> int:
        shm = SharedMemory(create=True, size=self.layout.nbytes)
        with self._lock:
            sid, self._next = self._next, self._next + 1
            self._slots[sid] = _Slot(shm, worker)
            self._owned[worker] += 1
            self.created += 1
        if self.pinner is not None:
            self.pinner.register(sid, shm)
        return sid

    def lend(self, sid: int, tile_ids: list[str]) -> dict:
        """The batch in slot ``sid``: tensors viewing it and ``tile_id``. The slot comes back when the last of
        them is gone: each lending makes a new uint8 view whose memoryview every array and tensor keeps alive."""
        slot = self._slots.get(sid)
        if slot is None:
            raise StreamError("the loader was closed while handing over a block (its batch memory is freed)")
        data = self.layout.view(slot.shm)
        batch: dict = {k: torch.from_numpy(a) for k, a in self.layout.arrays(data).items()}
        batch["tile_id"] = list(tile_ids)
        slot.lent = True
        weakref.finalize(data.base, self._release, sid).atexit = False  # at exit the OS unmaps everything
        return batch

    def _release(self, sid: int) -> None:
        with self._lock:
            slot = self._slots[sid]
            slot.lent = False
            if self.pinner is not None:
                self.pinner.released(sid)
            if slot.closed:
                self._unmap(sid)
            else:
                self.give_back(sid)

    def give_back(self, sid: int) -> None:
        """Slot ``sid`` is free again (released, or its block was not handed over)."""
        with self._lock:
            slot = self._slots.get(sid)
            if slot is None:  # the pool was closed while its block was being built: already unlinked
                return
            if self._owned[slot.owner] > self.keep:
                self._owned[slot.owner] -= 1
                self._forget[slot.owner].append(sid)
                self._unmap(sid)
                _unlink(slot.shm)
            else:
                self._free[slot.owner].append(sid)

    def _unmap(self, sid: int) -> None:
        slot = self._slots.pop(sid)
        if self.pinner is not None:
            self.pinner.unregister(sid)
        slot.shm.close()

    def close(self) -> None:
        """Unlink every slot (after the workers are gone); a slot still lent is unmapped when its batch goes."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for sid, slot in list(self._slots.items()):
                _unlink(slot.shm)
                if slot.lent:
                    slot.closed = True
                else:
                    self._unmap(sid)
            self._free = [[] for _ in self._free]
