"""One training phase cut into its parts -- plan, micro-batch, optimizer step, epoch, end of epoch -- and the
evaluation pass (driven by :class:`maestro_model.train.Trainer`; this module does not import it, so the dependency
goes one way). Losses stay on the device between logging intervals (:mod:`maestro_model.loss_meter`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from maestro_data.stream.loader import StreamLoader, to_model_batch
from maestro_model import schedule
from maestro_model.config import PhaseConfig
from maestro_model.loss_meter import LossMeter, TrainError, Where
from maestro_model.losses import multilabel_loss, segmentation_loss
from maestro_model.metrics import MultilabelCounts, SegmentationCounts

log = logging.getLogger("maestro.train")
EXIT_PREEMPTED = 75  # exit status of a simulated preemption (train.exit_after_steps)


__all__ = ["EXIT_PREEMPTED", "Progress", "TrainError", "evaluate", "run_phase"]


@dataclass
class Progress:
    """Where a run stands: the next batch to train. Saved (one JSON per rank) with every checkpoint."""

    phase: str
    epoch: int = 0
    batch: int = 0                 # batches of this epoch already trained
    step: int = 0                  # optimizer steps of this phase already taken
    loader: dict | None = None     # the train loader's state at `batch` (mid-epoch only)
    history: list = field(default_factory=list)  # per-epoch validation records of this phase
    loss_sum: float = 0.0          # sum of this epoch's first `batch` batch losses (its train_loss goes on from it)


def step_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``parts`` (phase, epoch, batch, rank)."""
    raw = "/".join(map(str, (seed, *parts))).encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little") >> 1


def total_steps(batches: int, epochs: int, accum: int) -> int:
    """Optimizer steps of a phase: every epoch ends with a (possibly shorter) accumulation window."""
    return epochs * math.ceil(batches / accum)


def progress_bar(acc: Accelerator, total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", disable=quiet or not acc.is_main_process, leave=False)


def model_inputs(batch: dict, manifest, device: torch.device, keep: torch.Tensor | None = None) -> dict:
    """The loader's batch as model inputs on ``device``, restricted to the rows ``keep`` (eval padding)."""
    inputs = to_model_batch(batch, manifest, device)
    if keep is None:
        return inputs
    idx = keep.nonzero().flatten().tolist()
    return {k: (v[keep.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == keep.numel()
                else [v[i] for i in idx] if isinstance(v, list) else v) for k, v in inputs.items()}


def target_loss(manifest, logits: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
    """Sum over targets of the multilabel BCE / segmentation CE, skipping the missing value (model-spec §7.5)."""
    total = 0.0
    for name, out in logits.items():
        t = manifest.targets[name]
        fn = multilabel_loss if t.type == "multilabel" else segmentation_loss
        total = total + fn(out.float(), inputs[name], t.missing_value)
    return total


def metric_counters(manifest, device: torch.device) -> dict:
    return {t.name: (MultilabelCounts(t.num_classes, t.missing_value, device) if t.type == "multilabel"
                     else SegmentationCounts(t.num_classes, t.missing_value, t.ignore, device))
            for t in manifest.targets.values()}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state dict (identical weights across ranks have equal digests)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tile_ids(batch: dict) -> list[str]:
    return [str(i) for i in batch.get("tile_id", [])]


def _forward(tr, phase: str, inputs: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    if phase == "pretrain":
        out = tr.model(inputs, "pretrain", generator=generator)
        return out.loss, out.losses
    logits = tr.model(inputs, phase)
    return target_loss(tr.manifest, logits, inputs), {}


def _append(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """What a phase is fixed to before its first batch."""

    phase: str
    pc: PhaseConfig
    loader: StreamLoader
    batches: int            # per rank and epoch
    steps: int              # optimizer steps of the phase
    global_batch: int
    peak: float
    final: float
    alpha: float
    val: StreamLoader
    test: StreamLoader | None
    trace: Path | None


def plan_phase(tr, progress: Progress) -> Plan:
    """The phase's loaders (refusing a bad batch size before training), schedule and EMA rate."""
    cfg, phase = tr.cfg, progress.phase
    pc = cfg.phase(phase)
    loader = tr.loader("pretrain" if phase == "pretrain" else "train", "train", pc.batch_size, cfg.data.subset)
    n = len(loader)
    if n == 0:
        raise TrainError(f"{phase}: the training split yields no batch of {pc.batch_size} per device on "
                         f"{tr.world} processes")
    global_batch = pc.batch_size * pc.grad_accum * tr.world
    # built once per phase and reused by every evaluation
    val = tr.loader("val", "eval", pc.batch_size, cfg.data.subset)
    test = None if phase == "pretrain" else tr.loader("test", "eval", pc.batch_size, 100)
    trace = tr.out / "trace" / f"{phase}-rank{tr.rank}.jsonl" if cfg.train.trace else None
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
    plan = Plan(phase, pc, loader, n, total_steps(n, pc.epochs, pc.grad_accum), global_batch,
                schedule.peak_lr(pc.base_lr, global_batch, cfg.train.lr_scaling),
                schedule.final_factor(phase, cfg.train.final_lr), schedule.ema_alpha(pc.epochs), val, test, trace)
    if tr.acc.is_main_process:
        log.info("%s: %d epochs x %d batches per rank (%d processes x %d samples x %d accumulated = global batch "
                 "%d), peak LR %.3g, final LR peak/%g, EMA alpha %.3g", phase, pc.epochs, n, tr.world, pc.batch_size,
                 pc.grad_accum, global_batch, plan.peak, plan.final, plan.alpha)
    return plan


# ------------------------------------------------------------------------------------------------ steps
def micro_step(tr, plan: Plan, batch: dict, epoch: int, i: int, progress: Progress, meter: LossMeter) -> None:
    """Forward + backward of batch ``i``; gradients are all-reduced only on the window's last micro-batch."""
    accum, n = plan.pc.grad_accum, plan.batches
    window = min(accum, n - (i // accum) * accum)
    sync = (i + 1) % accum == 0 or i + 1 == n
    inputs = model_inputs(batch, tr.manifest, tr.acc.device)
    gen = torch.Generator().manual_seed(step_seed(tr.cfg.train.seed, plan.phase, epoch, i, tr.rank))
    with nullcontext() if sync else tr.acc.no_sync(tr.model):
        loss, terms = _forward(tr, plan.phase, inputs, gen)
        tr.acc.backward(loss / window)
    meter.add(loss, terms, inputs, Where(plan.phase, epoch, i, progress.step, tuple(_tile_ids(batch))))
    if plan.trace is not None:  # debugging aid: a host read per batch, only when asked for
        _append(plan.trace, {"epoch": epoch, "batch": i, "loss": float(loss.detach()), "tiles": _tile_ids(batch)})


def optimizer_step(tr, plan: Plan, progress: Progress, batch: int) -> tuple[Progress, float]:
    """One AdamW step at the OneCycle learning rate of step ``progress.step`` -> (progress after it, that LR)."""
    lr = schedule.onecycle_lr(progress.step, plan.steps, plan.peak, plan.final)
    for group in tr.opt.param_groups:
        group["lr"] = lr
    tr.opt.step()
    tr.opt.zero_grad(set_to_none=True)
    tr.steps_run += 1
    return replace(progress, batch=batch + 1, step=progress.step + 1), lr


@dataclass
class Tally:
    """This epoch's sum of batch losses (means over ranks) and the steps whose records wait for the next flush."""

    loss_sum: float = 0.0
    steps: list[tuple[int, int, int, float, int]] = field(default_factory=list)  # epoch, batch, step, lr, meter slot


def flush(tr, plan: Plan, meter: LossMeter, tally: Tally, bar: tqdm) -> None:
    """Reduce the buffered losses (one all-reduce), add them to the epoch's sum in batch order and write the
    waiting step records: steps.jsonl, the progress bar, the trackers. Collective: every rank calls it."""
    means = meter.flush()
    for m in means:  # one by one, in order: the float sum a per-batch reduction builds
        tally.loss_sum += m
    for epoch, batch, step, lr, slot in tally.steps:
        if tr.acc.is_main_process:
            _append(tr.out / "steps.jsonl", {"phase": plan.phase, "epoch": epoch, "batch": batch, "step": step,
                                             "loss": means[slot], "lr": lr})
        if tr.acc.log_with:
            tr.acc.log({f"{plan.phase}_loss/step_train": means[slot], f"{plan.phase}_AdamW_lr": lr}, step=step)
    if tally.steps:
        bar.set_postfix(loss=f"{means[tally.steps[-1][4]]:.4f}", lr=f"{tally.steps[-1][3]:.2e}")
    tally.steps.clear()


# ------------------------------------------------------------------------------------------------ epochs
def run_epoch(tr, plan: Plan, progress: Progress, history: list) -> tuple[Progress, float, float]:
    """Train epoch ``progress.epoch`` from ``progress.batch`` -> (progress at its end, its loss sum, samples/s)."""
    cfg, acc, loader, epoch = tr.cfg, tr.acc, plan.loader, progress.epoch
    loader.set_epoch(epoch)
    tally = Tally()
    first = 0
    if progress.loader is not None:
        loader.load_state_dict(progress.loader)
        first, tally.loss_sum = progress.batch, progress.loss_sum
    progress = replace(progress, batch=first, loader=None, loss_sum=0.0)
    tr.model.train()
    meter = LossMeter(acc, list(tr.manifest.modalities))
    t0, seen = time.perf_counter(), 0
    bar = progress_bar(acc, plan.batches, f"{plan.phase} {epoch + 1}/{plan.pc.epochs}", cfg.train.quiet)
    bar.update(first)
    for i, batch in enumerate(loader, start=first):
        micro_step(tr, plan, batch, epoch, i, progress, meter)
        seen += plan.pc.batch_size * tr.world
        bar.update(1)
        if not ((i + 1) % plan.pc.grad_accum == 0 or i + 1 == plan.batches):
            continue
        progress, lr = optimizer_step(tr, plan, progress, i)
        tally.steps.append((epoch, i, progress.step, lr, len(meter) - 1))
        every = cfg.train.checkpoint_every
        checkpoint = bool(every) and progress.step % every == 0 and i + 1 < plan.batches
        preempt = bool(cfg.train.exit_after_steps) and tr.steps_run >= cfg.train.exit_after_steps
        if checkpoint or preempt or progress.step % cfg.train.log_every == 0:
            flush(tr, plan, meter, tally, bar)
        if checkpoint:
            tr.save_checkpoint(replace(progress, loader=loader.state_dict(), history=history,
                                       loss_sum=tally.loss_sum))
        if preempt:
            acc.wait_for_everyone()
            os._exit(EXIT_PREEMPTED)  # like a kill right after the step's log record: no cleanup, no checkpoint
    flush(tr, plan, meter, tally, bar)
    bar.close()
    return progress, tally.loss_sum, seen / max(time.perf_counter() - t0, 1e-9)


def end_epoch(tr, plan: Plan, progress: Progress, loss_sum: float, speed: float, history: list) -> Progress:
    """EMA update, validation when due, the epoch's record, its checkpoint -> progress at the next epoch."""
    acc, epoch, pc = tr.acc, progress.epoch, plan.pc
    if epoch + 1 == pc.epochs:
        plan.loader.close()  # its workers would otherwise build blocks of an epoch that never comes
    record = {"epoch": epoch + 1, "train_loss": loss_sum / plan.batches, "samples_per_s": speed}
    if tr.ema is not None:
        tr.ema.update(tr.raw, plan.alpha)
    if pc.eval_every and ((epoch + 1) % pc.eval_every == 0 or epoch + 1 == pc.epochs):
        record.update(evaluate(tr, plan.phase, "val", plan.val))
    history.append(record)
    if acc.is_main_process:
        log.info("%s epoch %d/%d: %s", plan.phase, epoch + 1, pc.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
    if acc.log_with:
        acc.log({f"{plan.phase}/{k}": v for k, v in record.items() if k != "epoch"}, step=progress.step)
    progress = Progress(plan.phase, epoch + 1, step=progress.step, history=history)
    tr.save_checkpoint(progress)
    return progress


def run_phase(tr, progress: Progress) -> dict:
    """Train one phase from ``progress`` to its last epoch, validating and checkpointing; returns its metrics."""
    plan = plan_phase(tr, progress)
    if (progress.epoch, progress.batch, progress.step) == (0, 0, 0):
        tr.opt.optimizer.state.clear()  # fresh AdamW moments per phase, as the official fresh optimizer
    history = list(progress.history)
    for _ in range(progress.epoch, plan.pc.epochs):  # each epoch's end sets progress to the next one's start
        progress, loss_sum, speed = run_epoch(tr, plan, progress, history)
        progress = end_epoch(tr, plan, progress, loss_sum, speed, history)
    if plan.trace is not None:
        _append(plan.trace, {"phase_end": plan.phase, "world_size": tr.world, "weights_sha256": weights_digest(tr.raw)})
    result = {"phase": plan.phase, "epochs": plan.pc.epochs, "steps": plan.steps, "global_batch": plan.global_batch,
              "peak_lr": plan.peak, "final_lr": plan.peak / plan.final, "ema_alpha": plan.alpha, "history": history,
              "samples_per_s": history[-1]["samples_per_s"] if history else None}
    if plan.test is not None:
        result["test"] = evaluate(tr, plan.phase, "test", plan.test)
        if tr.acc.log_with:
            tr.acc.log(result["test"], step=progress.step)
    return result


def metric_split(manifest, phase: str, split: str) -> str:
    """The split's name in metric keys: ``heldin_<split>`` when pretraining reads that split (the official protocol
    pretrains on train + val), so its reconstruction loss is not read as a held-out score."""
    return f"heldin_{split}" if phase == "pretrain" and split in manifest.splits.pretrain else split


@torch.no_grad()
def evaluate(tr, phase: str, split: str, loader: StreamLoader) -> dict[str, float]:
    """Metrics of ``split`` (its eval-mode ``loader``) over every sample exactly once across ranks (padding rows
    dropped by ``valid``); fine-tuned models are evaluated with their EMA. Names follow the official
    ``{phase}_{target}/{metric}_{split}``."""
    acc, manifest = tr.acc, tr.manifest
    loader.set_epoch(0)  # always epoch 0: each pass of the reused loader yields what a fresh loader would
    counters = metric_counters(manifest, acc.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)  # stays on the device: no per-batch read
    samples = 0
    use_ema = phase == "finetune" and tr.ema is not None
    tr.raw.eval()
    with tr.ema.applied(tr.raw) if use_ema else nullcontext():
        for b, batch in enumerate(loader):
            keep = torch.as_tensor(batch["valid"]).bool().flatten()
            if not keep.any():
                continue
            inputs = model_inputs(batch, manifest, acc.device, keep)
            count = int(keep.sum())
            if phase == "pretrain":
                gen = torch.Generator().manual_seed(step_seed(tr.cfg.train.seed, "eval", split, b, tr.rank))
                loss = tr.raw(inputs, "pretrain", generator=gen).loss
            else:
                logits = tr.raw(inputs, "finetune")
                loss = target_loss(manifest, logits, inputs)
                for name, out in logits.items():
                    counters[name].update(out.float(), inputs[name])
            loss_sum += loss.detach().double() * count
            samples += count
    tr.raw.train()
    loader.close()  # its workers would idle through a training epoch holding their batch memory
    sums = acc.reduce(torch.stack([loss_sum, torch.tensor(float(samples), dtype=torch.float64,
                                                       device=acc.device)]), "sum")
    if int(sums[1]) != loader.num_samples:
        raise TrainError(f"{split}: evaluated {int(sums[1])} samples across ranks, the split has "
                         f"{loader.num_samples}: the loader's padding/valid mask is inconsistent")
    kind = "rec" if phase == "pretrain" else "pred"
    out = {f"{phase}_loss_{kind}/{metric_split(tr.manifest, phase, split)}": float(sums[0] / sums[1]),
           f"samples_{split}": int(sums[1])}
    if phase != "pretrain":
        for name, counter in counters.items():
            total = acc.reduce(counter.counts, "sum")
            out.update({f"{phase}_{name}/{k}_{split}": v for k, v in counter.scores(total).items()})
    return out
