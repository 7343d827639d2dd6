"""End-to-end trainer: 2-process CPU run, kill-and-resume equality, bad inputs, learning sanity.

Shards come from the synthetic real-layout TreeSatAI-TS (and, for learning, its variant whose labels follow the
S2 temporal pattern); the model is the tiny demo configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from maestro_data.build.pipeline import BuildOptions, build_store, compute_subsets
from maestro_data.build.shards import ShardOptions, write_shards
from maestro_data.errors import ShardError
from maestro_data.manifest import load_manifest
from maestro_data.synthetic import generate, temporal_labels
from maestro_model import train_loop
from maestro_model.checkpoints import CheckpointError, load_model
from maestro_model.config import load_config
from maestro_model.model import build_model
from maestro_model.train import Trainer, TrainError, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"
PY = sys.executable


def _build(src: Path, out: Path, manifest) -> Path:
    build_store(manifest, src, out, BuildOptions(quiet=True))
    compute_subsets(out)
    write_shards(out, out / "shards", ShardOptions(quiet=True))
    return out / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """20 tiles: 12 train, 4 val, 4 test."""
    tmp = tmp_path_factory.mktemp("treesat")
    return _build(generate("treesatai-ts", tmp / "raw", tiles=20, seed=1), tmp / "built", load_manifest("treesatai-ts"))


def _overrides(shards: Path, out: Path, **extra) -> dict:
    return {"data.index": str(shards), "train.output_dir": str(out), "train.quiet": True, "data.num_workers": 0,
            **extra}


def _cli_args(shards: Path, out: Path, *sets: str) -> list[str]:
    args = ["run", "--config", str(DEMO), "--index", str(shards), "--output-dir", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    return args


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


# ------------------------------------------------------------------------------------------------ 2 processes
def test_two_process_run_identical_weights_and_exact_coverage(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "maestro_model.train",
           *_cli_args(shards, out, "train.trace=true", "pretrain.epochs=1", "probe.epochs=1", "finetune.epochs=1",
                      "pretrain.batch_size=2", "probe.batch_size=2", "finetune.batch_size=2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetune_treesat_mlc_thresh/weighted_f1_test" in proc.stdout
    split_tiles = {"pretrain": 16, "probe": 12, "finetune": 12}
    for phase, count in split_tiles.items():
        ranks = [_jsonl(out / "trace" / f"{phase}-rank{r}.jsonl") for r in (0, 1)]
        ends = [r[-1] for r in ranks]
        assert [e["world_size"] for e in ends] == [2, 2]  # two real gloo ranks, not one process
        assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]
        tiles = [t for r in ranks for rec in r if "tiles" in rec for t in rec["tiles"]]
        assert len(tiles) == len(set(tiles)) == count  # every tile once per epoch across ranks
    for phase in ("probe", "finetune"):
        metrics = json.loads((out / phase / "metrics.json").read_text())
        assert metrics["test"]["samples_test"] == 4  # each test sample counted exactly once over both ranks
        assert metrics["history"][-1]["samples_val"] == 4
    model = load_model(out / "finetune" / "model.safetensors")
    assert model.config.embed_dim == 24
    for phase in ("pretrain", "probe", "finetune"):  # one weights file per phase, plus the EMA's
        assert sorted(p.name for p in (out / phase).glob("*.safetensors")) == ["model-ema.safetensors",
                                                                              "model.safetensors"]


# ------------------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def resumed(shards, tmp_path_factory) -> dict:
    """An uninterrupted run and one killed after 7 optimizer steps (last checkpoint mid-epoch at step 6), resumed.
    All three processes compute with one intra-op thread: CPU sums split per thread, and bit-exactness needs one
    split (pytest's own count would differ from the killed subprocess's OMP_NUM_THREADS=1)."""
    tmp = tmp_path_factory.mktemp("resume")
    sets = {"pretrain.epochs": 2, "probe.epochs": 0, "finetune.epochs": 1, "train.checkpoint_every": 3,
            "train.trace": True, "pretrain.batch_size": 4, "finetune.batch_size": 4,  # 4 + 4 + 3 steps
            "train.threads": 1}
    full, killed = tmp / "full", tmp / "killed"
    threads = torch.get_num_threads()
    train(load_config(DEMO, _overrides(shards, full, **sets)))
    assert torch.get_num_threads() == threads  # the trainer gives the process its thread count back
    cmd = [PY, "-m", "maestro_model.train", *_cli_args(shards, killed, *(f"{k}={str(v).lower()}"
                                                                            for k, v in sets.items()),
                                                        "train.exit_after_steps=7")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == train_loop.EXIT_PREEMPTED, proc.stderr[-3000:]
    assert (killed / "checkpoints" / "latest").read_text() == "pretrain-e0001-b000002"
    train(load_config(DEMO, _overrides(shards, killed, **sets, **{"train.resume": "auto"})))
    return {"full": full, "killed": killed, "sets": sets, "shards": shards}


def _last_per_key(records: list[dict], key) -> dict:
    return {key(r): r for r in records}


def test_kill_and_resume_reproduces_the_uninterrupted_run(resumed):
    full, killed = resumed["full"], resumed["killed"]
    steps = lambda d: _last_per_key(_jsonl(d / "steps.jsonl"), lambda r: (r["phase"], r["step"]))  # noqa: E731
    a, b = steps(full), steps(killed)
    assert list(a) == list(b) and len(a) == 8 + 3
    assert all(a[k]["lr"] == b[k]["lr"] for k in a)
    assert [b[k]["loss"] for k in a] == [a[k]["loss"] for k in a]  # bit for bit, before and after the kill
    logged = _jsonl(killed / "steps.jsonl")  # step 7 was logged by the killed process and again after resuming
    assert len(logged) == len(b) + 1 and all(r == b[(r["phase"], r["step"])] for r in logged)
    trace = lambda d, p: _last_per_key([r for r in _jsonl(d / "trace" / f"{p}-rank0.jsonl") if "tiles" in r],  # noqa: E731
                                       lambda r: (r["epoch"], r["batch"]))
    for phase in ("pretrain", "finetune"):
        ta, tb = trace(full, phase), trace(killed, phase)
        assert {k: v["tiles"] for k, v in ta.items()} == {k: v["tiles"] for k, v in tb.items()}
        for epoch in {k[0] for k in ta}:  # no tile repeated or skipped within an epoch
            tiles = [t for k, v in tb.items() if k[0] == epoch for t in v["tiles"]]
            assert len(tiles) == len(set(tiles))
    for phase in ("pretrain", "finetune"):
        for name in ("model.safetensors", "model-ema.safetensors"):
            wa, wb = load_file(full / phase / name), load_file(killed / phase / name)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (phase, name)
        ends = [_jsonl(d / "trace" / f"{phase}-rank0.jsonl")[-1]["weights_sha256"] for d in (full, killed)]
        assert ends[0] == ends[1]
        ma, mb = (_speedless(d / phase / "metrics.json") for d in (full, killed))
        # NaN-aware exact equality; the killed epoch's train_loss includes the losses from before the kill
        assert json.dumps(mb, sort_keys=True) == json.dumps(ma, sort_keys=True), phase


def _speedless(path: Path) -> dict:
    """A metrics.json without its wall-clock speeds, the only numbers a resumed run may change."""
    m = json.loads(path.read_text())
    m.pop("samples_per_s")
    for record in m["history"]:
        record.pop("samples_per_s")
    return m


def test_resume_at_an_epoch_end_keeps_history_and_weights(resumed, tmp_path):
    full, ckpt = resumed["full"], resumed["killed"] / "checkpoints" / "pretrain-e0002-b000000"
    sets = {**resumed["sets"], "train.resume": str(ckpt)}  # pretrain done, fine-tuning not begun
    train(load_config(DEMO, _overrides(resumed["shards"], tmp_path, **sets)))
    for phase in ("pretrain", "finetune"):
        assert json.dumps(_speedless(tmp_path / phase / "metrics.json"), sort_keys=True) == \
            json.dumps(_speedless(full / phase / "metrics.json"), sort_keys=True), phase
    wa, wb = load_file(full / "finetune" / "model.safetensors"), load_file(tmp_path / "finetune" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_killed_loader_worker_stops_training_with_its_name_and_the_resume_is_exact(resumed, tmp_path, monkeypatch):
    from maestro_data.errors import StreamError
    from maestro_model import train as train_module

    out, sets = tmp_path / "run", {**resumed["sets"], "data.num_workers": 1}
    made, seen = [], []
    real_loader, real_inputs = train_module.Trainer.loader, train_loop.model_inputs
    monkeypatch.setattr(train_module.Trainer, "loader", lambda tr, *a: made.append(real_loader(tr, *a)) or made[-1])

    def killing(batch, manifest, device, keep=None):
        seen.append(keep is None)
        if seen.count(True) == 2 and keep is None:  # mid-epoch 0 of pre-training, its worker building epoch 1
            os.kill(made[0].worker_pids[0], signal.SIGKILL)
        return real_inputs(batch, manifest, device, keep)

    monkeypatch.setattr(train_loop, "model_inputs", killing)
    with pytest.raises(StreamError, match=r"loader worker 0 \(pid \d+\) was killed by SIGKILL"):
        train(load_config(DEMO, _overrides(resumed["shards"], out, **sets)))
    assert all(loader.worker_pids == [] for loader in made)  # the failed phase closed every loader
    monkeypatch.undo()
    train(load_config(DEMO, _overrides(resumed["shards"], out, **sets, **{"train.resume": "auto"})))
    steps = lambda d: _last_per_key(_jsonl(d / "steps.jsonl"), lambda r: (r["phase"], r["step"]))  # noqa: E731
    assert steps(out) == steps(resumed["full"])  # every loss and learning rate, bit for bit
    for phase in ("pretrain", "finetune"):
        wa, wb = (load_file(d / phase / "model.safetensors") for d in (resumed["full"], out))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), phase


def test_resume_with_another_thread_count_warns(resumed, caplog):
    killed = resumed["killed"]
    latest = killed / "checkpoints" / (killed / "checkpoints" / "latest").read_text()
    assert json.loads((latest / "trainer_state_rank0.json").read_text())["threads"] == 1
    sets = {**resumed["sets"], "train.threads": 2, "train.resume": "auto"}  # a run-only key: accepted
    tr = Trainer(load_config(DEMO, _overrides(resumed["shards"], killed, **sets)))
    with caplog.at_level("WARNING", logger="maestro.train"):
        tr.load_checkpoint("auto")
    assert "written with 1 intra-op threads, resuming with 2" in caplog.text and "train.threads=1" in caplog.text


def test_resume_from_another_configuration_is_refused(resumed):
    sets = {**resumed["sets"], "train.seed": 7, "train.resume": "auto"}
    with pytest.raises(TrainError, match=r"another configuration \(train\.seed: checkpoint 42 vs run 7\)"):
        Trainer(load_config(DEMO, _overrides(resumed["shards"], resumed["killed"], **sets))).run()


def test_probe_starts_from_the_pretrain_export(resumed, tmp_path):
    shutil.copytree(resumed["full"] / "pretrain", tmp_path / "pretrain")  # a run folder after `maestro-train pretrain`
    cfg = load_config(DEMO, _overrides(resumed["shards"], tmp_path, **{"probe.epochs": 1}))
    tr = Trainer(cfg, ("probe",))
    saved = load_file(tmp_path / "pretrain" / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in tr.raw.state_dict().items())


# ------------------------------------------------------------------------------------------------ bad inputs
def test_shards_of_another_manifest_are_refused(shards, tmp_path):
    cfg = load_config(DEMO, _overrides(shards, tmp_path, **{"data.manifest": "flair-hub"}))
    with pytest.raises(ShardError, match="built from manifest 'treesatai-ts'"):
        Trainer(cfg)


def test_eval_batch_larger_than_a_rank_share_is_refused(shards, tmp_path):
    cfg = load_config(DEMO, _overrides(shards, tmp_path, **{"finetune.batch_size": 5, "finetune.epochs": 1}))
    with pytest.raises(TrainError, match=r"val: batch size 5 per device exceeds .*4 samples / 1 processes"):
        train(cfg, ("finetune",))


def test_nan_loss_names_step_tiles_and_modality(shards, tmp_path, monkeypatch):
    real = train_loop.model_inputs
    calls = []

    def poisoned(batch, manifest, device, keep=None):
        inputs = real(batch, manifest, device, keep)
        calls.append(1)
        if keep is None and len(calls) == 2:  # the second training batch
            inputs["s2"] = inputs["s2"].clone()
            inputs["s2"][0, 3] = float("nan")
        return inputs

    monkeypatch.setattr(train_loop, "model_inputs", poisoned)
    cfg = load_config(DEMO, _overrides(shards, tmp_path, **{"pretrain.epochs": 1}))
    with pytest.raises(TrainError, match=r"pretrain epoch 0 optimizer step 1 .*non-finite.*modality s2.*tiles \['"):
        train(cfg, ("pretrain",))


def test_cli_unknown_key_lists_valid_keys_and_exits_nonzero(tmp_path):
    from maestro_cli.train import main

    result = CliRunner().invoke(main, ["probe", "--config", str(DEMO), "--set", "probe.epoch=3"])
    assert result.exit_code != 0
    assert "unknown key probe.epoch" in result.output and "epochs, base_lr, batch_size" in result.output


def test_finetune_from_an_official_lightning_checkpoint(shards, tmp_path):
    cfg = load_config(DEMO, _overrides(shards, tmp_path / "out", **{"finetune.epochs": 1}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        donor = build_model(load_manifest("treesatai-ts"), "tiny", "inter-group", inter_depth=1,
                            **cfg.model.options)
    state = {f"{p}.{k}": v for p in ("model", "ema_model") for k, v in donor.state_dict().items()}
    ckpt = tmp_path / "official.ckpt"
    torch.save({"state_dict": state, "epoch": 99}, ckpt)
    tr = Trainer(load_config(DEMO, _overrides(shards, tmp_path / "out", **{"finetune.epochs": 1,
                                                                            "train.init": str(ckpt)})), ("finetune",))
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in tr.raw.state_dict().items())
    assert all(torch.equal(tr.ema.shadow[k], v) for k, v in donor.named_parameters())


# ------------------------------------------------------------------------------------------------ learning
def test_finetuning_after_pretraining_learns_the_s2_temporal_pattern(tmp_path):
    manifest_path = tmp_path / "treesatai-ts-sentinel.toml"
    manifest_path.write_text(temporal_labels.sentinel_only_manifest())
    manifest = load_manifest(manifest_path)
    root, _ = temporal_labels.generate(tmp_path / "raw", tiles=48, seed=0)
    index = _build(root, tmp_path / "built", manifest)
    sets = {"data.manifest": str(manifest_path), "pretrain.epochs": 2, "probe.epochs": 2, "finetune.epochs": 30,
            "pretrain.batch_size": 4, "probe.batch_size": 4, "finetune.batch_size": 4, "pretrain.base_lr": 1e-3,
            "finetune.base_lr": 3e-3, "pretrain.eval_every": 0, "probe.eval_every": 0,
            "finetune.eval_every": 0, "train.checkpoint_every": 0}
    result = train(load_config(DEMO, _overrides(index, tmp_path / "out", **sets)))
    test = result["finetune"]["test"]
    # one of two genera per tile, set by the date of the S2 green peak: predicting both scores 2/3, chance 1/2
    assert test["finetune_treesat_mlc_thresh/weighted_f1_test"] >= 0.9, test
    assert test["finetune_loss_pred/test"] < result["probe"]["test"]["probe_loss_pred/test"]


def test_index_opened_once_and_each_loader_built_once_per_phase(shards, tmp_path, monkeypatch):
    from maestro_model import train as train_module

    opened, tables = [], []
    real_open, real_table = train_module.open_index, train_module.load_table
    monkeypatch.setattr(train_module, "open_index", lambda loc, *a: opened.append(loc) or real_open(loc, *a))
    monkeypatch.setattr(train_module, "load_table", lambda *a: tables.append(a[3]) or real_table(*a))
    cfg = load_config(DEMO, _overrides(shards, tmp_path, **{"finetune.epochs": 2, "finetune.batch_size": 4}))
    history = train(cfg, ("finetune",))["finetune"]["history"]
    assert [r["samples_val"] for r in history] == [4, 4]  # the reused val loader yields every sample each epoch
    assert len(opened) == 1 and tables == ["train", "val", "test"]


# ------------------------------------------------------------------------------------------------ --init transfer
@pytest.mark.parametrize("init_ema", ["checkpoint", "restart"])
def test_init_transfers_the_encoder_and_restores_the_checkpoints_ema(shards, tmp_path, init_ema):
    """FLAIR-HUB weights (model + ema_model, as an official file) -> the TreeSatAI-TS recipe variant."""
    demo = load_config(DEMO, {})
    kw = dict(inter_depth=demo.model.inter_depth, **demo.model.options)
    torch.manual_seed(3)
    raw = build_model("flair-hub", demo.model.size, demo.model.fusion, **kw).state_dict()
    torch.manual_seed(4)
    ema = build_model("flair-hub", demo.model.size, demo.model.fusion, **kw).state_dict()
    path = tmp_path / "pretrain-epoch=99.ckpt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in raw.items()},
                               **{f"ema_model.{k}": v for k, v in ema.items()}}, "epoch": 99}, path)
    over = _overrides(shards, tmp_path / "run", **{"data.manifest": "treesatai-ts-from-flair-hub",
                                                    "train.init": str(path), "train.init_strict": False,
                                                    "train.init_ema": init_ema})
    trainer = Trainer(load_config(DEMO, over), ("probe",))
    own = trainer.raw.state_dict()
    key = "patch_embed.aerial.patchify_bands.0.conv.weight"
    assert torch.equal(own[key], raw[key]) and torch.equal(own["encoder_inter.norm.weight"],
                                                            raw["encoder_inter.norm.weight"])
    expected = ema if init_ema == "checkpoint" else raw
    assert torch.equal(trainer.ema.shadow[key], expected[key])
    head = "heads.treesat_mlc_thresh.linear.weight"  # not in the file: the EMA starts from the new head
    assert torch.equal(trainer.ema.shadow[head], own[head])
    with pytest.raises(CheckpointError, match=r"partial load refused.*patch_embed\.aerial"):
        Trainer(load_config(DEMO, {**over, "data.manifest": "treesatai-ts"}), ("probe",))
