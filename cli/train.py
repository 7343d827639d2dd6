"""``maestro-train``: pretrain / probe / finetune / run (all three) from one TOML config plus overrides. Thin.

Launch on one or many processes with ``accelerate launch -m maestro_model.train run --config C.toml ...`` (or
``accelerate launch $(which maestro-train) ...``); a single process also runs it directly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from maestro_cli.common import CleanErrors
from maestro_model.config import PHASES, PRECISIONS, load_config, parse_value

COMMANDS = {"pretrain": ("pretrain",), "probe": ("probe",), "finetune": ("finetune",), "run": PHASES}


def _main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _overrides(phases: tuple[str, ...], opts: dict) -> dict:
    out: dict = {}
    simple = {"manifest": "data.manifest", "index": "data.index", "subset": "data.subset",
              "workers": "data.num_workers", "size": "model.size", "fusion": "model.fusion",
              "precision": "train.precision", "seed": "train.seed", "output_dir": "train.output_dir",
              "resume": "train.resume", "init": "train.init", "checkpoint_every": "train.checkpoint_every"}
    for name, key in simple.items():
        if opts.get(name) is not None:
            out[key] = opts[name]
    for flag, key in (("cpu", "cpu"), ("quiet", "quiet"), ("trust_checkpoint", "init_trust"),
                      ("overwrite", "overwrite"), ("deterministic", "deterministic")):
        if opts.get(flag):
            out[f"train.{key}"] = True
    for name, key in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "base_lr"),
                      ("grad_accum", "grad_accum")):
        if opts.get(name) is not None:
            out.update({f"{p}.{key}": opts[name] for p in phases})
    for item in opts.get("set") or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        out[key.strip()] = parse_value(value.strip())
    return out


def _options(f):
    opts = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     help="TOML configuration ([data], [model], [train], [pretrain], [probe], [finetune])."),
        click.option("--manifest", help="Dataset manifest: built-in name or TOML path."),
        click.option("--index", help="Shard index.json (or its folder): path or URL."),
        click.option("--subset", type=click.IntRange(1, 100),
                     help="Percent of the training split(s): 100 or any tier the shards hold (build --percents)."),
        click.option("--size", help="Model size: tiny | small | base (medium) | large."),
        click.option("--fusion", help="shared | monotemp | mod | group | inter-group."),
        click.option("--epochs", type=click.IntRange(0), help="Epochs of every phase this command runs."),
        click.option("--batch-size", type=click.IntRange(1), help="Per-device batch size of the phases run."),
        click.option("--grad-accum", type=click.IntRange(1), help="Gradient accumulation steps."),
        click.option("--lr", type=float, help="Base learning rate (Table 9) of the phases run."),
        click.option("--precision", type=click.Choice(PRECISIONS)),
        click.option("--seed", type=int),
        click.option("--workers", type=click.IntRange(0), help="Loader worker processes per rank."),
        click.option("--output-dir", help="Run folder: config, checkpoints, exported weights, metrics."),
        click.option("--resume", help="'auto' (latest checkpoint of --output-dir) or a checkpoint folder."),
        click.option("--overwrite", is_flag=True,
                     help="Replace another run's outputs of these phases in --output-dir (refused without it)."),
        click.option("--deterministic", is_flag=True,
                     help="Deterministic algorithms (train.deterministic; what it covers: README, Training)."),
        click.option("--init", help="Initial weights: official IGNF .ckpt, state dict or maestro safetensors."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Unpickle --init fully, running any code it names (only for files you trust; official "
                          "checkpoints load without it)."),
        click.option("--checkpoint-every", type=click.IntRange(0), help="Optimizer steps between checkpoints."),
        click.option("--cpu", is_flag=True, help="Train on CPU even where a GPU exists."),
        click.option("--set", "set", multiple=True, metavar="KEY=VALUE",
                     help="Any config key, e.g. --set finetune.eval_every=2 --set model.options.depth=4."),
        click.option("--show-config", is_flag=True, help="Print the resolved configuration and exit."),
        click.option("--quiet", is_flag=True, help="No progress bar, warnings only."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _run(command: str, config_path: Path | None, show_config: bool, **opts) -> None:
    phases = COMMANDS[command]
    cfg = load_config(config_path, _overrides(phases, opts))
    if show_config:
        click.echo(cfg.to_toml())
        return
    main_proc = _main_process()
    level = logging.WARNING if cfg.train.quiet or not main_proc else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from maestro_model.train import train  # torch/accelerate imported only when training

    results = train(cfg, phases)
    if not main_proc:
        return
    out = Path(cfg.train.output_dir)
    for phase, res in results.items():
        last = res["history"][-1] if res["history"] else {}
        shown = {**{k: v for k, v in last.items() if "/" in k}, **res.get("test", {})}
        click.echo(f"{phase}: {res['steps']} steps, global batch {res['global_batch']}, peak LR {res['peak_lr']:.3g}, "
                   f"{res['samples_per_s']:.1f} train samples/s")
        for k, v in shown.items():
            click.echo(f"  {k} = {v:.4f}" if isinstance(v, float) else f"  {k} = {v}")
        ema = " (+ model-ema.safetensors, the EMA that evaluated it)" if phase == "finetune" and cfg.train.ema else ""
        click.echo(f"  weights: {out / phase / 'model.safetensors'}{ema}; metrics: {out / phase / 'metrics.json'}")
    click.echo(f"outputs in {out}/ (config.toml, steps.jsonl, checkpoints/, one folder per phase)")
    (out / "summary.json").write_text(json.dumps({p: {k: v for k, v in r.items() if k != "history"}
                                                  for p, r in results.items()}, indent=1))


@click.group(cls=CleanErrors)
@click.version_option(package_name="maestro-eo")
def main() -> None:
    """Train MAESTRO with Accelerate: pretrain -> probe -> finetune (paper protocol, official defaults)."""


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
def plot(run_dir: Path, out: Path) -> None:
    """Loss and LR per step and validation metrics per epoch of RUN_DIR, one column per phase (also while the run
    is going)."""
    from maestro_model.plots import write_run_plot

    click.echo(str(write_run_plot(run_dir, out)))


for _name, _phases in COMMANDS.items():
    def _make(name: str):
        @_options
        def command(**kwargs):
            _run(name, **kwargs)
        command.__doc__ = (f"Run the {name} phase." if name != "run" else
                           "Run pretrain, probe and finetune in sequence (phases with 0 epochs are skipped).")
        return command

    main.command(_name)(_make(_name))


if __name__ == "__main__":
    main()
