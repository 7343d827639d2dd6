"""Trainer runtime units: what each phase trains (the DDP find_unused rule), device-side loss buffering, deterministic
settings, the launch check, run-folder ownership, metric names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from maestro_data.manifest import load_manifest
from maestro_model import runtime
from maestro_model.config import PHASES
from maestro_model.flops import example_batch
from maestro_model.loss_meter import LossMeter, TrainError, Where
from maestro_model.model import build_model
from maestro_model.plots import read_run
from maestro_model.run_folder import clear_outputs, held_outputs
from maestro_model.train_loop import metric_split

TINY = dict(embed_dim=16, depth=2, heads=2, dim_head=8, mlp_ratio=2, decoder_dim=16, decoder_depth=1,
            decoder_heads=2, decoder_dim_head=8, decoder_mlp_ratio=2)


def _grads(model, batch: dict, phase: str) -> set[str]:
    model.zero_grad(set_to_none=True)
    if phase == "pretrain":
        loss = model(batch, "pretrain", generator=torch.Generator().manual_seed(0)).loss
    else:
        loss = sum(v.float().square().mean() for v in model(batch, phase).values())
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("manifest,fusion", [("treesatai-ts", "inter-group"), ("treesatai-ts", "mod"),
                                             ("flair-hub", "group")])
def test_each_phase_trains_exactly_the_parameters_that_reach_its_loss(manifest, fusion):
    """The rule behind FIND_UNUSED: with what a phase does not train frozen, every trained parameter gets a gradient,
    so DDP needs no find_unused_parameters; and nothing frozen would have got one (the rule loses no training)."""
    m = load_manifest(manifest)
    model = build_model(m, "tiny", fusion, inter_depth=1 if fusion == "inter-group" else None, **TINY)
    batch = example_batch(m, 1, "cpu", torch.Generator().manual_seed(1))
    for phase in PHASES:
        runtime.unfreeze(model)
        used = _grads(model, batch, phase)
        frozen = runtime.freeze_for(model, phase)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert used == trained and not (set(frozen) & used), (phase, sorted(used ^ trained)[:5])
        assert _grads(model, batch, phase) == trained
        assert runtime.FIND_UNUSED[phase] is False
    runtime.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_loss_meter_flush_gives_the_per_batch_means_in_order():
    acc = Accelerator(cpu=True)
    meter = LossMeter(acc, ["s2"])
    values = [0.25, 1.0 / 3.0, 7.5]
    for i, v in enumerate(values):
        meter.add(torch.tensor(v), {}, {"s2": torch.ones(2)}, Where("pretrain", 0, i, i, ("t",)))
    assert len(meter) == 3
    expected = [float(torch.tensor(v)) / acc.num_processes for v in values]  # float32 value, divided on the host
    assert meter.flush() == expected and len(meter) == 0 and meter.flush() == []


def test_loss_meter_names_the_first_nonfinite_batch_its_tiles_and_modality():
    meter = LossMeter(Accelerator(cpu=True), ["aerial", "s2"])
    meter.add(torch.tensor(1.0), {}, {"aerial": torch.ones(2), "s2": torch.ones(2)}, Where("probe", 1, 4, 2, ("a",)))
    bad = torch.tensor([1.0, float("nan")])
    meter.add(torch.tensor(float("nan")), {}, {"aerial": torch.ones(2), "s2": bad}, Where("probe", 1, 5, 2, ("b",)))
    meter.add(torch.tensor(float("inf")), {}, {"aerial": torch.ones(2), "s2": torch.ones(2)},
              Where("probe", 1, 6, 3, ("c",)))
    with pytest.raises(TrainError, match=r"probe epoch 1 optimizer step 2 \(batch 5\): non-finite loss: rank 0: loss "
                                         r"nan; non-finite input values in modality s2; tiles \['b'\]"):
        meter.flush()
    meter.add(torch.tensor(float("nan")), {"s1": torch.tensor(float("nan")), "s2": torch.tensor(0.5)},
              {"s2": torch.ones(2)}, Where("pretrain", 0, 0, 0, ("d",)))
    with pytest.raises(TrainError, match=r"non-finite loss term of modality s1 \(inputs are finite"):
        meter.flush()


def test_deterministic_sets_and_restores_the_process_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    restore = runtime.set_deterministic(True)
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    finally:
        restore()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    runtime.set_deterministic(False)()  # off: nothing changes
    assert torch.are_deterministic_algorithms_enabled() == before[0]


LAUNCH = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "--cpu", "-m",
          "maestro_model.train", "run"]


@pytest.mark.parametrize("argv,world,warns", [
    (LAUNCH, 1, True),
    ([a if a != "2" else "1" for a in LAUNCH], 1, False),
    (["/venv/bin/python", "-m", "accelerate.commands.launch", "--num_processes=4", "x.py"], 1, True),
    (["/venv/bin/python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "x.py"], 2, False),
    (["/venv/bin/accelerate", "launch", "x.py"], 1, False),  # nothing asked
])
def test_launch_warning_when_fewer_processes_run_than_asked(argv, world, warns, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    text = runtime.launch_warning(world, argv)
    assert (text is not None) == warns
    if warns:
        assert f"but {world} runs" in text and "--multi_gpu" in text and "\n" not in text


def test_launcher_command_line_is_read_only_under_accelerate(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert runtime.launcher_argv() is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert runtime.launcher_argv(pid=os.getpid()) is None  # pytest itself is no `accelerate launch`
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "3 processes were requested" in runtime.launch_warning(1, [])


def _fake_run(out: Path) -> None:
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "model.safetensors").write_bytes(b"x")
    (out / "probe").mkdir()
    (out / "probe" / "model.safetensors").write_bytes(b"x")
    for name in ("pretrain-e0002-b000000", "probe-e0001-b000000"):
        (out / "checkpoints" / name).mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("probe-e0001-b000000")
    (out / "trace").mkdir()
    for phase in ("pretrain", "probe"):
        (out / "trace" / f"{phase}-rank0.jsonl").write_text("{}\n")
    (out / "steps.jsonl").write_text("".join(json.dumps({"phase": p, "step": s, "loss": 1.0, "lr": 0.1}) + "\n"
                                             for p in ("pretrain", "probe") for s in (1, 2)))
    (out / "summary.json").write_text("{}")


def test_run_folder_outputs_of_later_phases_are_held_and_overwrite_clears_only_them(tmp_path):
    _fake_run(tmp_path)
    assert held_outputs(tmp_path, ("finetune",)) == []  # a later phase may join the run
    held = held_outputs(tmp_path, ("probe", "finetune"))
    assert held[0] == "probe/ (exported weights)" and any("checkpoints/ (1 of probe" in h for h in held)
    assert any("steps.jsonl (steps of probe)" in h for h in held) and "trace/ (per-rank step traces)" in held
    assert len(held_outputs(tmp_path, ("pretrain",))) == 5
    assert held_outputs(tmp_path / "absent", ("pretrain",)) == []
    clear_outputs(tmp_path, ("probe",))
    assert held_outputs(tmp_path, ("probe",)) == []
    assert (tmp_path / "pretrain" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "pretrain-e0002-b000000").is_dir()
    assert not (tmp_path / "checkpoints" / "latest").exists()  # it named the removed probe checkpoint
    assert {json.loads(r)["phase"] for r in (tmp_path / "steps.jsonl").read_text().splitlines()} == {"pretrain"}
    assert [f.name for f in (tmp_path / "trace").iterdir()] == ["pretrain-rank0.jsonl"]


def test_pretraining_validation_is_named_held_in_and_old_runs_plot_under_the_new_name(tmp_path):
    m = load_manifest("treesatai-ts")
    assert "val" in m.splits.pretrain  # the official protocol pretrains on train + val
    assert metric_split(m, "pretrain", "val") == "heldin_val"
    assert metric_split(m, "finetune", "val") == "val" and metric_split(m, "pretrain", "test") == "test"
    (tmp_path / "pretrain").mkdir()
    old = {"history": [{"epoch": 1, "train_loss": 1.0, "pretrain_loss_rec/val": 0.5, "samples_val": 4}]}
    (tmp_path / "pretrain" / "metrics.json").write_text(json.dumps(old))
    record = read_run(tmp_path)["pretrain"]["epochs"][0]
    assert record["pretrain_loss_rec/heldin_val"] == 0.5 and "pretrain_loss_rec/val" not in record


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                         ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312),
                                         ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
                                         ("Tesla V100-SXM2-16GB", None)])
def test_peak_bf16_flops_by_gpu_name(name, tflops):
    from maestro_model.hardware import peak_bf16_flops

    peak = peak_bf16_flops(name)
    assert (peak / 1e12 if peak else None) == tflops
