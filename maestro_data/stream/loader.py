"""The streaming loader: shard index -> epoch plan -> (rank, worker) split -> sequential shard reads -> batches.

Stages (one function or class each): ``load_table`` (index + split + subset -> the tiles, in shard order) ->
``epoch_order`` (the epoch's element order) -> ``rank_slots`` (this rank's equal share; both in ``plan.py``) ->
``EpochPlan.block``
(blocks of whole batches, shuffled inside) -> ``ShardReader`` (sequential reads of the needed samples) ->
``collate.SampleTransform`` (crop, time steps, bands, normalisation, labels, D4) -> ``collate.BatchBuffer``.

**Elements.** An element is (tile, crop index): ``repeats²`` per tile (PASTIS-HD 64, others 1) in train and eval
alike (paper §6.2.1 repetition factor). Train draws a random crop per element, eval takes crop ``i`` of the
row-major non-overlapping grid. E = tiles × repeats² elements per epoch (``num_samples``); the index lists every
shard's sample count, so E and every rank's share are known before a byte is read, in O(shards + share) time and
memory (the epoch's order is never materialised: ``EpochOrder``).

**Order.** Train: the shard order is a permutation of (seed, epoch); each shard's tiles keep their stored order (the
shard writer stored them in a seeded random order) and a tile's crops are consecutive. This *stream order* is cut
into equal contiguous rank shares; each share into *blocks* of ``block_batches`` whole batches, and the elements of
a block are permuted (seed, epoch, rank, block). A block reads one contiguous stretch of one or two shards, in file
order, and only its own tiles (seeking to the first one; a tile's crops are cut from one read), then emits its
batches in shuffled order. The shuffle window is therefore the block (``block_samples``, default: as many elements
as fit ``block_memory_mb`` of batch arrays, e.g. ~70 FLAIR-HUB tiles, ~1500 PASTIS-HD crops = 23 tiles); mixing
across blocks comes from the per-epoch shard order. This is the trade-off between a global shuffle (random reads)
and a pure buffer shuffle (order depends on worker count). Eval: canonical order, no shuffle.

**Workers.** With ``num_workers`` W > 0, W processes (``workers.py``) are started at the first iteration and live
until ``close()`` (or the loader's garbage collection, or a dead worker): epochs do not restart them. Block ``k``
is built by worker ``k % W`` and the main process yields blocks in order, so the sequence of batches of a rank is
the same with 0, 1 or any number of workers, and a worker reads only the shards of its blocks. Only epoch numbers
and slot ids cross the pipe: a worker plans an epoch itself (``plan.Planner``). Once every block of an epoch has
been asked for, the workers go on with the first blocks of epoch + 1, so ``set_epoch(epoch + 1)`` finds its first
batch built; another epoch or resume point drops them. Per-element randomness (crop, temporal offset and steps,
D4) comes from ``randomness.sample_rng(seed, epoch, key, purpose:crop)``: the same sample gets the same
augmentation whatever the ranks and workers. Batch order depends on the world size (not elastic). A worker that
dies (killed, out of memory) raises a ``StreamError`` naming it at the next batch; the other workers are
stopped, and the next iteration (e.g. after ``load_state_dict``) starts new ones.

**Equal batches.** Train, ``pad_policy="pad"`` (default): the share is ``ceil(E / (world·B))·B`` elements, and the
positions past E wrap to the start of the epoch's stream order (fewer than world·B repeated elements, identical
augmentation, ``valid`` True); ``"drop"``: ``floor(E / (world·B))·B`` (the tail of the order is not seen this
epoch). Eval: rank ``r`` takes elements ``[rE/world, (r+1)E/world)`` (every element exactly once across ranks) and
every rank yields ``ceil(ceil(E/world)/B)`` batches of B rows; unused rows are zeros with ``valid`` False and
``crop_index`` -1: **exclude them from metrics with the ``valid`` mask** (e.g. ``logits[batch["valid"]]``). A world
size larger than E is refused. Every rank has the same ``len()`` for any number of shards (even fewer shards than
ranks × workers): the split is over samples, not shards.

**Remote shards.** Indexes, sidecars and shards are read through one access layer (``cache.Access``): transient
failures are retried ``retries`` times with exponential backoff and jitter (``timeout_s`` per connect/read), then
the error names the shard, the sample and the last cause; with ``cache_dir`` every remote shard and sidecar is
fetched once per node, verified against the index's sha256 and kept (LRU within ``cache_limit_gb``).

**Memory.** A batch stays valid until released: the consumer holds no reference to it or to a tensor made from
it (then its memory is reused). In-process, batch arrays are recycled (``collate.ArrayPool``). With workers, every
batch lives in a shared-memory *slot* (``slots.py``) created once by the main process and reused: a worker writes
the block into slots named in its request, the consumer receives tensors that view the slot (no copy), and a
released slot goes back to its worker. Each worker's ring holds ``(prefetch_factor + 1) × block`` batches plus
two (~0.8 GB of FLAIR-HUB batches at the defaults); a consumer that holds more batches at once gets extra slots,
unlinked again when released. ``pin_memory`` (CUDA) page-locks each slot once. A worker holds one decoded tile
and the pages of its ring; only the main process creates and unlinks segments, so a killed worker leaks none.

**Resume.** ``state_dict()`` is {epoch, batches consumed} (+ checks); a loader given it yields exactly the remaining
batches of that epoch (skipped blocks are not read). Same world size and batch size required. ``set_epoch(e)`` with
the restored epoch keeps the resume point; another epoch starts from its first batch.

**Batches.** ``maestro_data/stream/batch.py`` keys as ``batch.check_loader_batch`` allows them, plus ``valid`` bool [B],
``crop_index`` int64 [B], ``<mod>_missing`` bool [B] (no date for that modality: zeros) and, with
``d4_on_device`` (default), ``d4`` int64 [B]: the D4 element of each row, applied to every raster and label by
``device.to_model_batch``, which also normalises integer modalities and maps the stored uint8 segmentation classes
to int64 training labels (``normalize_on_device``, default; measured faster; without it labels arrive mapped, in
int8). Always move batches with ``to_model_batch``: its output follows ``batch.check_batch``.

**Accelerate / DDP.** Every rank builds its own loader (rank and world size default to torch.distributed) and
moves batches with ``device.to_model_batch(batch, manifest, accelerator.device)``. Do NOT pass the loader to
``accelerator.prepare`` expecting sharding: it is not a DataLoader, so ``prepare`` returns it untouched, and
``dispatch_batches`` must stay False/unused (rank 0 must not read for everybody). Call ``close()`` when a loader
is done (the trainer closes its loaders at the end of each phase and evaluation loaders after each pass).
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from maestro_data.errors import MaestroError, StreamError
from maestro_data.manifest import Manifest
from maestro_data.stream.blocks import BlockBuilder
from maestro_data.stream.cache import Access
from maestro_data.stream.collate import (
    ArrayPool,
    BatchBuffer,
    SampleTransform,
    TransformOptions,
    batch_shapes,
    option_problems,
)
from maestro_data.stream.device import to_model_batch, to_tensors
from maestro_data.stream.plan import EpochOrder, EpochPlan, Planner, epoch_order, rank_slots, stream_order
from maestro_data.stream.remote import AccessOptions
from maestro_data.stream.shard_read import check_manifest, open_index, stored_manifest
from maestro_data.stream.shard_table import ShardTable, load_table
from maestro_data.stream.slots import SlotLayout, make_pinner
from maestro_data.stream.workers import Block, WorkerPool

__all__ = ["StreamConfig", "StreamLoader", "EpochPlan", "make_loader", "to_model_batch", "stream_order",
           "rank_slots", "ShardTable", "load_table", "EpochOrder", "epoch_order"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    index: str  # shard folder, index.json path or URL
    split: str  # "train" | "val" | "test" | "pretrain" (= manifest.splits.pretrain)
    mode: str = "train"  # "train": random crop, random valid step, D4 | "eval": every crop, MAD step
    subset: int = 100  # a tier of the index (the build's --percents) or 100: the union of tiers <= subset
    batch_size: int = 8  # per rank
    seed: int = 0
    d4: bool = True  # the official code applies D4 in val/test too
    d4_on_device: bool = True  # batch["d4"] holds each row's element; to_model_batch applies it (see device.py)
    num_workers: int = 0
    normalize_on_device: bool = True  # integer modalities stay integer; see device.py and the benchmark
    eval_offset: str = "first"  # "first" (offset 0) | "random" (the official reader draws it even in eval)
    keep_hours: bool = False  # official: dates at day resolution (hour 0)
    pad_policy: str = "pad"  # train only: "pad" (repeat from the epoch start) | "drop"
    on_error: str = "raise"  # "raise" | "skip": an undecodable/invalid sample becomes a padding row (valid False)
    block_samples: int | None = None  # shuffle window in elements (rounded down to whole batches)
    block_memory_mb: float = 256.0  # sizes the block when block_samples is None
    check_samples: bool = True  # shapes/dtypes of every decoded sample against the manifest
    pin_memory: bool = False  # CUDA hosts: each worker slot page-locked once (workers only; see Memory)
    prefetch_factor: int = 2  # blocks asked of each worker ahead of the one being consumed
    mp_context: str | None = None  # multiprocessing context of the workers (None: the platform default)
    retries: int = 5  # per remote read, after the first attempt (transient failures only)
    timeout_s: float = 60.0  # per connect and per socket read of a remote request
    backoff_s: float = 0.5  # first wait before a retry (doubling, at most 30 s, full jitter)
    cache_dir: str | None = None  # node-local cache of remote shards and sidecars (shared by workers and ranks)
    cache_limit_gb: float | None = None  # LRU bound of cache_dir (None: unbounded)
    storage_options: dict | None = None  # fsspec options of the remote store (e.g. {"endpoint_url": ...})

    def transform_options(self) -> TransformOptions:
        """The per-sample transform's share of the configuration."""
        return TransformOptions(mode=self.mode, seed=self.seed, d4=self.d4, eval_offset=self.eval_offset,
                                keep_hours=self.keep_hours, normalize_on_device=self.normalize_on_device,
                                d4_on_device=self.d4_on_device)

    def access_options(self) -> AccessOptions:
        return AccessOptions(retries=self.retries, timeout_s=self.timeout_s, backoff_s=self.backoff_s,
                             storage_options=dict(self.storage_options or {}))

    def access(self) -> Access:
        """How this stream reads bytes: retries, timeouts and the optional node-local cache."""
        return Access(self.access_options(), self.cache_dir, self.cache_limit_gb)


def _check_config(c: StreamConfig, manifest: Manifest) -> None:
    """Everything checkable before the index is read; whether ``subset`` is one of the index's tiers is checked
    against the index (``index_format.shard_columns``) by ``load_table``."""
    splits = (*manifest.splits.names, "pretrain")
    problems = option_problems(c.transform_options())
    if c.split not in splits:
        problems.append(f"split {c.split!r} is not one of {', '.join(splits)}")
    if isinstance(c.subset, bool) or not isinstance(c.subset, int) or not 0 < c.subset <= 100:
        problems.append(f"subset {c.subset!r} is not a percentage in 1..100")
    if c.batch_size < 1 or c.num_workers < 0 or c.prefetch_factor < 1:
        problems.append("batch_size and prefetch_factor must be >= 1 and num_workers >= 0")
    if c.pad_policy not in ("pad", "drop"):
        problems.append(f"pad_policy {c.pad_policy!r} is not 'pad' or 'drop'")
    if c.on_error not in ("raise", "skip"):
        problems.append(f"on_error {c.on_error!r} is not 'raise' or 'skip'")
    if c.block_samples is not None and c.block_samples < 1:
        problems.append("block_samples must be >= 1")
    problems += c.access_options().problems()
    if c.cache_limit_gb is not None and not c.cache_limit_gb > 0:
        problems.append(f"cache_limit_gb {c.cache_limit_gb!r} must be > 0 (or None: unbounded)")
    if problems:
        raise StreamError(f"{c.index}: invalid stream configuration: " + "; ".join(problems))


class _LocalBlock:
    """A block built in the loader's own process (``num_workers=0``): its batches, handed over one by one."""

    def __init__(self, batches: list[dict], skipped: list[dict]):
        self._batches, self.skipped = deque(batches), skipped

    def __len__(self) -> int:
        return len(self._batches)

    def take(self) -> dict:
        return self._batches.popleft()

    def abandon(self) -> None:
        self._batches.clear()


class StreamLoader:
    """Iterable of batch dicts (``batch.py`` contract + ``valid`` bool [B], ``crop_index`` int64 [B],
    ``<mod>_missing`` bool [B]) for one rank; ``len()`` is equal on every rank. A batch stays valid until released
    (no reference left to it or to a tensor made from it); ``close()`` stops the worker processes."""

    def __init__(self, config: StreamConfig, manifest: Manifest, table: ShardTable, rank: int, world_size: int):
        self.config, self.manifest, self.table = config, manifest, table
        self.rank, self.world_size = rank, world_size
        self.transform = SampleTransform(manifest, config.transform_options())
        window = config.block_samples or int(config.block_memory_mb * 2**20 // self.transform.row_bytes())
        self.block_batches = max(1, window // config.batch_size)
        self.planner = Planner(table, self.transform.repeats, config.seed, world_size, rank, config.batch_size,
                               self.block_batches, config.mode == "train", config.pad_policy)
        self.epoch = 0
        self.skipped: list[dict] = []
        # batch memory recycled across blocks and epochs of this process (a block and the batch held by the
        # consumer are in use while the next block is built)
        self._pool = ArrayPool(keep=self.block_batches + 2)
        self._workers: WorkerPool | None = None
        self._stop_workers: weakref.finalize | None = None
        self._resume_at = 0
        self._consumed = 0
        self.plan(0)  # refuses a world size larger than the epoch now, not at the first batch

    @property
    def num_samples(self) -> int:
        """Distinct elements (tile × crop) of the epoch across all ranks, without padding."""
        return self.table.num_tiles * self.transform.repeats

    def plan(self, epoch: int) -> EpochPlan:
        return self.planner.plan(epoch)

    def __len__(self) -> int:
        return self.plan(self.epoch).num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self._consumed, "num_batches": len(self),
                "world_size": self.world_size, "rank": self.rank, "seed": self.config.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        expect = {"world_size": self.world_size, "seed": self.config.seed, "num_samples": self.num_samples,
                  "num_batches": len(self)}
        wrong = {k: (state.get(k), v) for k, v in expect.items() if state.get(k) != v}
        if wrong:
            raise StreamError(f"{self.table.location}: cannot resume: the saved loader state differs in "
                              + ", ".join(f"{k} (saved {a}, now {b})" for k, (a, b) in wrong.items()))
        self._resume_at = self._consumed = int(state["batches_consumed"])

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first iteration, after ``close`` or without)."""
        return self._workers.pids if self._workers is not None and not self._workers.closed else []

    def close(self) -> None:
        """Stop the workers and free their batch memory; batches still held stay valid until released. The next
        iteration starts new workers. Also done when the loader is garbage-collected or the interpreter exits."""
        if self._stop_workers is not None:
            self._stop_workers()
        self._workers = self._stop_workers = None

    def _builder(self) -> BlockBuilder:
        c = self.config
        return BlockBuilder(self.table, self.manifest, self.transform, c.on_error, c.check_samples, c.access())

    def _local_blocks(self, epoch: int, start: int) -> Iterator[_LocalBlock]:
        plan = self.plan(epoch)
        builder = self._builder()  # one per iteration: two live iterators never share a read buffer
        spec, d4_key = builder.buffer_spec()
        first = start // plan.block_batches
        for k in range(first, plan.num_blocks):
            skip = start - k * plan.block_batches if k == first else 0
            buffers = [BatchBuffer(spec, plan.batch_size, d4_key, self._pool) for _ in range(plan.block_size(k) - skip)]
            skipped = builder.build(plan, k, skip, buffers)
            yield _LocalBlock([to_tensors(b.as_dict()) for b in buffers], [s for batch in skipped for s in batch])

    def _worker_blocks(self, epoch: int, start: int) -> Iterator[Block]:
        if self._workers is None or self._workers.closed:
            self.close()
            c = self.config
            builder = self._builder()
            spec, d4_key = builder.buffer_spec()
            layout = SlotLayout.of(batch_shapes(spec, c.batch_size, d4_key))
            self._workers = WorkerPool(builder, self.planner, layout, c.num_workers, c.prefetch_factor,
                                       c.mp_context, make_pinner(c.pin_memory))
            self._stop_workers = weakref.finalize(self, self._workers.close)
        return self._workers.blocks(epoch, start)

    def __iter__(self) -> Iterator[dict]:
        start, self._resume_at = self._resume_at, 0
        self._consumed = start
        self.skipped = []
        blocks = (self._local_blocks if self.config.num_workers == 0 else self._worker_blocks)(self.epoch, start)
        for block in blocks:
            for s in block.skipped:
                log.warning("skipped %s crop %s: %s", s["tile_id"], s["crop"], s["reason"])
            self.skipped.extend(block.skipped)
            try:
                while len(block):  # handed over one by one, never kept here: a released batch is recycled
                    self._consumed += 1
                    yield block.take()
            finally:
                block.abandon()


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


def make_loader(config: StreamConfig, manifest: Manifest | None = None, *, rank: int | None = None,
                world_size: int | None = None) -> StreamLoader:
    """Open the index, check it against ``manifest`` (default: the manifest stored in the index) and build this
    rank's loader. ``rank``/``world_size`` default to torch.distributed when initialised, else 0/1."""
    try:
        index, location = open_index(config.index, config.access_options())
        if manifest is None:
            manifest = stored_manifest(index, location)
        else:
            check_manifest(index, manifest, location)
    except MaestroError as exc:
        raise StreamError(str(exc)) from exc
    _check_config(config, manifest)
    rank, world_size = _dist_defaults(rank, world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise StreamError(f"{location}: rank {rank} is not in [0, world size {world_size})")
    table = load_table(index, location, manifest, config.split, config.subset)
    return StreamLoader(config, manifest, table, rank, world_size)
