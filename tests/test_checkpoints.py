"""Checkpoints: official Lightning layout (model. / ema_model.), bare state dicts, our safetensors format; a checkpoint
of another dataset, size or fusion mode fails with a key report and leaves the model untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ORACLE, ORACLE_CASES, require
from modelkit import TINY

from maestro_model.checkpoints import CheckpointError, load_model, load_weights, read_state_dict, save_model
from maestro_model.model import DIM_KEYS, build_model


def tiny(dataset: str = "treesatai-ts", fusion: str = "group", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(dataset, "tiny", fusion, **{**TINY, **kw})


def lightning(model_sd: dict, ema_sd: dict) -> dict:
    """An official SSLModule checkpoint: the network as model.* and its EMA copy as ema_model.*, plus training state."""
    state = {f"model.{k}": v for k, v in model_sd.items()} | {f"ema_model.{k}": v for k, v in ema_sd.items()}
    return {"state_dict": state, "epoch": 99, "global_step": 1234, "pytorch-lightning_version": "2.5.1",
            "hyper_parameters": {"loss": "l1_norm"}, "optimizer_states": [], "lr_schedulers": []}


class NotAWeight:
    """Anything that a weights-only unpickler refuses."""


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lightning_checkpoint_picks_model_or_ema(tmp_path):
    raw, ema = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "pretrain-epoch=99.ckpt"
    torch.save(lightning(raw.state_dict(), ema.state_dict()), path)
    target = tiny(seed=3)
    report = load_weights(target, path)
    assert report.ok and _same(target, raw)
    load_weights(target, path, which="ema_model")
    assert _same(target, ema)
    with pytest.raises(CheckpointError, match="which"):
        load_weights(target, path, which="teacher")


def test_bare_state_dict_file_and_object(tmp_path):
    src, dst = tiny(seed=1), tiny(seed=2)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    load_weights(dst, tmp_path / "bare.pt")
    assert _same(src, dst)
    with pytest.raises(CheckpointError, match="no 'ema_model.' weights"):
        read_state_dict(lightning(src.state_dict(), {}) | {"state_dict": {f"model.{k}": v for k, v in
                                                                           src.state_dict().items()}},
                        which="ema_model")


FOREIGN = {
    "other dataset": (lambda: tiny("pastis-hd"), r"missing in checkpoint.*aerial.*\n.*unexpected in checkpoint.*spot"),
    "inter-group": (lambda: tiny(fusion="inter-group", inter_depth=1), r"unexpected in checkpoint.*encoder_inter\.\*"),
    "mod": (lambda: tiny(fusion="mod"),
            r"missing in checkpoint.*encoder\.s1\.\*.*\n.*unexpected in checkpoint.*encoder\.s1_asc"),
    "other width": (lambda: tiny(embed_dim=32), r"skipped for shape \(\d+\): .*checkpoint \[64\] vs model \[48\]"),
}


@pytest.mark.parametrize(("other", "expected"), FOREIGN.values(), ids=FOREIGN.keys())
def test_foreign_checkpoints_fail_with_a_key_report_and_no_partial_load(tmp_path, other, expected):
    path = tmp_path / "other.ckpt"
    source = other()
    torch.save(lightning(source.state_dict(), source.state_dict()), path)
    model = tiny(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=expected) as err:
        load_weights(model, path)
    assert "treesatai-ts" in str(err.value) and str(path) in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_strict_transfer_excluding_heads_loads_the_rest():
    src = tiny("flair-hub", decoder_dim=24)
    model = tiny("flair-hub", seed=9, decoder_dim=24)
    state = {k.replace("heads.cosia", "heads.other"): v for k, v in src.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_weights(model, state)
    report = load_weights(model, state, exclude=("heads.",))
    assert report.ok
    assert torch.equal(model.encoder["s1"].norm.weight, src.encoder["s1"].norm.weight)
    other = tiny("treesatai-ts", decoder_dim=24).state_dict()  # aerial patches of 20 px, not FLAIR-HUB's 16
    with pytest.raises(CheckpointError, match=r"partial load refused, \d+ encoder tensors .*patch_embed\.aerial"):
        load_weights(model, other, strict=False)
    report = load_weights(model, other, strict=False, force=True)
    assert report.missing and report.unexpected and report.loaded > 0


def test_untrusted_pickles_are_refused_with_a_hint(tmp_path):
    path = tmp_path / "weird.ckpt"
    torch.save({"state_dict": tiny().state_dict(), "config": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match=r"weird.ckpt: the checkpoint pickles test_checkpoints.NotAWeight, "
                                              r"which is neither .*trusted=True"):
        load_weights(tiny(), path)
    load_weights(tiny(), path, trusted=True)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_weights(tiny(), tmp_path / "absent.ckpt")


def test_own_format_round_trip(tmp_path):
    model = tiny(fusion="inter-group", inter_depth=1, multispectral="token", trim="random", loss="l2_norm")
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    again = load_model(path)
    assert again.config == model.config and again.manifest.sha256 == model.manifest.sha256
    assert _same(model, again)
    load_weights(tiny(fusion="inter-group", inter_depth=1, multispectral="token", seed=4), path)
    with pytest.raises(CheckpointError, match=r"recorded settings differ.*\n  fusion: checkpoint 'inter-group', "
                                              r"model 'group'\n  inter_depth: checkpoint 1, model 0\n  multispectral"):
        load_weights(tiny(), path)
    with pytest.raises(CheckpointError, match="skipped for shape|missing"):
        load_weights(tiny(), path, settings="ignore")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a maestro-model checkpoint"):
        load_model(tmp_path / "plain.pt")


@pytest.mark.parametrize("case", [c for c in ("treesat_intergroup", "flair_intergroup_seg") if c in ORACLE_CASES])
def test_official_oracle_weights_as_lightning_checkpoint(tmp_path, case):
    case_dir = require(ORACLE) / case
    cfg = json.loads((case_dir / "config.json").read_text())["model"]
    dataset = {"treesat_intergroup": "treesatai-ts", "flair_intergroup_seg": "flair-hub"}[case]
    dims = {k: cfg[k] for k in DIM_KEYS}
    with np.load(case_dir / "weights.npz") as w:
        weights = {k: torch.from_numpy(w[k]) for k in w.files}
    keys = [line.split("\t")[0] for line in (case_dir / "keys.tsv").read_text().splitlines()[1:]]
    assert sorted(keys) == sorted(weights)
    path = tmp_path / "finetune-epoch=49.ckpt"
    torch.save(lightning({k: torch.zeros_like(v) for k, v in weights.items()}, weights), path)
    model = build_model(dataset, "tiny", "inter-group", inter_depth=cfg["inter_depth"], **dims)
    load_weights(model, path, which="ema_model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    group = build_model(dataset, "tiny", "group", **dims)
    with pytest.raises(CheckpointError, match=r"encoder_inter\.\* \(\d+\)"):
        load_weights(group, path, which="ema_model")


def test_corrupt_safetensors_file_is_a_checkpoint_error(tmp_path):
    from maestro_model.checkpoints import CheckpointError, load_weights

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors: not a readable safetensors file"):
        load_weights(tiny("treesatai-ts"), bad)
