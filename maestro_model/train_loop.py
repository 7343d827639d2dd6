"""The epoch loop of one training phase, the evaluation pass and their helpers (driven by
:class:`maestro_model.train.Trainer`; this module does not import it, so the dependency goes one way)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from maestro_data.errors import MaestroError
from maestro_data.stream import StreamLoader, to_model_batch
from maestro_model import schedule
from maestro_model.losses import multilabel_loss, segmentation_loss
from maestro_model.metrics import MultilabelCounts, SegmentationCounts

log = logging.getLogger("maestro.train")
EXIT_PREEMPTED = 75  # exit status of a simulated preemption (train.exit_after_steps)


class TrainError(MaestroError):
    """Training cannot start or go on (bad checkpoint, data/config mismatch, non-finite loss)."""


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


def nonfinite_report(inputs: dict, terms: dict[str, torch.Tensor], prepared: dict[str, torch.Tensor]) -> str:
    """Which modality produced a non-finite loss: a non-finite input, else a non-finite per-modality loss term."""
    bad = [m for m, x in prepared.items() if not bool(torch.isfinite(x).all())]
    if bad:
        return f"non-finite input values in modality {', '.join(bad)}"
    bad = [m for m, t in terms.items() if not bool(torch.isfinite(t).all())]
    if bad:
        return f"non-finite loss term of modality {', '.join(bad)} (inputs are finite: the weights diverged)"
    return "every input and term is finite on this rank"


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


def _check_finite(tr, progress: Progress, loss: torch.Tensor, terms: dict, inputs: dict, batch: dict) -> float:
    """Mean loss over ranks; every rank raises together if any rank's loss is not finite."""
    stats = tr.acc.reduce(torch.stack([loss.detach().float().nan_to_num(0.0, 0.0, 0.0),
                                       (~torch.isfinite(loss.detach())).float()]), "sum")
    if stats[1] == 0:
        return float(stats[0]) / tr.world
    mine = None
    if not bool(torch.isfinite(loss.detach())):
        with torch.no_grad():
            why = nonfinite_report(inputs, terms, tr.raw.prepare(inputs))
        mine = f"rank {tr.rank}: loss {float(loss.detach())}; {why}; tiles {_tile_ids(batch)}"
    reports = [r for r in gather_object([mine]) if r]
    raise TrainError(f"{progress.phase} epoch {progress.epoch} optimizer step {progress.step} (batch "
                     f"{progress.batch}): non-finite loss: " + " | ".join(reports))


def run_phase(tr, progress: Progress) -> dict:
    """Train one phase from ``progress`` to its last epoch, validating and checkpointing; returns its metrics."""
    cfg, acc, phase = tr.cfg, tr.acc, progress.phase
    pc = cfg.phase(phase)
    loader = tr.loader("pretrain" if phase == "pretrain" else "train", "train", pc.batch_size, cfg.data.subset)
    n = len(loader)
    if n == 0:
        raise TrainError(f"{phase}: the training split yields no batch of {pc.batch_size} per device on "
                         f"{tr.world} processes")
    steps = total_steps(n, pc.epochs, pc.grad_accum)
    global_batch = pc.batch_size * pc.grad_accum * tr.world
    peak = schedule.peak_lr(pc.base_lr, global_batch, cfg.train.lr_scaling)
    final = schedule.final_factor(phase, cfg.train.final_lr)
    alpha = schedule.ema_alpha(pc.epochs)
    # built once per phase (refusing a bad evaluation batch size before training) and reused by every evaluation
    val = tr.loader("val", "eval", pc.batch_size, cfg.data.subset)
    test = None if phase == "pretrain" else tr.loader("test", "eval", pc.batch_size, 100)
    if (progress.epoch, progress.batch, progress.step) == (0, 0, 0):
        tr.opt.optimizer.state.clear()  # fresh AdamW moments per phase, as the official fresh optimizer
    if acc.is_main_process:
        log.info("%s: %d epochs x %d batches, global batch %d, peak LR %.3g, final LR peak/%g, EMA alpha %.3g",
                 phase, pc.epochs, n, global_batch, peak, final, alpha)
    trace = tr.out / "trace" / f"{phase}-rank{tr.rank}.jsonl" if cfg.train.trace else None
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
    history = list(progress.history)
    accum = pc.grad_accum
    for epoch in range(progress.epoch, pc.epochs):
        loader.set_epoch(epoch)
        first, loss_sum = 0, 0.0
        if epoch == progress.epoch and progress.loader is not None:
            loader.load_state_dict(progress.loader)
            first, loss_sum = progress.batch, progress.loss_sum
        progress = replace(progress, epoch=epoch, batch=first, loader=None, loss_sum=0.0)
        tr.model.train()
        t0, seen = time.perf_counter(), 0
        bar = progress_bar(acc, n, f"{phase} {epoch + 1}/{pc.epochs}", cfg.train.quiet)
        bar.update(first)
        for i, batch in enumerate(loader, start=first):
            window = min(accum, n - (i // accum) * accum)
            sync = (i + 1) % accum == 0 or i + 1 == n
            inputs = model_inputs(batch, tr.manifest, acc.device)
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, phase, epoch, i, tr.rank))
            with nullcontext() if sync else acc.no_sync(tr.model):
                loss, terms = _forward(tr, phase, inputs, gen)
                mean_loss = _check_finite(tr, progress, loss, terms, inputs, batch)
                acc.backward(loss / window)
            seen += pc.batch_size * tr.world
            loss_sum += mean_loss
            bar.update(1)
            if trace is not None:
                _append(trace, {"epoch": epoch, "batch": i, "loss": float(loss.detach()), "tiles": _tile_ids(batch)})
            if not sync:
                continue
            lr = schedule.onecycle_lr(progress.step, steps, peak, final)
            for group in tr.opt.param_groups:
                group["lr"] = lr
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
            progress = replace(progress, batch=i + 1, step=progress.step + 1)
            tr.steps_run += 1
            if acc.is_main_process:
                _append(tr.out / "steps.jsonl", {"phase": phase, "epoch": epoch, "batch": i, "step": progress.step,
                                                 "loss": mean_loss, "lr": lr})
                if progress.step % cfg.train.log_every == 0:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if acc.log_with:
                acc.log({f"{phase}_loss/step_train": mean_loss, f"{phase}_AdamW_lr": lr}, step=progress.step)
            every = cfg.train.checkpoint_every
            if every and progress.step % every == 0 and i + 1 < n:
                tr.save_checkpoint(replace(progress, loader=loader.state_dict(), history=history, loss_sum=loss_sum))
            if cfg.train.exit_after_steps and tr.steps_run >= cfg.train.exit_after_steps:
                acc.wait_for_everyone()
                os._exit(EXIT_PREEMPTED)  # like a kill: no cleanup, no final checkpoint
        bar.close()
        elapsed = max(time.perf_counter() - t0, 1e-9)
        if epoch + 1 == pc.epochs:
            loader.close()  # its workers would otherwise build blocks of an epoch that never comes
        record = {"epoch": epoch + 1, "train_loss": loss_sum / n, "samples_per_s": seen / elapsed}
        if tr.ema is not None:
            tr.ema.update(tr.raw, alpha)
        if pc.eval_every and ((epoch + 1) % pc.eval_every == 0 or epoch + 1 == pc.epochs):
            record.update(evaluate(tr, phase, "val", val))
        history.append(record)
        if acc.is_main_process:
            log.info("%s epoch %d/%d: %s", phase, epoch + 1, pc.epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
        if acc.log_with:
            acc.log({f"{phase}/{k}": v for k, v in record.items() if k != "epoch"}, step=progress.step)
        progress = Progress(phase, epoch + 1, step=progress.step, history=history)
        tr.save_checkpoint(progress)
    if trace is not None:
        _append(trace, {"phase_end": phase, "world_size": tr.world, "weights_sha256": weights_digest(tr.raw)})
    result = {"phase": phase, "epochs": pc.epochs, "steps": steps, "global_batch": global_batch, "peak_lr": peak,
              "final_lr": peak / final, "ema_alpha": alpha, "history": history,
              "samples_per_s": history[-1]["samples_per_s"] if history else None}
    if test is not None:
        result["test"] = evaluate(tr, phase, "test", test)
        if acc.log_with:
            acc.log(result["test"], step=progress.step)
    return result


@torch.no_grad()
def evaluate(tr, phase: str, split: str, loader: StreamLoader) -> dict[str, float]:
    """Metrics of ``split`` (its eval-mode ``loader``) over every sample exactly once across ranks (padding rows
    dropped by ``valid``); fine-tuned models are evaluated with their EMA. Names follow the official
    ``{phase}_{target}/{metric}_{split}``."""
    acc, manifest = tr.acc, tr.manifest
    loader.set_epoch(0)  # always epoch 0: each pass of the reused loader yields what a fresh loader would
    counters = metric_counters(manifest, acc.device)
    sums = torch.zeros(2, dtype=torch.float64, device=acc.device)
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
            sums += torch.tensor([float(loss) * count, count], dtype=torch.float64, device=acc.device)
    tr.raw.train()
    loader.close()  # its workers would idle through a training epoch holding their batch memory
    sums = acc.reduce(sums, "sum")
    if int(sums[1]) != loader.num_samples:
        raise TrainError(f"{split}: evaluated {int(sums[1])} samples across ranks, the split has "
                         f"{loader.num_samples}: the loader's padding/valid mask is inconsistent")
    kind = "rec" if phase == "pretrain" else "pred"
    out = {f"{phase}_loss_{kind}/{split}": float(sums[0] / sums[1]), f"samples_{split}": int(sums[1])}
    if phase != "pretrain":
        for name, counter in counters.items():
            total = acc.reduce(counter.counts, "sum")
            out.update({f"{phase}_{name}/{k}_{split}": v for k, v in counter.scores(total).items()})
    return out
