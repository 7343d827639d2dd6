"""Accelerate trainer: pretrain -> probe -> finetune with MAESTRO's protocol (model-spec §8), exact resume.

One model object goes through the phases; each phase gets fresh AdamW moments and its own OneCycle schedule (set
per optimizer step from :mod:`maestro_model.schedule`), the probe's head starts fine-tuning, and an EMA of the
weights (updated at every epoch end, then used for validation: model-spec §8.5's "faithful in spirit" order)
evaluates the fine-tuned model. Metrics are integer counts summed over ranks, each sample counted once.
Checkpoints (``accelerator.save_state`` + per-rank loader position + EMA) land every N optimizer steps and at every
epoch end; a resumed run repeats exactly what an uninterrupted one does, bit for bit on CPU when it computes with
the same number of intra-op threads (``train.threads``: CPU reductions are split per thread, so another count
changes the last bits of sums and gradients), and on GPUs with ``train.deterministic`` (see the README for what
that covers). Each phase trains under a DDP wrapper of its own (:mod:`maestro_model.runtime`). Launch with
``accelerate launch -m maestro_model.train ...`` or the ``maestro-train`` console script.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import asdict, replace
from importlib.util import find_spec
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from maestro_data.manifest import load_manifest
from maestro_data.stream.loader import StreamConfig, StreamLoader, load_table
from maestro_data.stream.shard_read import check_manifest, open_index
from maestro_data.unlabelled import is_labelled
from maestro_model import run_folder, runtime, schedule
from maestro_model.checkpoints import load_weights, read_checkpoint, read_state_dict, save_model
from maestro_model.config import PHASES, RETIRED, TrainConfig
from maestro_model.model import build_model
from maestro_model.train_loop import Progress, TrainError, run_phase

# TrainError and Progress live in train_loop (which never imports this module) and are re-exported here
__all__ = ["Trainer", "TrainError", "Progress", "train", "make_accelerator", "checkpoint_order"]

log = logging.getLogger("maestro.train")
STATE_FILE = "trainer_state_rank{}.json"
EMA_FILE = "ema.safetensors"  # the EMA's averaged parameters, inside checkpoints (and phase folders of older runs)
WEIGHTS_FILE = "model.safetensors"  # per phase: the trained weights
EMA_WEIGHTS_FILE = "model-ema.safetensors"  # per phase, only with train.ema: the EMA copy as a loadable model
DONE_FILE = "COMPLETE"
CHECKPOINT_NAME = re.compile(r"(?P<phase>[a-z]+)-e(?P<epoch>\d+)-b(?P<batch>\d+)")


def checkpoint_order(name: str) -> tuple[int, int, int] | None:
    """Training order of a checkpoint folder ``<phase>-e<epoch>-b<batch>`` (None: not a checkpoint name).
    Names alone sort ``finetune`` before ``pretrain``: pruning must compare (phase, epoch, batch)."""
    m = CHECKPOINT_NAME.fullmatch(name)
    if m is None or m["phase"] not in PHASES:
        return None
    return PHASES.index(m["phase"]), int(m["epoch"]), int(m["batch"])


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator for ``cfg``: CPU (gloo) without a GPU, bf16 by default on GPUs that support it."""
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    # DDP notes a stride mismatch of the 1x1 pixel-head convolutions' gradients: harmless, and once per run
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    trackers = "tensorboard" if find_spec("tensorboard") or find_spec("tensorboardX") else None
    # no DDP kwargs: the trainer wraps each phase itself (runtime.wrap_for_phase)
    return Accelerator(cpu=cpu, mixed_precision=precision, log_with=trackers, project_dir=cfg.train.output_dir)


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
        # before the accelerator: CUBLAS_WORKSPACE_CONFIG must be set before any CUDA work
        self._restore_determinism = runtime.set_deterministic(cfg.train.deterministic)
        self.acc = make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.manifest = load_manifest(cfg.data.manifest)
        if not cfg.data.index:
            raise TrainError("data.index is not set: give the shard index (path or URL) of a built dataset")
        # opened once: every loader reuses it
        self.index, self.index_location = open_index(cfg.data.index, self._stream_options().access_options())
        check_manifest(self.index, self.manifest, self.index_location)
        if not is_labelled(self.index):
            raise TrainError(f"{self.index_location}: built with --no-targets (no labels): it can be predicted "
                             "(maestro-model predict), not trained on")
        self._check_subset()
        self._claim_output_dir()  # after the inputs are known good: --overwrite removes nothing for a doomed run
        self.steps_run = 0  # optimizer steps taken by this process (train.exit_after_steps)
        self.loaders: list[StreamLoader] = []  # this phase's loaders: their worker processes stop with the phase
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
        # device placement and mixed precision only; each phase builds its own DDP wrapper (_run_phases)
        self.raw = self.acc.prepare_model(model, evaluation_mode=True)
        self.model: torch.nn.Module = self.raw
        self.opt = self.acc.prepare_optimizer(opt)
        self._log_start()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(cfg.to_toml())
        if self.acc.log_with:
            flat = {k: v for k, v in json.loads(json.dumps(cfg.fingerprint())).items()
                    if isinstance(v, int | float | str | bool)}
            self.acc.init_trackers("maestro", config=flat)

    # ------------------------------------------------------------------------------------------------ start
    def _claim_output_dir(self) -> None:
        """Refuse an output folder holding another run's outputs of these phases (unless resuming), or clear them
        with ``train.overwrite``. Rank 0 decides and tells every rank, so all stop together."""
        t = self.cfg.train
        held = run_folder.held_outputs(self.out, self.phases) if self.acc.is_main_process and not t.resume else []
        held = broadcast_object_list([held])[0] if self.world > 1 else held
        if held and not t.overwrite:
            raise TrainError(run_folder.refusal(self.out, self.phases, held))
        if held and self.acc.is_main_process:
            log.warning("%s: --overwrite: removing %s", self.out, "; ".join(held))
            run_folder.clear_outputs(self.out, self.phases)
        self.acc.wait_for_everyone()

    def _check_subset(self) -> None:
        """``data.subset`` must be 100 or a tier the shards hold for every split the run reads."""
        subset = self.cfg.data.subset
        if subset == 100:
            return
        for split in (*self.manifest.splits.pretrain, "train", "val"):
            info = self.index["splits"].get(split)
            if info is not None and str(subset) not in info["tiers"]:
                tiers = sorted((int(t) for t in info["tiers"]), key=int)
                raise TrainError(f"{self.index_location}: data.subset = {subset}, but the shards of split {split!r} "
                                 f"hold the tiers {', '.join(map(str, tiers))} (100 = all); choose one of them, or "
                                 f"build with --percents including {subset}")

    def _log_start(self) -> None:
        acc = self.acc
        if not acc.is_main_process:
            return
        device = acc.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{self.threads} threads per process"
        log.info("%d process%s (%s), device %s (%s), precision %s%s", self.world, "es" if self.world > 1 else "",
                 acc.distributed_type.value, device, name, acc.mixed_precision,
                 ", deterministic algorithms" if self.cfg.train.deterministic else "")
        warning = runtime.launch_warning(self.world)
        if warning:
            log.warning(warning)

    # ------------------------------------------------------------------------------------------------ weights
    def _previous_export(self) -> Path | None:
        earlier = PHASES[:PHASES.index(self.phases[0])]
        for p in reversed(earlier):
            if (self.out / p / WEIGHTS_FILE).is_file():
                return self.out / p
        return None

    def _initial_weights(self, model: torch.nn.Module) -> None:
        t = self.cfg.train
        self.init_ckpt, self.init_report = None, None
        if t.init:
            self.init_ckpt = read_checkpoint(t.init, trusted=t.init_trust)
            self.init_report = load_weights(model, self.init_ckpt, which=t.init_which, strict=t.init_strict,
                                            settings=t.init_settings, force=t.init_force)
            log.info("initial weights: %s (%s, %d tensors)", t.init, t.init_which, self.init_report.loaded)
        elif (prev := self._previous_export()) is not None:
            load_weights(model, prev / WEIGHTS_FILE)
            log.info("initial weights: %s (previous phase of this output folder)", prev / WEIGHTS_FILE)
        elif self.phases[0] != "pretrain":
            log.warning("%s starts from a randomly initialised encoder (no train.init, no earlier phase in %s)",
                        self.phases[0], self.out)

    def _initial_ema(self, model: torch.nn.Module) -> None:
        t = self.cfg.train
        if self.ema is not None and self.init_ckpt is not None and t.init_ema == "checkpoint" \
                and "ema_model" in self.init_ckpt.prefixes:
            # as the official load_from_checkpoint: the averaged copy continues from the file's own ema_model
            n = self.ema.load_partial(read_state_dict(self.init_ckpt, which="ema_model"), self.init_report.loaded_keys)
            log.info("EMA restored from %s (ema_model, %d tensors)", t.init, n)
            return
        prev = None if t.init else self._previous_export()
        if self.ema is None or prev is None:
            return
        if (prev / EMA_WEIGHTS_FILE).is_file():  # the EMA goes on from the previous phase's averaged parameters
            saved = load_file(prev / EMA_WEIGHTS_FILE)
            self.ema.load_state_dict({k: saved[k] for k in self.ema.shadow if k in saved})
        elif (prev / EMA_FILE).is_file():  # a phase folder written before model-ema.safetensors carried it
            self.ema.load_state_dict(load_file(prev / EMA_FILE))

    def _export(self, phase: str) -> Path:
        """``model.safetensors``, and ``model-ema.safetensors`` when an EMA is kept (it also carries the EMA into
        the next phase): two loadable models, no third copy of the averaged parameters."""
        folder = self.out / phase
        if self.acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            save_model(self.raw, folder / WEIGHTS_FILE)
            if self.ema is not None:
                with self.ema.applied(self.raw):
                    save_model(self.raw, folder / EMA_WEIGHTS_FILE, ema=True)
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
                 "deterministic": self.cfg.train.deterministic, "progress": asdict(progress)}
        (path / STATE_FILE.format(self.rank)).write_text(json.dumps(state))
        if self.acc.is_main_process and self.ema is not None:
            save_file(self.ema.state_dict(), str(path / EMA_FILE))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (path / DONE_FILE).write_text("")
            tmp = root / "latest.tmp"
            tmp.write_text(path.name)
            os.replace(tmp, root / "latest")
            done = sorted((p for p in root.iterdir() if (p / DONE_FILE).is_file() and checkpoint_order(p.name)),
                          key=lambda p: checkpoint_order(p.name))
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
        mine, saved_cfg = self.cfg.fingerprint(), {k: v for k, v in state["config"].items() if k not in RETIRED}
        diff = sorted(k for k in mine.keys() | saved_cfg.keys() if mine.get(k) != saved_cfg.get(k))
        if diff:
            shown = ", ".join(f"{k}: checkpoint {saved_cfg.get(k)!r} vs run {mine.get(k)!r}" for k in diff[:6])
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
        if state.get("deterministic", False) != self.cfg.train.deterministic and self.acc.device.type == "cuda":
            log.warning("%s: written with train.deterministic = %s, resuming with %s: CUDA kernels then differ, so "
                        "the run will not repeat the uninterrupted one bit for bit", path,
                        str(state.get("deterministic", False)).lower(), str(self.cfg.train.deterministic).lower())
        self.acc.load_state(str(path))
        if self.ema is not None:
            self.ema.load_state_dict(load_file(path / EMA_FILE))
        log.info("resumed from %s (%s epoch %d, batch %d)", path, progress.phase, progress.epoch, progress.batch)
        return progress

    # ------------------------------------------------------------------------------------------------ data
    def _stream_options(self) -> StreamConfig:
        """The [data] settings every loader of the run shares (remote access and cache included)."""
        d = self.cfg.data
        return StreamConfig(index=d.index, split="train", seed=self.cfg.train.seed, num_workers=d.num_workers,
                            cache_dir=d.cache_dir or None, cache_limit_gb=d.cache_limit_gb or None,
                            retries=d.retries, timeout_s=d.timeout_s,
                            # page-locked worker slots: the host->GPU copies of to_model_batch run asynchronously
                            pin_memory=self.acc.device.type == "cuda")

    def loader(self, split: str, mode: str, batch_size: int, subset: int) -> StreamLoader:
        """This rank's loader of ``split`` from the index opened (and checked) once in ``__init__``."""
        sc = replace(self._stream_options(), split=split, mode=mode, subset=subset, batch_size=batch_size)
        table = load_table(self.index, self.index_location, self.manifest, split, subset)
        loader = StreamLoader(sc, self.manifest, table, self.rank, self.world)
        self.loaders.append(loader)
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
            self._restore_determinism()

    def _run_phases(self) -> dict[str, dict]:
        start = self.load_checkpoint(self.cfg.train.resume) if self.cfg.train.resume else None
        results = {}
        for phase in self.phases:
            if start is not None and PHASES.index(phase) < PHASES.index(start.phase):
                continue
            progress = start if start is not None and start.phase == phase else Progress(phase)
            start = None
            self.model = runtime.wrap_for_phase(self.acc, self.raw, phase)
            try:
                results[phase] = run_phase(self, progress)
            finally:  # a failed phase too: no worker process or shared batch memory outlives it
                for loader in self.loaders:
                    loader.close()
                self.loaders.clear()
                self.model = self.raw  # drops the phase's DDP wrapper (and its gradient hooks)
                runtime.unfreeze(self.raw)
            folder = self._export(phase)
            if self.acc.is_main_process:
                (folder / "metrics.json").write_text(json.dumps(results[phase], indent=1, sort_keys=True))
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return results


def train(cfg: TrainConfig, phases: tuple[str, ...] = PHASES) -> dict[str, dict]:
    """Library entry point: run ``phases`` of ``cfg`` -> {phase: metrics}."""
    return Trainer(cfg, phases).run()


if __name__ == "__main__":
    from maestro_cli.train import main

    main()
