"""How a training run uses its processes and devices: what each phase trains and its DDP wrapper, deterministic
algorithms, and the check that the launcher started the processes it was asked for."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

log = logging.getLogger("maestro.train")

# Modules a phase does not train. Pre-training never calls the target heads; probing trains the heads on detached
# encoder features (the official linear probe), so only the heads reach its loss; fine-tuning never calls the
# decoder side of the masked autoencoder.
DECODER_SIDE = ("enc_to_dec.", "decoder.", "mask_token.", "embed_to_rec.")
HEADS = ("heads.",)

# DDP's find_unused_parameters per phase. It costs a walk of the autograd graph after every forward, and is only
# needed where a TRAINED parameter can miss the loss. With :func:`trains` freezing each phase's untrained modules,
# every trained parameter of every phase reaches the loss on every batch (tests/test_train_units.py checks it for
# each fusion mode and target type), so no phase needs it. A model variant that breaks this must set its phase True.
FIND_UNUSED = {"pretrain": False, "probe": False, "finetune": False}


def trains(phase: str, name: str) -> bool:
    """Whether ``phase`` trains the parameter ``name`` of a :class:`~maestro_model.model.MaestroModel`."""
    if phase == "probe":
        return name.startswith(HEADS)
    if phase == "finetune":
        return not name.startswith(DECODER_SIDE)
    return not name.startswith(HEADS)


def freeze_for(model: nn.Module, phase: str) -> list[str]:
    """Set ``requires_grad`` to what ``phase`` trains -> the names frozen. Frozen parameters get no gradient, as
    they got none before (AdamW skips a parameter whose gradient is None: no step, no weight decay)."""
    frozen = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(phase, name))
        if not p.requires_grad:
            frozen.append(name)
    return frozen


def unfreeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def wrap_for_phase(acc: Accelerator, raw: nn.Module, phase: str) -> nn.Module:
    """``raw`` with ``phase``'s parameters trainable, in a DDP wrapper of its own when several processes run.

    A wrapper per phase: DDP fixes its parameter set and ``find_unused_parameters`` when it is built. Buffers are
    fixed positional encodings, never changed by training, so they are not re-broadcast at every forward."""
    freeze_for(raw, phase)
    if acc.num_processes == 1:
        return raw
    ids = [acc.device.index if acc.device.index is not None else acc.local_process_index] \
        if acc.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(raw, device_ids=ids, output_device=ids[0] if ids else None,
                                               find_unused_parameters=FIND_UNUSED[phase], broadcast_buffers=False)


def set_deterministic(on: bool) -> Callable[[], None]:
    """``train.deterministic``: PyTorch's deterministic algorithms, the cuBLAS workspace they need and no cuDNN
    autotuning -> a function that restores the previous process-wide settings (for library callers).

    ``warn_only``: an op without a deterministic CUDA kernel (e.g. the backward of the bilinear resize in the
    segmentation head of multi-resolution datasets) warns once instead of stopping the run."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if on:
        # read when cuBLAS creates its handle (the first matmul of the process), so set before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    def restore() -> None:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]

    return restore


def _flag_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def launcher_argv(pid: int | None = None) -> list[str] | None:
    """The command line of ``accelerate launch`` when it started this process (its parent), else None.

    ``accelerate launch`` runs a single process (its "simple launcher") whenever it is not told ``--multi_gpu``, or
    is told ``--cpu``, whatever ``--num_processes`` says; that child's environment does not record the request, so
    it is read from the parent's command line (Linux /proc; elsewhere the check is skipped)."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None
    try:
        raw = Path(f"/proc/{pid or os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not any("accelerate" in a for a in argv[:3]) or "launch" not in argv[:4] and not any(
            a.endswith("accelerate.commands.launch") for a in argv[:3]):
        return None
    return argv


def requested_processes(argv: list[str] | None) -> int | None:
    """Processes asked of ``accelerate launch`` (its ``--num_processes``), None when not given or not launched."""
    if argv is None:
        return None
    value = _flag_value(argv, ("--num_processes", "--num-processes"))
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def launch_warning(world: int, argv: list[str] | None = None) -> str | None:
    """One line when more processes were asked for than run (None when they match or nothing was asked)."""
    argv = launcher_argv() if argv is None else argv
    asked = requested_processes(argv)
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and env_world.isdigit() and int(env_world) != world:
        asked = int(env_world)
    if asked is None or asked == world:
        return None
    shown = f" ({shlex.join(argv[:12])})" if argv else ""
    return (f"{asked} processes were requested{shown} but {world} runs: `accelerate launch` starts ONE process "
            "with --cpu or without --multi_gpu; for several CPU processes run `CUDA_VISIBLE_DEVICES= accelerate "
            "launch --multi_gpu --num_processes N ... --cpu` (see the README)")
