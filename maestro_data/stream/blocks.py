"""Building one block of an epoch plan into batch buffers: the work of a loader worker, or of the loader's own
process with ``num_workers=0`` (see ``loader.py``'s docstring, Order and Workers). Pure with respect to the plan:
block ``k`` of epoch ``e`` holds the same rows whichever process builds it and whenever."""

from __future__ import annotations

from dataclasses import dataclass, field

from maestro_data.errors import MaestroError, StreamError
from maestro_data.manifest import Manifest
from maestro_data.stream.cache import Access
from maestro_data.stream.collate import BatchBuffer, SampleTransform
from maestro_data.stream.index_format import tile_id_of
from maestro_data.stream.plan import EpochPlan
from maestro_data.stream.shard_table import ShardReader, ShardTable


@dataclass
class BlockBuilder:
    """Reads a block's tiles in file order and writes each element into its batch row (picklable: the shard reader
    is opened on first use, in the process that builds)."""

    table: ShardTable
    manifest: Manifest
    transform: SampleTransform
    on_error: str
    check_samples: bool
    access: Access
    reader: ShardReader | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "reader": None}

    def buffer_spec(self) -> tuple[dict, bool]:
        """(per-row spec, whether batches carry ``d4``): what ``BatchBuffer`` needs."""
        return self.transform.output_spec(), self.transform.options.d4_on_device

    def build(self, plan: EpochPlan, k: int, skip: int, buffers: list[BatchBuffer]) -> list[list[dict]]:
        """Fill ``buffers`` with block ``k`` of ``plan`` without its first ``skip`` batches (one buffer per
        remaining batch); returns the skipped elements of each batch (``on_error="skip"``), else raises."""
        if self.reader is None:
            self.reader = ShardReader(self.table, self.manifest if self.check_samples else None, self.access)
        b = plan.batch_size
        slots = plan.block(k)[skip * b:]
        if len(slots) != len(buffers) * b:
            raise StreamError(f"{self.table.location}: block {k} of epoch {plan.epoch} has {len(slots) // b} "
                              f"batches after skipping {skip}, {len(buffers)} buffers were given")
        repeats = self.transform.repeats
        need: dict[int, list[tuple[int, int]]] = {}
        for row, e in enumerate(slots.tolist()):
            if e >= 0:
                need.setdefault(e // repeats, []).append((row, e % repeats))
        skipped: list[list[dict]] = [[] for _ in buffers]
        # a tile with one element: its whole-tile members are read straight into their rows (no second copy)
        direct = {tile: {f: buffers[row // b].arrays[f][row % b] for f in self.transform.direct_fields(crop)}
                  for tile, [(row, crop)] in ((t, rows) for t, rows in need.items() if len(rows) == 1)}
        for tile, key, sample, error in self.reader.read(sorted(need), direct):
            # a sample whose shard's sidecar could not be read is named by its position in the shard
            tile_id = tile_id_of(key) if key else f"{self.table.url_of(tile)}#{self.table.position_of(tile)}"
            if error is None:
                try:
                    for row, crop in need[tile]:
                        buffers[row // b].fill(row % b, self.transform, sample, crop, plan.epoch, tile_id)
                    continue
                except (MaestroError, ValueError, IndexError, KeyError) as exc:
                    error = f"{self.table.url_of(tile)}: sample {key!r} (tile {tile_id!r}): {exc}"
            if self.on_error == "raise":
                raise StreamError(error)
            for row, crop in need[tile]:
                buffers[row // b].arrays["valid"][row % b] = False
                buffers[row // b].arrays["crop_index"][row % b] = -1
                skipped[row // b].append({"tile_id": tile_id, "crop": crop, "reason": error})
        return skipped
