"""Accelerate trainer: pretrain -> probe -> finetune with MAESTRO's protocol (model-spec §8), exact resume.

One model object goes through the phases; each phase gets fresh AdamW moments and its own OneCycle schedule (set
per optimizer step from :mod:`maestro_model.schedule`), the probe's head starts fine-tuning, and an EMA of the
weights (updated at every epoch end, then used for validation: model-spec §8.5's "faithful in spirit" order)
evaluates the fine-tuned model. Metrics are integer counts summed over ranks, each sample counted once.
Checkpoints (``accelerator.save_state`` + per-rank loader position + EMA) land every N optimizer steps and at every
epoch end; a resumed run repeats exactly what an uninterrupted one does, bit for bit on CPU when it computes with
the same number of intra-op threads (``train.threads``: CPU reductions are split per thread, so another count
changes the last bits of sums and gradients). Launch with ``accelerate launch -m maestro_model.train ...`` or the
``maestro-train`` console script.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from maestro_data.errors import MaestroError
from maestro_data.manifest import load_manifest
from maestro_data.shard_read import check_manifest, open_index
from maestro_data.stream import StreamConfig, make_loader, to_model_batch
from maestro_model import schedule
from maestro_model.checkpoints import load_weights, save_model
from maestro_model.config import PHASES, TrainConfig
from maestro_model.losses import multilabel_loss, segmentation_loss
from maestro_model.metrics import MultilabelCounts, SegmentationCounts
from maestro_model.model import build_model

log = logging.getLogger("maestro.train")
STATE_FILE = "trainer_state_rank{}.json"
EMA_FILE = "ema.safetensors"
DONE_FILE = "COMPLETE"


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


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator for ``cfg``: CPU (gloo) without a GPU, bf16 by default on GPUs that support it."""
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    # DDP notes a stride mismatch of the 1x1 pixel-head convolutions' gradients: harmless, and once per run
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    trackers = "tensorboard" if find_spec("tensorboard") or find_spec("tensorboardX") else None
    return Accelerator(cpu=cpu, mixed_precision=precision, log_with=trackers, project_dir=cfg.train.output_dir,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def nonfinite_report(inputs: dict, terms: dict[str, torch.Tensor], prepared: dict[str, torch.Tensor]) -> str:
    """Which modality produced a non-finite loss: a non-finite input, else a non-finite per-modality loss term."""
    bad = [m for m, x in prepared.items() if not bool(torch.isfinite(x).all())]
    if bad:
        return f"non-finite input values in modality {', '.join(bad)}"
    bad = [m for m, t in terms.items() if not bool(torch.isfinite(t).all())]
    if bad:
        return f"non-finite loss term of modality {', '.join(bad)} (inputs are finite: the weights diverged)"
    return "every input and term is finite on this rank"


class Trainer:
    """Runs ``phases`` of ``cfg`` under one Accelerator; :meth:`run` returns the metrics per phase."""

    def __init__(self, cfg: TrainConfig, phases: tuple[str, ...] = PHASES):
        bad = [p for p in phases if p not in PHASES]
        if bad or not phases:
            raise TrainError(f"phases must be among {', '.join(PHASES)}, got {list(phases)}")
        self.cfg, self.phases = cfg, tuple(p for p in PHASES if p in phases and cfg.phase(p).epochs > 0)
        if not self.phases:
            raise TrainError(f"every requested phase ({', '.join(phases)}) has epochs = 0")
        self.out = Path(cfg.train.output_dir)
        self.acc = make_accelerator(cfg)
        self.manifest = load_manifest(cfg.data.manifest)
        if not cfg.data.index:
            raise TrainError("data.index is not set: give the shard index (path or URL) of a built dataset")
        index, loc = open_index(cfg.data.index)
        check_manifest(index, self.manifest, loc)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.steps_run = 0  # optimizer steps taken by this process (train.exit_after_steps)
        self.threads = cfg.train.threads or torch.get_num_threads()  # intra-op threads :meth:`run` computes with
        m = cfg.model
        with torch.random.fork_rng(devices=[]):  # identical initial weights on every rank, global RNG untouched
            torch.manual_seed(cfg.train.seed)
            model = build_model(self.manifest, m.size, m.fusion, multispectral=m.multispectral,
                                inter_depth=None if m.inter_depth < 0 else m.inter_depth, **m.options)
        self._initial_weights(model)
        self.ema = schedule.EMA(model) if cfg.train.ema else None
        self._initial_ema(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=schedule.BETAS, weight_decay=schedule.WEIGHT_DECAY)
        self.model, self.opt = self.acc.prepare(model, opt)
        self.raw = self.acc.unwrap_model(self.model)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(cfg.to_toml())
        if self.acc.log_with:
            flat = {k: v for k, v in json.loads(json.dumps(cfg.fingerprint())).items()
                    if isinstance(v, int | float | str | bool)}
            self.acc.init_trackers("maestro", config=flat)

    # ------------------------------------------------------------------------------------------------ weights
    def _previous_export(self) -> Path | None:
        earlier = PHASES[:PHASES.index(self.phases[0])]
        for p in reversed(earlier):
            if (self.out / p / "model.safetensors").is_file():
                return self.out / p
        return None

    def _initial_weights(self, model: torch.nn.Module) -> None:
        t = self.cfg.train
        if t.init:
            report = load_weights(model, t.init, which=t.init_which, strict=t.init_strict, trusted=False)
            log.info("initial weights: %s (%d tensors)", t.init, report.loaded)
        elif (prev := self._previous_export()) is not None:
            load_weights(model, prev / "model.safetensors")
            log.info("initial weights: %s (previous phase of this output folder)", prev / "model.safetensors")
        elif self.phases[0] != "pretrain":
            log.warning("%s starts from a randomly initialised encoder (no train.init, no earlier phase in %s)",
                        self.phases[0], self.out)

    def _initial_ema(self, model: torch.nn.Module) -> None:
        prev = None if self.cfg.train.init else self._previous_export()
        if self.ema is not None and prev is not None and (prev / EMA_FILE).is_file():
            self.ema.load_state_dict(load_file(prev / EMA_FILE))

    def _export(self, phase: str) -> Path:
        folder = self.out / phase
        if self.acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            save_model(self.raw, folder / "model.safetensors")
            if self.ema is not None:
                save_file(self.ema.state_dict(), str(folder / EMA_FILE))
                with self.ema.applied(self.raw):
                    save_model(self.raw, folder / "model-ema.safetensors")
            (folder / "config.toml").write_text(self.cfg.to_toml())
        return folder

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, progress: Progress) -> Path:
        """accelerate state + EMA + every rank's position; ``latest`` moves only when all of it is on disk."""
        root = self.out / "checkpoints"
        path = root / f"{progress.phase}-e{progress.epoch:04d}-b{progress.batch:06d}"
        self.acc.wait_for_everyone()
        self.acc.save_state(str(path))
        state = {"config": self.cfg.fingerprint(), "world_size": self.world, "threads": torch.get_num_threads(),
                 "progress": asdict(progress)}
        (path / STATE_FILE.format(self.rank)).write_text(json.dumps(state))
        if self.acc.is_main_process and self.ema is not None:
            save_file(self.ema.state_dict(), str(path / EMA_FILE))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (path / DONE_FILE).write_text("")
            tmp = root / "latest.tmp"
            tmp.write_text(path.name)
            os.replace(tmp, root / "latest")
            done = sorted(p for p in root.iterdir() if (p / DONE_FILE).is_file())
            for old in done[:-self.cfg.train.keep_checkpoints]:
                if old != path:
                    for f in sorted(old.rglob("*"), reverse=True):
                        f.rmdir() if f.is_dir() else f.unlink()
                    old.rmdir()
        return path

    def load_checkpoint(self, where: str) -> Progress:
        """Restore a checkpoint folder (or ``auto``: this output folder's latest) after checking it fits the run."""
        if where == "auto":
            latest = self.out / "checkpoints" / "latest"
            if not latest.is_file():
                raise TrainError(f"resume=auto: no checkpoint in {self.out / 'checkpoints'}")
            where = str(latest.parent / latest.read_text().strip())
        path = Path(where)
        state_file = path / STATE_FILE.format(self.rank)
        if not (path / DONE_FILE).is_file() or not state_file.is_file():
            raise TrainError(f"{path}: not a complete maestro checkpoint (no {DONE_FILE} or {state_file.name})")
        state = json.loads(state_file.read_text())
        if state["world_size"] != self.world:
            raise TrainError(f"{path}: saved by {state['world_size']} processes, resumed with {self.world}; "
                             "exact resume needs the same number")
        mine = self.cfg.fingerprint()
        diff = sorted(k for k in mine.keys() | state["config"].keys() if mine.get(k) != state["config"].get(k))
        if diff:
            shown = ", ".join(f"{k}: checkpoint {state['config'].get(k)!r} vs run {mine.get(k)!r}" for k in diff[:6])
            raise TrainError(f"{path}: checkpoint of another configuration ({shown})")
        progress = Progress(**state["progress"])
        if progress.phase not in self.phases:
            raise TrainError(f"{path}: checkpoint is in phase {progress.phase!r}, this run covers "
                             f"{', '.join(self.phases)}")
        saved = state.get("threads")
        if saved is not None and saved != self.threads and self.acc.device.type == "cpu":
            log.warning("%s: written with %d intra-op threads, resuming with %d: CPU sums split differently, so the "
                        "losses will equal the uninterrupted run's only to rounding (set train.threads=%d for "
                        "bit-identical ones)", path, saved, self.threads, saved)
        self.acc.load_state(str(path))
        if self.ema is not None:
            self.ema.load_state_dict(load_file(path / EMA_FILE))
        log.info("resumed from %s (%s epoch %d, batch %d)", path, progress.phase, progress.epoch, progress.batch)
        return progress

    # ------------------------------------------------------------------------------------------------ data
    def loader(self, split: str, mode: str, batch_size: int, subset: int):
        sc = StreamConfig(index=self.cfg.data.index, split=split, mode=mode, subset=subset, batch_size=batch_size,
                          seed=self.cfg.train.seed, num_workers=self.cfg.data.num_workers)
        loader = make_loader(sc, self.manifest)
        if mode == "eval" and batch_size > loader.num_samples // self.world:
            raise TrainError(f"{split}: batch size {batch_size} per device exceeds a rank's share of the evaluation "
                             f"set ({loader.num_samples} samples / {self.world} processes); lower the batch size")
        return loader

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, dict]:
        """Run the phases (resuming if configured) -> {phase: metrics} (also ``<out>/<phase>/metrics.json``)."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # process-wide: restored below for library callers
        try:
            return self._run_phases()
        finally:
            torch.set_num_threads(previous)

    def _run_phases(self) -> dict[str, dict]:
        from maestro_model.train_loop import run_phase  # the epoch loop lives beside, to keep both files short

        start = self.load_checkpoint(self.cfg.train.resume) if self.cfg.train.resume else None
        results = {}
        for phase in self.phases:
            if start is not None and PHASES.index(phase) < PHASES.index(start.phase):
                continue
            progress = start if start is not None and start.phase == phase else Progress(phase)
            start = None
            results[phase] = run_phase(self, progress)
            folder = self._export(phase)
            if self.acc.is_main_process:
                (folder / "metrics.json").write_text(json.dumps(results[phase], indent=1, sort_keys=True))
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return results


def train(cfg: TrainConfig, phases: tuple[str, ...] = PHASES) -> dict[str, dict]:
    """Library entry point: run ``phases`` of ``cfg`` -> {phase: metrics}."""
    return Trainer(cfg, phases).run()


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


def time_now() -> float:
    return time.perf_counter()


if __name__ == "__main__":
    from maestro_cli.train import main

    main()
