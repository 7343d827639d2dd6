"""Pure parts of the trainer: LR schedule, EMA, metrics against hand-computed cases, configuration errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from maestro_model import schedule
from maestro_model.config import ConfigError, build_config, load_config, parse_value
from maestro_model.metrics import MultilabelCounts, SegmentationCounts, multilabel_scores, segmentation_scores
from maestro_model.train import Progress, Trainer, checkpoint_order


# ------------------------------------------------------------------------------------------------ LR schedule
def test_peak_lr_official_and_paper():
    # TreeSat pretraining, Table 9: base 3e-5, global batch 96 (model-spec §8.3 gives 1.70e-4 vs 2.94e-4)
    assert schedule.peak_lr(3e-5, 96) == pytest.approx(1.697e-4, rel=1e-3)
    assert schedule.peak_lr(3e-5, 96, "paper") == pytest.approx(2.939e-4, rel=1e-3)
    with pytest.raises(ValueError, match="protocol"):
        schedule.peak_lr(1e-5, 8, "other")


@pytest.mark.parametrize(("phase", "protocol", "ratio"), [("pretrain", "official", 1e-7), ("probe", "official", 1e-7),
                                                          ("finetune", "official", 0.5), ("pretrain", "paper", 1e-4),
                                                          ("finetune", "paper", 0.5)])
def test_schedule_endpoints(phase, protocol, ratio):
    peak, total = 2e-4, 60
    final = schedule.final_factor(phase, protocol)
    lrs = [schedule.onecycle_lr(s, total, peak, final) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 1000, rel=1e-9)
    assert lrs[-1] == pytest.approx(peak * ratio, rel=1e-6)
    assert max(lrs) == pytest.approx(peak, rel=1e-12)
    assert int(np.argmax(lrs)) == 0.2 * total - 1  # 20 % warm-up


@pytest.mark.parametrize("total", [6, 10, 37, 200])
@pytest.mark.parametrize("final", [1e7, 2.0])
def test_schedule_matches_torch_onecycle(total, final):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=total, pct_start=0.2, div_factor=1000,
                                                final_div_factor=final / 1000, cycle_momentum=False)
    for step in range(total):
        assert schedule.onecycle_lr(step, total, 3e-4, final) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="outside"):
        schedule.onecycle_lr(total, total, 3e-4, final)


def test_schedule_single_warmup_step_starts_low():
    # 5 steps: torch's OneCycleLR divides by zero; ours starts at peak/1000 and still ends at the final LR
    lrs = [schedule.onecycle_lr(s, 5, 1.0, 2.0) for s in range(5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ EMA
@pytest.mark.parametrize(("epochs", "alpha"), [(100, 0.95), (10, 0.5), (50, 0.9), (15, 1 - 1 / 3), (5, 0.0), (2, 0.0)])
def test_ema_alpha_per_phase(epochs, alpha):
    assert schedule.ema_alpha(epochs) == pytest.approx(alpha)


def test_ema_update_apply_and_state():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.zero_()
    ema = schedule.EMA(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 0.75)
    ema.update(model, 0.75)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1 - 0.75**2))
    with ema.applied(model):
        assert torch.allclose(model.weight, torch.full((1, 2), 0.4375))
    assert torch.equal(model.weight, torch.ones(1, 2))  # raw weights restored
    other = schedule.EMA(torch.nn.Linear(2, 1))
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"weight": torch.zeros(1, 2)})


# ------------------------------------------------------------------------------------------------ metrics
def _logits(bits):
    return torch.tensor(bits, dtype=torch.float32) * 8 - 4  # 1 -> +4 (sigmoid > 0.5), 0 -> -4


def test_multilabel_hand_computed():
    target = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [-1, 1, 0]])  # last sample has a missing label
    pred = [[1, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 1]]
    acc = MultilabelCounts(3, missing_value=-1)
    acc.update(_logits(pred[:2]), target[:2])
    acc.update(_logits(pred[2:]), target[2:])
    assert acc.counts.tolist() == [[1, 1, 0], [1, 0, 1], [1, 0, 0], [0, 2, 2]]  # TP, FP, FN, TN per label
    s = acc.scores()
    # F1 = 0.5 (support 2), 1 (support 1), 0 (all-negative label, predicted once: support 0)
    assert s["weighted_f1"] == pytest.approx((0.5 * 2 + 1 * 1) / 3)
    assert s["average_f1"] == pytest.approx(0.5)
    assert s["overall_accuracy"] == pytest.approx(6 / 9)


def test_multilabel_absent_label_never_predicted_is_ignored():
    s = multilabel_scores(np.array([1, 0]), np.array([1, 0]), np.array([0, 0]), np.array([0, 2]))
    assert s["weighted_f1"] == pytest.approx(2 / 3) and s["average_f1"] == pytest.approx(2 / 3)  # F1 NaN skipped
    empty = multilabel_scores(np.zeros(2), np.zeros(2), np.zeros(2), np.full(2, 3))  # all-negative, all right
    assert math.isnan(empty["weighted_f1"]) and empty["overall_accuracy"] == 1.0


def test_segmentation_hand_computed():
    # 4 classes, class 3 ignored, -1 missing; class 2 absent from the targets
    target = torch.tensor([[[0, 0, 1], [1, 3, -1]]])
    pred = torch.tensor([[[0, 1, 1], [3, 0, 2]]])
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    acc = SegmentationCounts(4, missing_value=-1, ignore=(3,))
    acc.update(logits, target)
    assert acc.counts.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    s = acc.scores()
    assert s["miou"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # classes 2 (absent) and 3 (ignored) left out
    assert s["mean_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["overall_accuracy"] == pytest.approx(2 / 4)
    assert s["classes_present"] == 2


def test_segmentation_missing_value_beyond_classes_and_bad_label():
    # PASTIS-like: missing value 19 = void, outside the 19 trained classes
    c = SegmentationCounts(3, missing_value=19)
    c.update(torch.zeros(1, 3, 1, 2), torch.tensor([[[19, 0]]]))
    assert c.counts.sum() == 1
    with pytest.raises(ValueError, match=r"\[7\]"):
        c.update(torch.zeros(1, 3, 1, 1), torch.tensor([[[7]]]))
    assert math.isnan(segmentation_scores(np.zeros((3, 3)))["miou"])


# ------------------------------------------------------------------------------------------------ config
def test_config_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsed = 3\n')
    with pytest.raises(ConfigError, match=r"unknown key train\.sed .*seed, precision") as err:
        load_config(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="valid sections: data, model, train, pretrain, probe, finetune"):
        build_config({"optim": {}})
    with pytest.raises(ConfigError, match=r"pretrain\.batchsize.*batch_size"):
        build_config({}, {"pretrain.batchsize": 4})


def test_config_overrides_types_and_roundtrip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nindex = "x/index.json"\nsubset = 20\n[model.options]\nembed_dim = 40\n'
                    '[finetune]\nepochs = 3\n')
    cfg = load_config(path, {"train.seed": parse_value("7"), "probe.base_lr": parse_value("1e-4"),
                             "model.options.depth": 2, "train.output_dir": parse_value("runs/a b")})
    assert (cfg.train.seed, cfg.probe.base_lr, cfg.data.subset, cfg.finetune.epochs) == (7, 1e-4, 20, 3)
    assert cfg.pretrain.base_lr == 3e-5 and cfg.pretrain.epochs == 100  # Table 9 defaults kept
    assert cfg.model.options == {"embed_dim": 40, "depth": 2} and cfg.train.output_dir == "runs/a b"
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg
    moved = build_config({}, {"train.output_dir": "elsewhere", "data.num_workers": 0, "train.threads": 3})
    assert moved.digest() == build_config({}).digest()  # where a run writes is not part of its identity
    assert build_config({}, {"train.seed": 1}).digest() != build_config({}).digest()


@pytest.mark.parametrize(("key", "value", "match"), [("train.seed", "x", "expected int"),
                                                     ("data.subset", 0, r"percentage 1\.\.100"),
                                                     ("train.precision", "fp8", "precision"),
                                                     ("finetune.batch_size", 0, "batch_size"),
                                                     ("train.ema", 1, "expected bool"),
                                                     ("train.threads", -1, r"train\.threads: must be >= 0"),
                                                     ("seed", 1, "section.key")])
def test_config_bad_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, {key: value})


# ------------------------------------------------------------------------------------------------ checkpoint pruning
class _StubAccelerator:
    """What ``Trainer.save_checkpoint`` needs of an Accelerator, writing a marker file instead of real state."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.bin").write_text("state")


def _checkpointing_trainer(out: Path, keep: int) -> Trainer:
    tr = Trainer.__new__(Trainer)  # only the attributes save_checkpoint reads: no model, no data
    tr.cfg = build_config({}, {"train.keep_checkpoints": keep})
    tr.out, tr.acc, tr.rank, tr.world, tr.ema = out, _StubAccelerator(), 0, 1, None
    return tr


def test_pruning_keeps_the_newest_checkpoints_across_phases(tmp_path):
    tr = _checkpointing_trainer(tmp_path, keep=2)
    written = [("pretrain", 1, 2), ("pretrain", 2, 0), ("probe", 1, 0), ("finetune", 0, 3), ("finetune", 1, 0)]
    for phase, epoch, batch in written:
        tr.save_checkpoint(Progress(phase, epoch, batch))
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    # names sort finetune < pretrain < probe: pruning by name deleted fine-tuning's own checkpoints
    assert left == ["finetune-e0000-b000003", "finetune-e0001-b000000"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "finetune-e0001-b000000"


def test_checkpoint_order_is_phase_epoch_batch():
    names = ["probe-e0001-b000000", "finetune-e0000-b000010", "pretrain-e0010-b000000", "finetune-e0000-b000009",
             "pretrain-e0002-b000100", "finetune-e0001-b000000"]
    assert sorted(names, key=checkpoint_order) == [
        "pretrain-e0002-b000100", "pretrain-e0010-b000000", "probe-e0001-b000000", "finetune-e0000-b000009",
        "finetune-e0000-b000010", "finetune-e0001-b000000"]
    assert checkpoint_order("notes") is None and checkpoint_order("warmup-e0001-b000000") is None


def test_config_fold_is_refused_with_the_build_time_option(tmp_path):
    path = tmp_path / "old-run.toml"
    path.write_text("[data]\nfold = 0\n")  # as the config.toml of runs written before the key was removed
    with pytest.raises(ConfigError, match=r"data\.fold was removed: .*maestro-data build pastis-hd --fold"):
        load_config(path)
    assert "fold" not in build_config({}).to_toml()
