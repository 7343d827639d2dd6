"""Planning one rank's epoch from the shard table alone (pure functions; see ``loader.py``'s docstring for the
order, the equal shares and the blocks): O(shards + this rank's share) time and memory at any corpus size."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from maestro_data.errors import StreamError
from maestro_data.randomness import permutation
from maestro_data.stream.shard_table import ShardTable


@dataclass(frozen=True)
class EpochOrder:
    """The epoch's element ids in stream order without materialising them: the k-th shard's elements (a contiguous
    id range, tile-major, crops consecutive) follow those of the shards before it. ``order[positions]`` costs
    O(len(positions) · log shards), so a rank's share is planned in O(shards + share) at any corpus size."""

    ends: np.ndarray  # cumulative element counts of the shards in stream order
    shift: np.ndarray  # per shard in stream order: its first element id minus its first position

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, positions) -> np.ndarray:
        if isinstance(positions, slice):
            positions = np.arange(*positions.indices(len(self)))
        positions = np.asarray(positions, dtype=np.int64)
        return positions + self.shift[np.searchsorted(self.ends, positions, side="right")]


def epoch_order(table: ShardTable, repeats: int, seed: int, epoch: int, shuffle: bool) -> EpochOrder:
    """The epoch's order: shards permuted by (seed, epoch) when ``shuffle``, each shard's tiles in stored order."""
    shards = permutation(table.num_shards, seed, epoch, "stream/shards") if shuffle else np.arange(table.num_shards)
    counts = (table.starts[shards + 1] - table.starts[shards]) * repeats
    ends = np.cumsum(counts).astype(np.int64)
    return EpochOrder(ends, table.starts[shards] * repeats - (ends - counts))


def stream_order(table: ShardTable, repeats: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Element ids (tile * repeats + crop) of the epoch in stream order, materialised (for tests and tools)."""
    order = epoch_order(table, repeats, seed, epoch, shuffle)
    return order[np.arange(len(order))]


def rank_slots(order: np.ndarray, world: int, rank: int, batch: int, train: bool, pad_policy: str = "pad",
               where: str = "") -> np.ndarray:
    """This rank's element ids, a whole number of batches, the same count on every rank (-1 = padding row)."""
    e = len(order)
    if world > e:
        raise StreamError(f"{where}: world size {world} is larger than the {e} samples of the epoch: some ranks "
                          "would have nothing to read")
    if train:
        per_batch = world * batch
        share = (math.ceil(e / per_batch) if pad_policy == "pad" else e // per_batch) * batch
        if share == 0:
            raise StreamError(f"{where}: pad_policy 'drop' with {e} samples < world size {world} x batch {batch} "
                              "leaves no batch")
        return order[(rank * share + np.arange(share)) % e]
    lo, hi = rank * e // world, (rank + 1) * e // world
    slots = np.full(math.ceil(math.ceil(e / world) / batch) * batch, -1, dtype=np.int64)
    slots[:hi - lo] = order[lo:hi]
    return slots


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: its slots cut into blocks of whole batches (shuffled inside in train)."""

    slots: np.ndarray
    batch_size: int
    block_batches: int
    seed: int
    epoch: int
    rank: int
    shuffle: bool

    @property
    def num_batches(self) -> int:
        return len(self.slots) // self.batch_size

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_batches / self.block_batches)

    def block_size(self, k: int) -> int:
        """Batches of block ``k`` (the last block of an epoch may be shorter)."""
        return min(self.block_batches, self.num_batches - k * self.block_batches)

    def block(self, k: int) -> np.ndarray:
        b = self.batch_size * self.block_batches
        slots = self.slots[k * b:(k + 1) * b]
        if self.shuffle:
            slots = slots[permutation(len(slots), self.seed, self.epoch, f"stream/block/{self.rank}/{k}")]
        return slots


@dataclass
class Planner:
    """One rank's plan of any epoch (picklable: a loader worker plans the epochs it is asked for itself, so only
    epoch numbers cross the process boundary). The two most recent plans are kept: the epoch being read and the
    next one, planned ahead."""

    table: ShardTable
    repeats: int
    seed: int
    world: int
    rank: int
    batch_size: int
    block_batches: int
    train: bool
    pad_policy: str
    _plans: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    def plan(self, epoch: int) -> EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            order = epoch_order(self.table, self.repeats, self.seed, epoch, shuffle=self.train)
            slots = rank_slots(order, self.world, self.rank, self.batch_size, self.train, self.pad_policy,
                               where=self.table.location)
            plan = EpochPlan(slots, self.batch_size, self.block_batches, self.seed, epoch, self.rank,
                             shuffle=self.train)
            self._plans[epoch] = plan
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        self._plans.move_to_end(epoch)
        return plan
