"""What a ``maestro-train`` output folder holds, so that a new run never silently mixes with an earlier one.

A run writes ``config.toml``, ``steps.jsonl`` (appended), ``summary.json``, ``checkpoints/<phase>-e…-b…``,
``trace/<phase>-rank<r>.jsonl`` (appended) and one folder per phase. A new run of phases P.. (``probe``, then
``finetune`` for ``maestro-train probe`` after ``maestro-train pretrain``) may share the folder with the earlier
phases it starts from; anything of P or a later phase belongs to another run: refused unless resumed or overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from maestro_model.config import PHASES

CHECKPOINT = re.compile(r"(?P<phase>[a-z]+)-e\d+-b\d+")
TRACE = re.compile(r"(?P<phase>[a-z]+)-rank\d+\.jsonl")
TRACKER_DIR = "maestro"  # Accelerate's TensorBoard logs: <output_dir>/maestro (one stream for every phase)


def _later(phases: tuple[str, ...]) -> tuple[str, ...]:
    """``phases``' first phase and every phase after it: what a run of ``phases`` (re)writes or makes stale."""
    return PHASES[min(PHASES.index(p) for p in phases):]


def _step_phases(steps: Path) -> set[str]:
    phases = set()
    if steps.is_file():
        for line in steps.read_text(encoding="utf-8").splitlines():
            try:
                phases.add(json.loads(line)["phase"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line a killed run left half-written
    return phases


def held_outputs(out: Path, phases: tuple[str, ...]) -> list[str]:
    """What ``out`` holds of ``phases`` or later ones (a run this one would overwrite), as short descriptions."""
    later = _later(phases)
    held = [f"{p}/ (exported weights)" for p in later if (out / p).is_dir() and any((out / p).iterdir())]
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        names = sorted((d.name for d in ckpts.iterdir() if (m := CHECKPOINT.fullmatch(d.name)) and m["phase"] in later),
                       key=lambda n: (PHASES.index(n.split("-")[0]), n))  # training order: phase, epoch, batch
        if names:
            held.append(f"checkpoints/ ({len(names)} of {', '.join(dict.fromkeys(n.split('-')[0] for n in names))}, "
                        f"last {names[-1]})")
    logged = sorted(_step_phases(out / "steps.jsonl") & set(later), key=PHASES.index)
    if logged:
        held.append(f"steps.jsonl (steps of {', '.join(logged)})")
    if (out / "trace").is_dir() and any((m := TRACE.fullmatch(f.name)) and m["phase"] in later
                                        for f in (out / "trace").iterdir()):
        held.append("trace/ (per-rank step traces)")
    return held


def refusal(out: Path, phases: tuple[str, ...], held: list[str]) -> str:
    return (f"{out}: the output folder holds another run ({'; '.join(held)}): pass --resume auto to continue it, "
            f"--overwrite to replace its {'/'.join(_later(phases))} outputs, or another --output-dir")


def clear_outputs(out: Path, phases: tuple[str, ...]) -> None:
    """``--overwrite``: remove what ``out`` holds of ``phases`` and later ones; earlier phases' exports stay (a
    ``probe`` run starts from ``pretrain/``)."""
    later = set(_later(phases))
    for p in later:
        shutil.rmtree(out / p, ignore_errors=True)
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        for d in ckpts.iterdir():
            if (m := CHECKPOINT.fullmatch(d.name)) and m["phase"] in later:
                shutil.rmtree(d, ignore_errors=True)
        latest = ckpts / "latest"
        if latest.is_file() and not (ckpts / latest.read_text().strip()).is_dir():
            latest.unlink()  # pointed at a removed checkpoint; the earlier phases' exports are what carries on
    steps = out / "steps.jsonl"
    if steps.is_file():
        kept = [line for line in steps.read_text(encoding="utf-8").splitlines() if _keep(line, later)]
        tmp = steps.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, steps)
    if (out / "trace").is_dir():
        for f in (out / "trace").iterdir():
            if (m := TRACE.fullmatch(f.name)) and m["phase"] in later:
                f.unlink()
    (out / "summary.json").unlink(missing_ok=True)
    if "pretrain" in later:  # the whole run is replaced: its tracker logs too
        shutil.rmtree(out / TRACKER_DIR, ignore_errors=True)


def _keep(line: str, later: set[str]) -> bool:
    try:
        return json.loads(line)["phase"] not in later
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
