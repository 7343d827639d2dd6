"""The trainer as a new user meets it: any subset tier the shards hold, the start-up report, the warning when
`accelerate launch` runs fewer processes than asked, run folders that are never silently mixed, logging intervals
and deterministic mode that leave the logged numbers unchanged."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maestro_cli.train import main
from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.manifest import load_manifest
from maestro_data.synthetic import generate
from maestro_model.config import load_config
from maestro_model.train import Trainer, TrainError, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """20 TreeSatAI-TS tiles (12 train, 4 val, 4 test) built with --percents 10,50."""
    tmp = tmp_path_factory.mktemp("tiers")
    src = generate("treesatai-ts", tmp / "raw", tiles=20, seed=1)
    build_store(load_manifest("treesatai-ts"), src, tmp / "built", BuildOptions(quiet=True))
    compute_subsets(tmp / "built", (10, 50))
    write_shards(tmp / "built", tmp / "built" / "shards", ShardOptions(quiet=True))
    return tmp / "built" / "shards"


def _cfg(shards: Path, out: Path, **extra):
    return load_config(DEMO, {"data.index": str(shards), "train.output_dir": str(out), "train.quiet": True,
                              "data.num_workers": 0, **extra})


def _cli(shards: Path, out: Path, command: str, *args: str):
    return CliRunner().invoke(main, [command, "--config", str(DEMO), "--index", str(shards), "--output-dir", str(out),
                                     "--quiet", "--workers", "0", *args])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_any_tier_the_shards_hold_is_accepted_and_the_start_is_reported(shards, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="maestro.train"):
        result = train(_cfg(shards, tmp_path / "run", **{"data.subset": 50, "probe.epochs": 1}), ("probe",))
    assert result["probe"]["history"][0]["train_loss"] > 0
    assert "1 process (NO), device cpu" in caplog.text  # rank count and device, at start
    assert "probe: 1 epochs x 3 batches per rank (1 processes x 2 samples" in caplog.text
    with pytest.raises(TrainError, match=r"index\.json: data\.subset = 20, but the shards of split 'train' hold the "
                                         r"tiers 10, 50, 100 \(100 = all\)"):
        Trainer(_cfg(shards, tmp_path / "other", **{"data.subset": 20}))


def test_cli_subset_accepts_any_percentage_and_leaves_the_tier_check_to_the_shards(shards, tmp_path):
    out = tmp_path / "run"
    assert _cli(shards, out, "probe", "--subset", "50", "--show-config").exit_code == 0
    bad = _cli(shards, out, "probe", "--subset", "30", "--epochs", "1")
    assert bad.exit_code != 0 and "data.subset = 30" in bad.output and "10, 50, 100" in bad.output
    assert _cli(shards, out, "probe", "--subset", "101").exit_code != 0


def test_output_folder_of_another_run_is_refused_unless_resumed_or_overwritten(shards, tmp_path):
    out = tmp_path / "run"
    assert _cli(shards, out, "pretrain", "--epochs", "1", "--batch-size", "4").exit_code == 0
    first = _jsonl(out / "steps.jsonl")
    again = _cli(shards, out, "pretrain", "--epochs", "1", "--batch-size", "4")
    assert again.exit_code != 0 and "Traceback" not in again.output
    assert f"{out}: the output folder holds another run (pretrain/ (exported weights)" in again.output
    assert "--resume auto" in again.output and "--overwrite" in again.output
    assert _cli(shards, out, "probe", "--epochs", "1").exit_code == 0  # the next phase joins the run
    redo = _cli(shards, out, "pretrain", "--epochs", "1", "--batch-size", "4", "--overwrite")
    assert redo.exit_code == 0, redo.output
    assert _jsonl(out / "steps.jsonl") == first  # the probe records went with the replaced run
    assert not (out / "probe").exists()
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["config.toml", "metrics.json",
                                                                    "model-ema.safetensors", "model.safetensors"]
    both = _cli(shards, out, "pretrain", "--resume", "auto", "--overwrite")
    assert both.exit_code != 0 and "contradicts train.resume" in both.output


def test_log_interval_and_deterministic_mode_keep_the_logged_numbers(shards, tmp_path):
    sets = {"pretrain.epochs": 1, "probe.epochs": 0, "finetune.epochs": 1, "pretrain.batch_size": 2,
            "finetune.batch_size": 4, "train.threads": 1}
    every = train(_cfg(shards, tmp_path / "a", **sets, **{"train.log_every": 1}))
    sparse = train(_cfg(shards, tmp_path / "b", **sets, **{"train.log_every": 3, "train.deterministic": True}))
    assert not torch.are_deterministic_algorithms_enabled()  # given back to the process
    a, b = (_jsonl(tmp_path / d / "steps.jsonl") for d in ("a", "b"))
    assert a == b and len(a) == 8 + 3
    for phase in ("pretrain", "finetune"):
        ha, hb = every[phase]["history"][0], sparse[phase]["history"][0]
        assert {k: v for k, v in ha.items() if k != "samples_per_s"} == \
            {k: v for k, v in hb.items() if k != "samples_per_s"}
        losses = [r["loss"] for r in a if r["phase"] == phase]
        assert ha["train_loss"] == sum(losses) / len(losses)  # the epoch's loss is the mean of its batch losses
    assert "pretrain_loss_rec/heldin_val" in every["pretrain"]["history"][0]


def test_accelerate_launch_cpu_runs_one_process_and_the_trainer_says_so(shards, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "maestro_model.train", "pretrain", "--config",
           str(DEMO), "--index", str(shards), "--output-dir", str(tmp_path / "run"), "--quiet", "--epochs", "1",
           "--batch-size", "4", "--set", "train.trace=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes were requested" in proc.stderr and "but 1 runs" in proc.stderr
    end = _jsonl(tmp_path / "run" / "trace" / "pretrain-rank0.jsonl")[-1]
    assert end["world_size"] == 1 and not (tmp_path / "run" / "trace" / "pretrain-rank1.jsonl").exists()
