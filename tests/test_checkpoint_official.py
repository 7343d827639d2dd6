"""Checkpoints as the official code writes them: PyTorch Lightning's own ModelCheckpoint around a module holding the
network as ``model`` and ``ema_model``, whose ``save_hyperparameters`` pickle a configuration dataclass of a package
(``maestro.conf.mask``) that is NOT importable where the checkpoint is read, exactly the situation of the released
IGNF files. Written in a subprocess that has that package; read here without it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from modelkit import make_batch
from safetensors.torch import load_file

from maestro_data.manifest import load_manifest
from maestro_model.checkpoint_files import read_checkpoint
from maestro_model.checkpoints import (
    CheckpointError,
    build_model_for_checkpoint,
    checkpoint_summary,
    load_weights,
    read_state_dict,
)
from maestro_model.model import build_model

pytest.importorskip("pytorch_lightning")

OFFICIAL_MASK = '''
from dataclasses import dataclass


@dataclass
class MaskConfig:
    mask_ratio: float = 0.75
    mask_scale: float = 0.0
    mask_mod: float | None = 0.25
    mask_bands: float | None = None
    mask_dates: float | None = 0.25
    mask_loc: float | None = 0.25
'''

WRITER = '''
import copy, json, sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from maestro.conf.mask import MaskConfig
from maestro_model.model import build_model

out, dataset, settings = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
with_omegaconf = settings.pop("omegaconf", False)


class SSLModule(pl.LightningModule):
    def __init__(self, mask, interpolate, fusion_mode, inter_depth, model, model_size, type_head="attentive",
                 loss="l1_norm", use_date_enc=True, use_ema=True, extra=None):
        super().__init__()
        torch.manual_seed(0)
        fusion = "inter-group" if fusion_mode == "group" and inter_depth else fusion_mode
        self.model = build_model(dataset, model_size, fusion, inter_depth=inter_depth, interpolate=interpolate,
                                 date_encoding=use_date_enc, head=type_head, loss=loss,
                                 mask_ratio=mask.mask_ratio)
        self.ema_model = copy.deepcopy(self.model) if use_ema else None
        self.save_hyperparameters()

    def training_step(self, batch, idx):
        logits = self.model(batch, "finetune")
        return sum(v.float().square().mean() for v in logits.values())

    def on_train_epoch_end(self):
        if self.ema_model is not None:
            with torch.no_grad():
                for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
                    e.lerp_(p, 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.5)


def batches():
    sys.path.insert(0, settings.pop("tests"))
    from modelkit import make_batch
    from maestro_data.manifest import load_manifest
    b = make_batch(load_manifest(dataset), 1)
    return [{k: v[0] for k, v in b.items()}]


extra = None
if with_omegaconf:
    from omegaconf import OmegaConf
    extra = OmegaConf.create({"optim": {"lr": 0.5, "betas": [0.9, 0.99]}, "name": "demo"})
data = batches()
module = SSLModule(MaskConfig(mask_ratio=settings.pop("mask_ratio", 0.75)), extra=extra, **settings)
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=out, filename="finetune-{epoch}")])
trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
save_file({k: v.contiguous() for k, v in module.model.state_dict().items()}, str(out / "expected-model.safetensors"))
if module.ema_model is not None:
    save_file({k: v.contiguous() for k, v in module.ema_model.state_dict().items()},
              str(out / "expected-ema.safetensors"))
'''

TREESAT_TINY = {"interpolate": "nearest", "fusion_mode": "group", "inter_depth": 3, "model": "mae",
                "model_size": "tiny", "type_head": "attentive", "loss": "l1_norm", "use_date_enc": True,
                "use_ema": True}


def write_official(tmp: Path, dataset: str = "treesatai-ts", **changes) -> Path:
    """Run the Lightning writer with the stand-in official package importable; return the .ckpt it wrote."""
    pkg = tmp / "official" / "maestro" / "conf"
    pkg.mkdir(parents=True)
    for folder in (pkg.parent, pkg):
        (folder / "__init__.py").write_text("")
    (pkg / "mask.py").write_text(textwrap.dedent(OFFICIAL_MASK))
    (tmp / "writer.py").write_text(WRITER)
    out = tmp / "checkpoints"
    settings = {**TREESAT_TINY, **changes, "tests": str(Path(__file__).parent)}
    env = {**os.environ, "PYTHONPATH": str(tmp / "official")}
    run = subprocess.run([sys.executable, str(tmp / "writer.py"), str(out), dataset, json.dumps(settings)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "finetune-epoch=0.ckpt"


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    return write_official(tmp_path_factory.mktemp("official"), omegaconf=_has_omegaconf())


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def _same(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == expected.keys() and all(torch.equal(own[k], v) for k, v in expected.items())


def test_the_official_package_is_not_importable_here():
    with pytest.raises(ImportError):
        __import__("maestro.conf.mask")


def test_lightning_checkpoint_loads_without_running_its_pickles(official):
    ckpt = read_checkpoint(official)
    assert ckpt.kind == "lightning" and ckpt.prefixes == {"model", "ema_model"}
    assert ckpt.hparams["mask"]["mask_ratio"] == 0.75 and ckpt.hparams["use_date_enc"] is True
    assert ckpt.info["epoch"] == 0 and ckpt.info["global_step"] == 1
    if "extra" in ckpt.hparams and ckpt.hparams["extra"] is not None:  # omegaconf present where it was written
        assert ckpt.hparams["extra"] == {"optim": {"lr": 0.5, "betas": [0.9, 0.99]}, "name": "demo"}
    model = build_model_for_checkpoint(ckpt, "treesatai-ts")
    assert (model.config.size, model.config.fusion, model.config.inter_depth) == ("tiny", "inter-group", 3)
    load_weights(model, official)
    assert _same(model, load_file(official.parent / "expected-model.safetensors"))
    load_weights(model, official, which="ema_model")
    assert _same(model, load_file(official.parent / "expected-ema.safetensors"))


def test_trusted_unpickling_fails_cleanly_without_the_official_package(official):
    with pytest.raises(CheckpointError, match=r"cannot read the checkpoint even as trusted: ModuleNotFoundError"):
        read_checkpoint(official, trusted=True)


def test_info_summary_names_what_the_weights_cover(official):
    summary = checkpoint_summary(read_checkpoint(official))
    assert summary["networks"] == ["ema_model", "model"] and summary["has_ema"]
    assert summary["modalities"] == ["aerial", "s1_asc", "s1_des", "s2"]
    assert summary["encoders"] == ["aerial", "s1", "s2"] and summary["inter_group_blocks"]
    assert summary["settings"]["size"] == "tiny" and summary["heads"] == ["treesat_mlc_thresh"]
    model = build_model_for_checkpoint(read_checkpoint(official), "treesatai-ts")
    assert summary["parameters"] == sum(v.numel() for v in model.state_dict().values())


def test_date_encoding_setting_is_used_and_a_mismatch_is_refused(tmp_path, caplog):
    path = write_official(tmp_path, use_date_enc=False, inter_depth=0)
    with_dates = build_model("treesatai-ts", "tiny", "group")
    with pytest.raises(CheckpointError, match=r"date_encoding: checkpoint False, model True"):
        load_weights(with_dates, path)
    with caplog.at_level(logging.WARNING):
        load_weights(with_dates, path, settings="warn")
    assert "date_encoding: checkpoint False, model True" in caplog.text
    right = build_model_for_checkpoint(path, "treesatai-ts")
    assert right.config.date_encoding is False and right.config.fusion == "group"
    load_weights(right, path)
    batch = make_batch(load_manifest("treesatai-ts"), 2, seed=3)
    shifted = {**batch, "s2_dates": batch["s2_dates"].clone()}
    shifted["s2_dates"][..., 1] = (shifted["s2_dates"][..., 1] + 40).clamp(max=365)
    right.eval()
    with torch.no_grad():  # without date encodings the dates cannot change the output
        a, b = right(batch, "finetune"), right(shifted, "finetune")
        assert torch.equal(a["treesat_mlc_thresh"], b["treesat_mlc_thresh"])
        with_dates.eval()
        c, d = with_dates(batch, "finetune"), with_dates(shifted, "finetune")
        assert not torch.equal(c["treesat_mlc_thresh"], d["treesat_mlc_thresh"])


def test_ema_is_never_silently_replaced_by_the_raw_weights(tmp_path, official):
    model = build_model_for_checkpoint(official, "treesatai-ts")
    bare = tmp_path / "bare.pth"
    torch.save(read_state_dict(official), bare)
    load_weights(model, bare)
    with pytest.raises(CheckpointError, match=r"bare.pth: no 'ema_model.' weights .*bare weights, no EMA copy"):
        load_weights(model, bare, which="ema_model")


def test_bare_and_safetensors_variants_load_through_the_same_function(tmp_path, official):
    from safetensors.torch import save_file

    raw = read_state_dict(official)
    save_file({f"model.{k}": v.contiguous() for k, v in raw.items()}, str(tmp_path / "prefixed.safetensors"))
    save_file({k: v.contiguous() for k, v in raw.items()}, str(tmp_path / "plain.safetensors"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in raw.items()}}, tmp_path / "wrapped.bin")
    for name in ("prefixed.safetensors", "plain.safetensors", "wrapped.bin"):
        model = build_model("treesatai-ts", "tiny", "inter-group")
        load_weights(model, tmp_path / name)
        assert _same(model, raw), name


def test_small_checkpoint_into_a_tiny_model_is_refused_unless_forced(tmp_path):
    path = write_official(tmp_path, model_size="small", use_ema=False)
    tiny = build_model("treesatai-ts", "tiny", "inter-group")
    with pytest.raises(CheckpointError, match=r"size: checkpoint 'small', model 'tiny'"):
        load_weights(tiny, path, strict=False)
    with pytest.raises(CheckpointError, match=r"partial load refused, \d+ encoder tensors of the shared modalities"):
        load_weights(tiny, path, strict=False, settings="ignore")
    report = load_weights(tiny, path, strict=False, settings="ignore", force=True)
    assert report.mismatched and report.loaded < 60


def test_model_info_prints_settings_and_coverage(official):
    from click.testing import CliRunner

    from maestro_cli.model import main

    result = CliRunner().invoke(main, ["info", "--checkpoint", str(official), "--dataset", "treesatai-ts"])
    assert result.exit_code == 0, result.output
    assert "lightning checkpoint, networks ema_model, model (EMA copy included)" in result.output
    assert "settings: size='tiny', fusion='inter-group', inter_depth=3, head='attentive'" in result.output
    assert "encoders (fusion groups): aerial, s1, s2 + shared inter-group blocks" in result.output
    assert "into a treesatai-ts model: fits strictly" in result.output
    as_json = json.loads(CliRunner().invoke(main, ["info", "--checkpoint", str(official), "--json"]).output)
    assert as_json["hyper_parameters"]["mask"]["mask_loc"] == 0.25
    flair = CliRunner().invoke(main, ["info", "--checkpoint", str(official), "--dataset", "flair-hub"])
    assert "into a flair-hub model: partial" in flair.output and "newly initialised" in flair.output
