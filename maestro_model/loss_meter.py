"""Training losses kept on the device between logging intervals.

Reading a loss on the host (``float(loss)``) or all-reducing it waits for the GPU to finish the step, so doing it per
micro-batch serialises the host with the device. :class:`LossMeter` keeps each micro-batch's loss (and what a
non-finite report needs: finiteness of the inputs per modality, the per-modality loss terms) as device tensors and
turns them into per-rank means with ONE all-reduce and one host read per flush (every ``train.log_every`` optimizer
steps, before a checkpoint and at the epoch end). The reduced values are the ones a per-micro-batch reduction gives,
bit for bit: the same float32 sum over ranks, divided by the world size on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from maestro_data.errors import MaestroError


class TrainError(MaestroError):
    """Training cannot start or go on (bad checkpoint, data/config mismatch, non-finite loss)."""


@dataclass(frozen=True)
class Where:
    """Host-side coordinates of one buffered micro-batch (for the non-finite report)."""

    phase: str
    epoch: int
    batch: int
    step: int
    tiles: tuple[str, ...]


class LossMeter:
    """Micro-batch losses buffered on the device; :meth:`flush` -> their means over ranks, in order."""

    def __init__(self, acc: Accelerator, modalities: list[str]):
        self.acc, self.modalities = acc, modalities
        self._losses: list[torch.Tensor] = []
        self._inputs_ok: list[tuple[tuple[str, ...], torch.Tensor]] = []
        self._terms: list[dict[str, torch.Tensor]] = []
        self._where: list[Where] = []

    def __len__(self) -> int:
        return len(self._losses)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], inputs: dict, where: Where) -> None:
        """Buffer one micro-batch (no host sync: every check is a device tensor read at the next flush)."""
        self._losses.append(loss.detach().float().reshape(()))
        names = tuple(m for m in self.modalities if isinstance(inputs.get(m), torch.Tensor))
        ok = [torch.isfinite(inputs[m]).all() for m in names]
        self._inputs_ok.append((names, torch.stack(ok) if ok else torch.ones(0, dtype=torch.bool)))
        self._terms.append({m: t.detach().float() for m, t in terms.items()})
        self._where.append(where)

    def flush(self) -> list[float]:
        """Mean over ranks of every buffered loss, in buffer order; a collective: every rank calls it at the same
        point. Raises :class:`TrainError` on every rank when any rank's buffered loss is not finite."""
        if not self._losses:
            return []
        values = torch.stack(self._losses)
        bad = ~torch.isfinite(values)
        stats = self.acc.reduce(torch.stack([values.nan_to_num(0.0, 0.0, 0.0), bad.float()]), "sum")
        sums, flags = stats.cpu().tolist()
        if any(flags):
            self._raise(flags.index(next(f for f in flags if f)), values, bad)
        world = self.acc.num_processes
        means = [s / world for s in sums]
        self.clear()
        return means

    def clear(self) -> None:
        self._losses, self._inputs_ok, self._terms, self._where = [], [], [], []

    def _why(self, j: int) -> str:
        """Which modality produced the non-finite loss of buffered micro-batch ``j`` on this rank."""
        names, flags = self._inputs_ok[j]
        bad = [m for m, ok in zip(names, flags.cpu().tolist(), strict=True) if not ok]
        if bad:
            return f"non-finite input values in modality {', '.join(bad)}"
        bad = [m for m, t in self._terms[j].items() if not bool(torch.isfinite(t).all())]
        if bad:
            return (f"non-finite loss term of modality {', '.join(bad)} (inputs are finite: the weights diverged, "
                    "or the normalisation made them non-finite)")
        return "every input and term is finite on this rank"

    def _raise(self, first: int, values: torch.Tensor, bad: torch.Tensor) -> None:
        """The first micro-batch with a non-finite loss on any rank; each rank reports its own tiles there."""
        w = self._where[first]
        mine = None
        if bool(bad[first]):
            mine = (f"rank {self.acc.process_index}: loss {float(values[first])}; {self._why(first)}; "
                    f"tiles {list(w.tiles)}")
        reports = [r for r in gather_object([mine]) if r]
        self.clear()
        raise TrainError(f"{w.phase} epoch {w.epoch} optimizer step {w.step} (batch {w.batch}): non-finite loss: "
                         + " | ".join(reports))
