"""The official cross-dataset recipe: a FLAIR-HUB (or S2-NAIP) pre-trained encoder on TreeSatAI-TS, with the model
resizing the aerial input to 240 px / 16 px patches and S1 orbits sharing one embedding (manifest variants)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import RESIZE_ORACLE, require
from modelkit import make_batch

from maestro_data.errors import ManifestError
from maestro_data.manifest import load_manifest, parse_manifest
from maestro_model.checkpoints import CheckpointError, load_weights, required_keys
from maestro_model.model import build_model, resize_and_rescale


def test_variants_keep_the_stored_data_and_change_only_the_model():
    base = load_manifest("treesatai-ts")
    for name in ("treesatai-ts-from-flair-hub", "treesatai-ts-from-s2-naip"):
        variant = load_manifest(name)
        assert variant.storage_sha256 == base.storage_sha256 and variant.sha256 != base.sha256
        aerial = variant.modalities["aerial"]
        assert (aerial.image_size, aerial.model_size, aerial.patch_size, aerial.grid_size) == (300, 240, 16, 15)
    naip = build_model("treesatai-ts-from-s2-naip", "tiny", "inter-group")
    assert sorted(naip.patch_embed) == sorted(naip.embed_to_rec) == ["aerial", "s1", "s2"]
    assert sorted(naip.mask_token) == ["aerial", "s1_asc", "s1_des", "s2"]  # mask tokens stay per modality


def test_flair_hub_encoder_loads_completely_only_with_the_recipe():
    torch.manual_seed(1)
    flair = build_model("flair-hub", "tiny", "inter-group").state_dict()
    plain = build_model("treesatai-ts", "tiny", "inter-group")
    with pytest.raises(CheckpointError, match=r"partial load refused, \d+ encoder tensors .*patch_embed\.aerial"):
        load_weights(plain, flair, strict=False)
    recipe = build_model("treesatai-ts-from-flair-hub", "tiny", "inter-group")
    report = load_weights(recipe, flair, strict=False)
    needed = required_keys(recipe, flair)
    assert {k.split(".")[0] for k in needed} == {"patch_embed", "encoder", "encoder_inter"}
    assert set(needed) <= set(report.loaded_keys)
    own = recipe.state_dict()
    assert all(torch.equal(own[k], flair[k]) for k in needed)
    assert any(k.startswith("heads.") for k in report.missing)  # TreeSatAI-TS head: newly initialised


def test_resized_model_runs_on_the_stored_300px_batches():
    model = build_model("treesatai-ts-from-s2-naip", "tiny", "group", embed_dim=24, depth=2, heads=2, dim_head=8,
                        decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_dim_head=8)
    batch = make_batch(load_manifest("treesatai-ts"), 2)
    assert batch["aerial"].shape[-1] == 300
    out = model(batch, "pretrain", generator=torch.Generator().manual_seed(0))
    assert out.pixels["aerial"].shape[-1] == 240 and torch.isfinite(out.loss)
    assert model(batch, "finetune")["treesat_mlc_thresh"].shape == (2, 15)


def test_bad_variants_are_refused_by_name():
    with pytest.raises(ManifestError, match="extends: 'nope' is not a built-in manifest"):
        parse_manifest('schema = 1\nextends = "nope"\n', origin="v.toml")
    with pytest.raises(ManifestError, match="modalities.radar: not in the base manifest"):
        parse_manifest('schema = 1\nextends = "treesatai-ts"\n[modalities.radar]\nembed = "x"\n', origin="v.toml")
    with pytest.raises(ManifestError, match="model_image_size: 250 is not divisible by patch_size 16"):
        parse_manifest('schema = 1\nextends = "treesatai-ts"\n[modalities.aerial]\nmodel_image_size = 250\n'
                       'patch_size = 16\n', origin="v.toml")
    with pytest.raises(ManifestError, match="s2.embed: shares 'aerial' with 'aerial' but its channels is 10"):
        parse_manifest('schema = 1\nextends = "treesatai-ts"\n[modalities.s2]\nembed = "aerial"\n', origin="v.toml")


RESIZE_CASES = ("aerial_nearest_240", "aerial_bilinear_240", "dem_nearest_48_rescaled", "s2_nearest_6_identity")


@pytest.mark.parametrize("case", RESIZE_CASES)
def test_resize_equals_the_official_resize_and_rescale(case):
    """tests/data/oracle/resize_rescale.npz: outputs of the official BaseMIM.resize_and_rescale (@6a30075)."""
    meta = json.loads(require(RESIZE_ORACLE.with_suffix(".json")).read_text())["cases"][case]
    with np.load(RESIZE_ORACLE) as data:
        x, expected = torch.from_numpy(data[meta["input"]]), torch.from_numpy(data[case])
    ours = resize_and_rescale(x, meta["image_size"], meta["mode"], meta["rescale_elev"])
    assert ours.shape == expected.shape and torch.equal(ours, expected)


def test_the_model_prepares_inputs_with_that_resize():
    model = build_model("treesatai-ts-from-flair-hub", "tiny", "group", interpolate="bilinear")
    batch = make_batch(load_manifest("treesatai-ts"), 1)
    prepared = model.prepare(batch)
    assert torch.equal(prepared["aerial"], resize_and_rescale(batch["aerial"], 240, "bilinear", False))
    assert prepared["s2"] is batch["s2"] or torch.equal(prepared["s2"], batch["s2"])
