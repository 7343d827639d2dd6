"""Learning-rate and EMA rules of MAESTRO's training protocol (model-spec §8.3, §8.5). Pure functions plus a small
EMA holder; the trainer sets the learning rate itself from :func:`onecycle_lr` so a resumed run needs nothing but
the optimizer-step count."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

PROTOCOLS = ("official", "paper")
PCT_START = 0.2        # warm-up fraction (Table 9)
DIV_FACTOR = 1000.0    # the warm-up starts at peak / 1000 (official OneCycleLR argument)
# peak / final learning rate at the end of each phase, official code vs paper text (model-spec §8.3, §10 items 2-3)
FINAL_FACTOR = {"official": {"pretrain": 1e7, "probe": 1e7, "finetune": 2.0},
                "paper": {"pretrain": 1e4, "probe": 1e4, "finetune": 2.0}}
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.01


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def peak_lr(base_lr: float, global_batch: int, protocol: str = "official") -> float:
    """Peak LR: base * sqrt(global batch / 3) in the official code ("iso with past runs"), base * sqrt(batch) in
    the paper. ``global_batch`` = per-device batch x accumulation x processes."""
    _check(protocol)
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    return base_lr * math.sqrt(global_batch / 3 if protocol == "official" else global_batch)


def final_factor(phase: str, protocol: str = "official") -> float:
    """peak / final learning rate of ``phase``."""
    _check(protocol)
    if phase not in FINAL_FACTOR[protocol]:
        raise ValueError(f"phase must be one of {', '.join(FINAL_FACTOR[protocol])}, got {phase!r}")
    return FINAL_FACTOR[protocol][phase]


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def onecycle_lr(step: int, total_steps: int, peak: float, final: float, pct_start: float = PCT_START,
                div_factor: float = DIV_FACTOR) -> float:
    """Learning rate of optimizer step ``step`` (0-based) under torch's cosine OneCycleLR with ``max_lr=peak``,
    ``div_factor`` and ``final_div_factor = final / div_factor``: starts at peak/div_factor, reaches ``peak`` after
    ``pct_start`` of the steps and ends at peak/``final`` on the last step."""
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside the schedule's {total_steps} steps")
    initial = peak / div_factor
    low = peak / final
    warm_end = pct_start * total_steps - 1
    if step <= warm_end:  # (torch divides by zero when the warm-up is a single step; here it starts at `initial`)
        return _cos(initial, peak, step / warm_end if warm_end > 0 else 0.0)
    return _cos(peak, low, (step - warm_end) / (total_steps - 1 - warm_end))


def ema_alpha(epochs: int) -> float:
    """EMA decay of a phase of ``epochs`` epochs: 1 - 1/(0.2 epochs) (paper Table 8), clamped at 0 for phases
    shorter than 5 epochs, where the formula would go negative (the EMA then equals the raw weights)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return max(0.0, 1.0 - 1.0 / (0.2 * epochs))


class EMA:
    """Exponential moving average of a module's parameters (buffers are fixed encodings, not averaged)."""

    def __init__(self, model: nn.Module):
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, alpha: float) -> None:
        """shadow <- alpha * shadow + (1 - alpha) * weights."""
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1.0 - alpha)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (evaluation with the EMA), then restore."""
        raw = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(raw[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    @torch.no_grad()
    def load_partial(self, state: dict[str, torch.Tensor], names: list[str]) -> int:
        """Take the averaged values of ``names`` from ``state`` (a transfer: the rest keeps the model's start)."""
        taken = [n for n in names if n in self.shadow and n in state and state[n].shape == self.shadow[n].shape]
        for n in taken:
            self.shadow[n].copy_(state[n].to(self.shadow[n].device, self.shadow[n].dtype))
        return len(taken)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, t in self.shadow.items():
            t.copy_(state[n].to(t.device, t.dtype))
