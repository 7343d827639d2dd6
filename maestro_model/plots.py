"""`maestro-train plot`: training curves of a run folder, also while the run is going.

Read: ``steps.jsonl`` (loss and LR of every optimizer step; a line being written is skipped, and a step logged
twice, by a run resumed from an earlier checkpoint, keeps its last record), each finished phase's
``<phase>/metrics.json`` (per-epoch validation ``history``) and, for the phase still running, the per-epoch records
saved with its latest checkpoint. Drawn: one column per phase, loss and LR per step above, the per-epoch metrics
below (losses on the left axis, scores in [0, 1] on the right).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maestro_data.errors import MaestroError
from maestro_data.inspect.figures import new_figure, save_png
from maestro_model.config import PHASES

SKIPPED_METRICS = ("epoch", "samples_per_s")
# metric names of older runs -> today's: the pretraining validation loss was named as if held out, but pretraining
# reads the val split (every built-in manifest pretrains on train + val)
RENAMED_METRICS = {"pretrain_loss_rec/val": "pretrain_loss_rec/heldin_val"}


def read_steps(path: Path) -> dict[str, dict[int, dict]]:
    """{phase: {step: record}} from ``steps.jsonl``; an unfinished last line (the run is writing it) is skipped."""
    out: dict[str, dict[int, dict]] = {}
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                continue
            raise MaestroError(f"{path}: line {n + 1} is not JSON") from None
        out.setdefault(record["phase"], {})[int(record["step"])] = record
    return out


def _running_history(run: Path) -> tuple[str | None, list[dict]]:
    """(phase, per-epoch records) saved with the run's latest checkpoint, if any."""
    from maestro_model.train import STATE_FILE

    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        return None, []
    state = latest.parent / latest.read_text().strip() / STATE_FILE.format(0)
    if not state.is_file():
        return None, []
    progress = json.loads(state.read_text())["progress"]
    return progress["phase"], progress.get("history") or []


def read_run(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{phase: {"steps": [(step, loss, lr), ...], "epochs": [record, ...], "finished": bool}} in phase order."""
    run = Path(run_dir)
    if not run.is_dir():
        raise MaestroError(f"{run}: no run folder")
    steps = read_steps(run / "steps.jsonl")
    running, running_epochs = _running_history(run)
    out = {}
    for phase in PHASES:
        metrics = run / phase / "metrics.json"
        epochs = json.loads(metrics.read_text())["history"] if metrics.is_file() else []
        if not epochs and phase == running:
            epochs = running_epochs
        epochs = [{RENAMED_METRICS.get(k, k): v for k, v in r.items()} for r in epochs]
        if phase in steps or epochs:
            out[phase] = {"steps": [(s, r["loss"], r["lr"]) for s, r in sorted(steps.get(phase, {}).items())],
                          "epochs": epochs, "finished": metrics.is_file()}
    if not out:
        raise MaestroError(f"{run}: no steps.jsonl records and no <phase>/metrics.json: not a maestro-train run "
                           "folder, or no optimizer step yet")
    return out


def _epoch_panel(ax: Any, phase: str, epochs: list[dict]) -> None:
    """Losses (solid, left axis) and scores (dashed, right axis, [0, 1]) per epoch, one legend below the axes."""
    from matplotlib.ticker import MaxNLocator

    keys = sorted({k for r in epochs for k, v in r.items() if k not in SKIPPED_METRICS and
                   not k.startswith("samples_") and isinstance(v, int | float)})
    scores = [k for k in keys if "loss" not in k]
    right = ax.twinx() if scores else None
    handles = []
    for n, k in enumerate(keys):
        axis = right if k in scores else ax
        points = [(r["epoch"], r[k]) for r in epochs if k in r]
        handles += axis.plot(*zip(*points, strict=True), marker="o", markersize=3, linewidth=1, color=f"C{n % 10}",
                             linestyle="--" if k in scores else "-", label=k.removeprefix(f"{phase}_"))
    if right is not None:
        right.set_ylim(-0.02, 1.02)
        right.tick_params(labelsize=7)
        right.set_ylabel("score", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(handles=handles, fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)


def plot_run(run: dict[str, dict[str, Any]], title: str = "") -> Any:
    """The figure of ``read_run``'s result."""
    fig = new_figure(5.5 * len(run), 9)
    fig.suptitle(title, fontsize=10)
    for k, (phase, data) in enumerate(run.items()):
        ax = fig.add_subplot(2, len(run), k + 1)
        state = "finished" if data["finished"] else "running"
        ax.set_title(f"{phase} ({state}): {len(data['steps'])} optimizer steps", fontsize=9)
        if data["steps"]:
            step, loss, lr = zip(*data["steps"], strict=True)
            ax.plot(step, loss, linewidth=0.8, color="C0")
            ax.set_ylabel("loss", fontsize=8, color="C0")
            lr_ax = ax.twinx()
            lr_ax.plot(step, lr, linewidth=0.8, color="C1")
            lr_ax.set_yscale("log")
            lr_ax.set_ylabel("learning rate", fontsize=8, color="C1")
            lr_ax.tick_params(labelsize=7)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        below = fig.add_subplot(2, len(run), len(run) + k + 1)
        if data["epochs"]:
            _epoch_panel(below, phase, data["epochs"])
        else:
            below.axis("off")
            below.text(0.5, 0.5, "no epoch finished yet", ha="center", fontsize=9, transform=below.transAxes)
    fig.subplots_adjust(left=0.06, right=0.94, top=0.92, bottom=0.25, hspace=0.35, wspace=0.45)
    return fig


def write_run_plot(run_dir: str | Path, out: str | Path) -> Path:
    """Read a run folder and write its training curves as PNG."""
    return save_png(plot_run(read_run(run_dir), title=f"run {Path(run_dir).resolve().name}"), out)
