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

**Workers.** Worker ``w`` of ``W`` builds blocks ``w, w+W, ...`` and hands each over as ONE DataLoader item; the
DataLoader's round-robin then returns blocks in order, so the sequence of batches of a rank is the same with 0, 1
or any number of workers, and a worker reads only the shards of its blocks. Per-element randomness (crop, temporal
offset and steps, D4) comes from ``randomness.sample_rng(seed, epoch, key, purpose:crop)``: the same sample gets
the same augmentation whatever the ranks and workers. Batch order depends on the world size (not elastic).

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

**Memory.** A worker holds one decoded tile, the batch arrays of the block it builds and at most
``prefetch_factor`` finished blocks: about (1 + prefetch_factor) × ``block_memory_mb`` plus one tile.

**Resume.** ``state_dict()`` is {epoch, batches consumed} (+ checks); a loader given it yields exactly the remaining
batches of that epoch (skipped blocks are not read). Same world size and batch size required. ``set_epoch(e)`` with
the restored epoch keeps the resume point; another epoch starts from its first batch.

**Batches.** ``maestro_data/batch.py`` keys as ``batch.check_loader_batch`` allows them, plus ``valid`` bool [B],
``crop_index`` int64 [B], ``<mod>_missing`` bool [B] (no date for that modality: zeros) and, with
``d4_on_device`` (default), ``d4`` int64 [B]: the D4 element of each row, applied to every raster and label by
``device.to_model_batch``, which also normalises integer modalities and maps the stored uint8 segmentation classes
to int64 training labels (``normalize_on_device``, default; measured faster; without it labels arrive mapped, in
int8). Always move batches with ``to_model_batch``: its output follows ``batch.check_batch``.

**Accelerate / DDP.** Every rank builds its own loader (rank and world size default to torch.distributed) and
moves batches with ``device.to_model_batch(batch, manifest, accelerator.device)``. Do NOT pass the loader to
``accelerator.prepare`` expecting sharding: it is not a DataLoader, so ``prepare`` returns it untouched, and
``dispatch_batches`` must stay False/unused (rank 0 must not read for everybody). Workers are started per epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from maestro_data.cache import Access
from maestro_data.collate import ArrayPool, BatchBuffer, SampleTransform, TransformOptions, option_problems
from maestro_data.device import to_model_batch, to_tensors
from maestro_data.errors import MaestroError, StreamError
from maestro_data.manifest import Manifest
from maestro_data.plan import EpochOrder, EpochPlan, epoch_order, rank_slots, stream_order
from maestro_data.remote import AccessOptions
from maestro_data.shard_read import check_manifest, open_index, stored_manifest
from maestro_data.shards import tile_id_of
from maestro_data.stream_read import ShardReader, ShardTable, load_table

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
    pin_memory: bool = False
    prefetch_factor: int = 2
    mp_context: str | None = None  # DataLoader multiprocessing context (None: the platform default)
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


@dataclass
class _EpochJob:
    """Everything a worker needs to build its blocks of one epoch (picklable; no open files)."""

    plan: EpochPlan
    table: ShardTable
    manifest: Manifest
    transform: SampleTransform
    skip_batches: int
    on_error: str
    check_samples: bool
    access: Access
    pool: ArrayPool | None = field(default=None, repr=False)
    reader: ShardReader | None = field(default=None, repr=False)

    def blocks(self, worker: int = 0, workers: int = 1) -> Iterator[dict]:
        first = self.skip_batches // self.plan.block_batches
        for k in range(first + worker, self.plan.num_blocks, workers):
            yield self.build(k, self.skip_batches - k * self.plan.block_batches if k == first else 0)

    def build(self, k: int, skip: int) -> dict:
        """Block ``k`` without its first ``skip`` batches: {"block", "batches", "skipped"}."""
        if self.reader is None:
            self.reader = ShardReader(self.table, self.manifest if self.check_samples else None, self.access)
        b = self.plan.batch_size
        slots = self.plan.block(k)[skip * b:]
        spec = self.transform.output_spec()
        d4_key = self.transform.options.d4_on_device
        buffers = [BatchBuffer(spec, b, d4_key, self.pool) for _ in range(len(slots) // b)]
        repeats = self.transform.repeats
        need: dict[int, list[tuple[int, int]]] = {}
        for row, e in enumerate(slots.tolist()):
            if e >= 0:
                need.setdefault(e // repeats, []).append((row, e % repeats))
        skipped = []
        for tile, key, sample, error in self.reader.read(sorted(need)):
            # a sample whose shard's sidecar could not be read is named by its position in the shard
            tile_id = tile_id_of(key) if key else f"{self.table.url_of(tile)}#{self.table.position_of(tile)}"
            if error is None:
                try:
                    for row, crop in need[tile]:
                        buffers[row // b].fill(row % b, self.transform, sample, crop, self.plan.epoch, tile_id)
                    continue
                except (MaestroError, ValueError, IndexError, KeyError) as exc:
                    error = f"{self.table.url_of(tile)}: sample {key!r} (tile {tile_id!r}): {exc}"
            if self.on_error == "raise":
                raise StreamError(error)
            for row, crop in need[tile]:
                buffers[row // b].arrays["valid"][row % b] = False
                buffers[row // b].arrays["crop_index"][row % b] = -1
                skipped.append({"tile_id": tile_id, "crop": crop, "reason": error})
        return {"block": k, "batches": [to_tensors(buf.as_dict()) for buf in buffers], "skipped": skipped}


class _BlockDataset(torch.utils.data.IterableDataset):
    def __init__(self, job: _EpochJob):
        self.job = job

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        return self.job.blocks(info.id, info.num_workers) if info else self.job.blocks()


class StreamLoader:
    """Iterable of batch dicts (``maestro_data/batch.py`` contract + ``valid`` bool [B], ``crop_index`` int64 [B],
    ``<mod>_missing`` bool [B]) for one rank; ``len()`` is equal on every rank."""

    def __init__(self, config: StreamConfig, manifest: Manifest, table: ShardTable, rank: int, world_size: int):
        self.config, self.manifest, self.table = config, manifest, table
        self.rank, self.world_size = rank, world_size
        self.transform = SampleTransform(manifest, config.transform_options())
        window = config.block_samples or int(config.block_memory_mb * 2**20 // self.transform.row_bytes())
        self.block_batches = max(1, window // config.batch_size)
        self.epoch = 0
        self.skipped: list[dict] = []
        # batch memory recycled across blocks and epochs of this process (a block and the batch held by the
        # consumer are in use while the next block is built)
        self._pool = ArrayPool(keep=self.block_batches + 2)
        self._resume_at = 0
        self._consumed = 0
        self._plan: EpochPlan | None = None
        self.plan(0)  # refuses a world size larger than the epoch now, not at the first batch

    @property
    def num_samples(self) -> int:
        """Distinct elements (tile × crop) of the epoch across all ranks, without padding."""
        return self.table.num_tiles * self.transform.repeats

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            train = self.config.mode == "train"
            order = epoch_order(self.table, self.transform.repeats, self.config.seed, epoch, shuffle=train)
            slots = rank_slots(order, self.world_size, self.rank, self.config.batch_size, train,
                               self.config.pad_policy, where=self.table.location)
            self._plan = EpochPlan(slots, self.config.batch_size, self.block_batches, self.config.seed, epoch,
                                   self.rank, shuffle=train)
        return self._plan

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

    def __iter__(self) -> Iterator[dict]:
        job = _EpochJob(self.plan(self.epoch), self.table, self.manifest, self.transform, self._resume_at,
                        self.config.on_error, self.config.check_samples, self.config.access(), self._pool)
        self._consumed, self._resume_at = self._resume_at, 0
        self.skipped = []
        if self.config.num_workers == 0:
            items: Iterator[dict] = job.blocks()
        else:
            items = iter(torch.utils.data.DataLoader(
                _BlockDataset(job), batch_size=None, num_workers=self.config.num_workers,
                pin_memory=self.config.pin_memory, prefetch_factor=self.config.prefetch_factor,
                multiprocessing_context=self.config.mp_context))
        for item in items:
            for s in item["skipped"]:
                log.warning("skipped %s crop %s: %s", s["tile_id"], s["crop"], s["reason"])
            self.skipped.extend(item["skipped"])
            batches = item.pop("batches")
            del item
            while batches:  # handed over one by one: a batch the consumer dropped can be recycled by the pool
                self._consumed += 1
                yield batches.pop(0)


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
