"""Unit checks of the model parts against model-spec numbers and hand computations; every fusion and multispectral
mode runs; bad inputs fail with the stage's error naming the culprit."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch
from modelkit import TINY, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

from maestro_data.errors import ManifestError
from maestro_data.manifest import load_manifest, parse_manifest
from maestro_data.stream.batch import BatchError, check_batch, expected_shapes
from maestro_model import encodings as enc
from maestro_model.losses import ReconSpec, multilabel_loss, reconstruction_loss, segmentation_loss
from maestro_model.masking import (
    MaskConfig,
    exact_count,
    num_masked,
    sample_masks,
    structured_probabilities,
    to_rows,
    visible_index,
)
from maestro_model.model import FUSIONS, ModelError, build_model
from maestro_model.taps import recording


def tiny(dataset: str, fusion: str = "group", **kw):
    torch.manual_seed(0)
    inter = {"inter_depth": 1} if fusion == "inter-group" else {}
    return build_model(dataset, "tiny", fusion, **inter, **{**TINY, **kw})



# ---------------------------------------------------------------------------------------------- encodings
def test_temporal_encoding_spec_check_values():
    dates = torch.tensor([[[2019, 100, 12], [2020, 10, 0]]], dtype=torch.int16)
    ref = torch.tensor([[[2019, 182, 0]]], dtype=torch.int16)
    e = enc.date_encoding(dates, ref, 32)
    assert e.shape == (1, 2, 32) and e.dtype == torch.float32
    assert torch.all(e[..., :24] == 0)
    expected = [[-0.2245, 0.9889, -0.1489, 0.0, -1.0], [0.5291, 0.1712, 0.9852, 0.0, 1.0]]
    for row, exp in zip(e[0, :, 24:], expected, strict=True):
        assert torch.all(row[:4] == row[0])  # the diff repeated on 4 channels
        # 4-decimal spec values; the float32 fractional-year diff is quantised at ~1.2e-4 (oracle pitfall 3)
        assert torch.allclose(row[[0, 4, 5, 6, 7]], torch.tensor(exp), atol=2e-4)


def test_grid_encoding_layout_and_block_average():
    pe = enc.grid_encoding(6, 24)  # k = 4, w = 10000^(-i/3)
    assert pe.shape == (6, 6, 24) and torch.all(pe[..., 16:] == 0)
    w = [10000 ** (-i / 3) for i in range(4)]
    row, col = 2, 5
    exp = ([math.sin(col * x) for x in w] + [math.cos(col * x) for x in w] + [math.sin(row * x) for x in w]
           + [math.cos(row * x) for x in w])
    assert torch.allclose(pe[row, col, :16], torch.tensor(exp), atol=1e-6)
    blocks = enc.block_average(pe, 3)
    assert blocks.shape == (9, 24)
    assert torch.allclose(blocks[1 * 3 + 2], pe[2:4, 4:6].reshape(-1, 24).mean(0), atol=1e-6)
    assert enc.block_average(pe, 4).shape == (16, 24)  # 6 -> 4 does not divide: bilinear resize to 8 first
    assert enc.fine_grid_size(96, [15, 3, 3], "lcm") == 15 and enc.fine_grid_size(96, [15, 3], "official") == 96


def test_paper_lcm_grid_option():
    model = tiny("treesatai-ts", "group", pos_grid="lcm")  # lcm(15, 3) = 15 instead of the official 96
    fine = enc.grid_encoding(15, 24)
    assert torch.equal(model.enc_pos_aerial[0, 0], fine.reshape(225, 24))
    assert torch.allclose(model.enc_pos_s2[0, 0, 4], fine[5:10, 5:10].reshape(-1, 24).mean(0), atol=1e-6)
    with pytest.raises(ModelError, match="pos_grid"):
        tiny("treesatai-ts", "group", pos_grid="gcd")


# ---------------------------------------------------------------------------------------------- masking
def test_structured_masks_follow_the_official_rules():
    model = tiny("treesatai-ts", "group")
    seqs = {s.name: s for s in model.sequences}
    p = structured_probabilities(seqs["s1"], model.layouts, model.config.mask)
    assert p["s1_asc"] == {"mod": 0.25, "bands": None, "dates": 0.25, "loc": 0.25}
    p = structured_probabilities(seqs["aerial"], model.layouts, model.config.mask)
    assert p["aerial"] == {"mod": None, "bands": None, "dates": None, "loc": 0.25}
    mod = tiny("treesatai-ts", "mod")
    s1 = next(s for s in mod.sequences if s.name == "s1_asc")
    assert structured_probabilities(s1, mod.layouts, mod.config.mask)["s1_asc"]["mod"] is None
    shared = tiny("treesatai-ts", "shared")
    assert all(v is None for v in structured_probabilities(shared.sequences[1], shared.layouts,
                                                           shared.config.mask)["s2"].values())


@pytest.mark.parametrize("fusion", ["group", "shared", "mod"])
def test_exact_masked_count_and_no_fully_masked_sequence(fusion):
    model = tiny("treesatai-ts", fusion, multispectral="token")
    final, struct = sample_masks(model.sequences, model.layouts, model.config.mask, 512,
                                 torch.Generator().manual_seed(1))
    for s in model.sequences:
        n = num_masked(s, model.layouts, model.config.mask)
        assert n == round(0.75 * s.length(model.layouts))
        rows_f, rows_s = to_rows(final, s), to_rows(struct, s)
        assert (rows_f.sum(dim=1) == n).all()
        assert not rows_s.all(dim=1).any()
        fits = rows_s.sum(dim=1) <= n
        assert (rows_f[fits] | ~rows_s[fits]).all()  # every structured token stays masked when the count allows


def test_trimming_official_keeps_lowest_indices_random_does_not():
    struct = torch.zeros(200, 10, dtype=torch.bool)
    struct[:, 2:9] = True  # 7 structured, 4 to keep
    official = exact_count(struct, 4, "official", torch.Generator().manual_seed(0))
    assert (official.nonzero()[:, 1].reshape(200, 4) == torch.tensor([2, 3, 4, 5])).all()
    rand = exact_count(struct, 4, "random", torch.Generator().manual_seed(0))
    assert (rand.sum(1) == 4).all() and not rand[:, [0, 1, 9]].any()
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rand}) > 10
    with pytest.raises(ValueError, match="trim"):
        exact_count(struct, 4, "sideways", torch.Generator().manual_seed(0))


def test_masks_never_come_from_the_global_rng():
    model = tiny("treesatai-ts", "group")
    batch = make_batch(model.manifest, 2)
    with pytest.raises(ModelError, match=r"explicit generator: pass generator=torch.Generator\(device\)"):
        model(batch, "pretrain")
    with pytest.raises(ValueError, match="explicit generator"):
        sample_masks(model.sequences, model.layouts, model.config.mask, 2, None)
    with pytest.raises(ValueError, match="explicit generator"):
        exact_count(torch.zeros(2, 10, dtype=torch.bool), 4, "official", None)
    # the same generator state gives the same masks whatever the global RNG does
    torch.manual_seed(1)
    a = model(batch, "pretrain", generator=torch.Generator().manual_seed(5)).mask
    torch.manual_seed(2)
    b = model(batch, "pretrain", generator=torch.Generator().manual_seed(5)).mask
    assert all(torch.equal(a[m], b[m]) for m in a)


def test_mask_tokens_land_on_their_own_modality_in_the_s1_group():
    model = tiny("treesatai-ts", "group")
    with torch.no_grad():
        model.mask_token["s1_asc"].fill_(1.0)
        model.mask_token["s1_des"].fill_(2.0)
    with torch.no_grad(), recording(model) as rec:
        out = model(make_batch(model.manifest, 8), "pretrain", generator=torch.Generator().manual_seed(3))
    dec_in, mask = rec["dec_in_s1"], rec["mask_group_s1"]
    n_asc = model.layouts["s1_asc"].pseudo_dates * model.layouts["s1_asc"].tokens
    assert torch.equal(mask[:, :n_asc], out.mask["s1_asc"].flatten(1))
    assert (dec_in[:, :n_asc][mask[:, :n_asc]] == 1.0).all() and (dec_in[:, n_asc:][mask[:, n_asc:]] == 2.0).all()
    assert mask[:, :n_asc].any() and mask[:, n_asc:].any()


def test_tap_hooks_see_the_named_intermediates_only_while_attached():
    model = tiny("flair-hub", "group")
    batch = make_batch(model.manifest, 2)
    assert not model.tapping
    with torch.no_grad(), recording(model) as rec:
        assert model.tapping and all(h.tapping for h in model.heads.values())
        logits = model(batch, "finetune")
    assert not model.tapping and not any(h.tapping for h in model.heads.values())
    mods = list(model.manifest.modalities)
    for m in mods:
        assert rec[f"tokens_{m}"].shape == rec[f"embed_{m}"].shape
        assert f"enc_out_{m}" in rec and f"seg_aligned_{m}" in rec
    for target, out in logits.items():
        assert rec[f"head_pooled_{target}"].shape[0] == out.shape[0] * model.heads[target].ref_grid ** 2
    names: list[str] = []
    handle = model.register_tap_hook(lambda name, t: names.append(name))
    with torch.no_grad():
        model(batch, "pretrain", generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert {f"pixels_rec_{m}" for m in mods} <= set(names) and not model.tapping
    with torch.no_grad():
        again = model(batch, "finetune")  # no observer: same outputs, nothing recorded
    assert all(torch.equal(again[t], logits[t]) for t in logits)


def test_visible_index_keeps_ascending_positions_with_a_static_shape():
    mask = torch.rand(64, 30, generator=torch.Generator().manual_seed(0)).argsort(1) < 20  # 10 visible per row
    idx = visible_index(mask, 10)
    assert idx.shape == (64, 10)
    for row, m in zip(idx, mask, strict=True):
        assert row.tolist() == torch.arange(30)[~m].tolist()  # the boolean-indexing reference


# ---------------------------------------------------------------------------------------------- static shapes
DATA_DEPENDENT = {"nonzero", "masked_select", "masked_scatter", "_local_scalar_dense", "bool_index",
                  "unsized_repeat_interleave"}


class _OpLog(TorchDispatchMode):
    """Names of the aten ops run on ``device`` tensors; boolean-mask indexing and repeat_interleave without an
    output size (both data-dependent shapes) get names of their own."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.ops = torch.device(device), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device == self.device for t in leaves):
            name = func.overloadpacket.__name__
            if name in ("index", "index_put", "_index_put_impl_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                name = "bool_index"
            elif name == "repeat_interleave" and kwargs.get("output_size") is None:
                name = "unsized_repeat_interleave"
            self.ops.append(name)
        return func(*args, **kwargs)


def test_pretrain_forward_has_static_shapes_and_runs_on_meta():
    with torch.device("meta"):
        model = tiny("treesatai-ts", "inter-group", multispectral="token")
    batch = {k: v.to("meta") for k, v in make_batch(model.manifest, 2).items()}
    log = _OpLog("meta")  # the masks are drawn on the CPU generator's device; everything else runs on meta
    try:
        with log:
            out = model(batch, "pretrain", generator=torch.Generator().manual_seed(0))
    except (RuntimeError, NotImplementedError) as exc:  # the meta device refuses data-dependent shapes
        raise AssertionError(f"pretrain forward fails on meta at aten.{log.ops[-1]}: {exc}") from exc
    assert not DATA_DEPENDENT & set(log.ops), sorted(DATA_DEPENDENT & set(log.ops))
    assert {"gather", "scatter"} <= set(log.ops)
    assert out.loss.shape == () and out.loss.device.type == "meta"
    assert all(out.pixels[m].shape == batch[m].shape for m in model.manifest.modalities)


# ---------------------------------------------------------------------------------------------- losses
def _hand_normalised(values: list[float]) -> list[float]:
    mu, var = statistics.fmean(values), statistics.variance(values)  # unbiased, as torch.var
    return [(v - mu) / math.sqrt(var + 1e-6) for v in values]


def test_patch_group_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    target, pred = torch.rand((1, 1, 3, 2, 4), generator=g), torch.rand((1, 1, 3, 2, 4), generator=g)
    mask = torch.tensor([[[False, True]]])  # 2 tokens of 2x2 px, the right one masked
    spec = ReconSpec(patch=2, bands=(3,), norm_groups=(1, 2), weight=2.0)
    errors = []
    for chunk in ([0], [1, 2]):
        xs = [target[0, 0, c, i, j].item() for i in range(2) for j in (2, 3) for c in chunk]
        ps = [pred[0, 0, c, i, j].item() for i in range(2) for j in (2, 3) for c in chunk]
        errors += [abs(a - b) for a, b in zip(_hand_normalised(xs), ps, strict=True)]
    total, terms = reconstruction_loss({"m": target}, {"m": pred}, {"m": mask}, {"m": spec})
    assert math.isclose(terms["m"].item(), statistics.fmean(errors), rel_tol=1e-5)
    assert math.isclose(total.item(), terms["m"].item(), rel_tol=1e-6)
    # paper weighting: each (token, group) counts once -> mean of the two chunk means
    _, paper = reconstruction_loss({"m": target}, {"m": pred}, {"m": mask}, {"m": spec}, weighting="paper")
    assert math.isclose(paper["m"].item(), (statistics.fmean(errors[:4]) + statistics.fmean(errors[4:])) / 2,
                        rel_tol=1e-5)
    # patch-wise: one normalisation over all 3 channels of the patch
    xs = [target[0, 0, c, i, j].item() for i in range(2) for j in (2, 3) for c in range(3)]
    ps = [pred[0, 0, c, i, j].item() for i in range(2) for j in (2, 3) for c in range(3)]
    patch_errors = [abs(a - b) for a, b in zip(_hand_normalised(xs), ps, strict=True)]
    _, patch = reconstruction_loss({"m": target}, {"m": pred}, {"m": mask}, {"m": spec}, norm="patch")
    assert math.isclose(patch["m"].item(), statistics.fmean(patch_errors), rel_tol=1e-5)
    raw, _ = reconstruction_loss({"m": target}, {"m": pred}, {"m": mask}, {"m": spec}, loss="l2")
    assert math.isclose(raw.item(), ((target - pred)[..., 2:] ** 2).mean().item(), rel_tol=1e-5)


def test_modalities_weighted_by_token_count():
    g = torch.Generator().manual_seed(1)
    data = {m: (torch.rand((1, 1, 1, 2, 2), generator=g), torch.rand((1, 1, 1, 2, 2), generator=g)) for m in "ab"}
    masks = {m: torch.ones(1, 1, 1, dtype=torch.bool) for m in "ab"}
    specs = {"a": ReconSpec(2, (1,), (1,), 1.0), "b": ReconSpec(2, (1,), (1,), 3.0)}
    total, t = reconstruction_loss({m: v[0] for m, v in data.items()}, {m: v[1] for m, v in data.items()}, masks,
                                   specs, loss="l1")
    assert math.isclose(total.item(), (t["a"].item() + 3 * t["b"].item()) / 4, rel_tol=1e-6)


def test_downstream_losses_skip_missing_values():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[:1], target[:1])
    assert torch.isclose(multilabel_loss(logits, target), ref)
    seg_logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    seg_target = torch.tensor([[[0, 19], [2, 19]]])
    kept = torch.nn.functional.cross_entropy(seg_logits.permute(0, 2, 3, 1)[seg_target != 19], torch.tensor([0, 2]))
    assert torch.isclose(segmentation_loss(seg_logits, seg_target, 19), kept)
    assert segmentation_loss(seg_logits, torch.full((1, 2, 2), 19), 19).item() == 0.0


# ---------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize(("dataset", "fusion", "millions"), [
    ("treesatai-ts", "group", 297.4), ("treesatai-ts", "inter-group", 254.9),
    ("flair-hub", "group", 400.3), ("flair-hub", "inter-group", 336.5)])
def test_maestro_b_parameter_counts(dataset, fusion, millions):
    with torch.device("meta"):
        model = build_model(dataset, "base", fusion)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


@pytest.mark.parametrize("multispectral", ["joint", "token"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_mode_runs_pretrain_and_finetune(fusion, multispectral):
    model = tiny("treesatai-ts", fusion, multispectral=multispectral)
    batch = make_batch(model.manifest, 2)
    with torch.no_grad():
        out = model(batch, "pretrain", generator=torch.Generator().manual_seed(0))
        logits = model(batch, "finetune")
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and set(out.losses) == set(model.manifest.modalities)
    for m, s in model.manifest.modalities.items():
        assert out.pixels[m].shape == batch[m].shape
        assert out.mask[m].shape == (2, model.layouts[m].pseudo_dates, s.grid_size ** 2)
    assert logits["treesat_mlc_thresh"].shape == (2, 15)


def test_pretraining_gradients_reach_every_pretraining_part():
    model = tiny("treesatai-ts", "inter-group", multispectral="token")
    model(make_batch(model.manifest, 1), "pretrain", generator=torch.Generator().manual_seed(0)).loss.backward()
    for name in ("patch_embed", "encoder", "encoder_inter", "enc_to_dec", "decoder", "embed_to_rec", "mask_token"):
        assert all(p.grad is not None for p in getattr(model, name).parameters()), name
    assert all(p.grad is None for p in model.heads.parameters())


@pytest.mark.parametrize(("fusion", "multispectral"), [("group", "joint"), ("shared", "token")])
def test_segmentation_head_shapes_and_probe_freezes_the_encoder(fusion, multispectral):
    model = tiny("pastis-hd", fusion, multispectral=multispectral)
    batch = make_batch(model.manifest, 1)
    logits = model(batch, "probe")["pastis_seg"]
    assert logits.shape == (1, 19, 16, 16)
    segmentation_loss(logits, batch["pastis_seg"], 19).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())


def test_integer_inputs_are_normalised_in_the_model():
    from maestro_data.stream.device import normalise_tensor, to_model_batch

    model = tiny("treesatai-ts", "group")
    batch = make_batch(model.manifest, 1)
    raw = (batch["aerial"] * 255).round().to(torch.uint8)
    as_float = {**batch, "aerial": raw.float() / 255}
    with torch.no_grad():
        a = model({**batch, "aerial": raw}, "finetune")["treesat_mlc_thresh"]
        b = model(as_float, "finetune")["treesat_mlc_thresh"]
    assert torch.equal(a, b)
    # the model's deferred normalisation is the loader's (one function), for log-scale inputs too
    spec = model.manifest.modalities["aerial"]
    moved = to_model_batch({**batch, "aerial": raw}, model.manifest, "cpu")
    assert torch.equal(model.prepare({**batch, "aerial": raw})["aerial"], moved["aerial"])
    log = dataclasses.replace(spec, log_scale=True)
    logged = dataclasses.replace(model.manifest, modalities={**model.manifest.modalities, "aerial": log})
    with torch.device("meta"):
        log_model = build_model(logged, "tiny", "group", **TINY)
    assert torch.equal(log_model.prepare({**batch, "aerial": raw})["aerial"],
                       normalise_tensor(raw, True, spec.norm_factor))


# ---------------------------------------------------------------------------------------------- bad inputs
def test_batch_contract_shapes():
    shapes = expected_shapes(load_manifest("treesatai-ts"))
    assert shapes["s2"] == (None, 16, 10, 6, 6) and shapes["s1_asc_dates"] == (None, 4, 3)
    assert shapes["ref_date"] == (None, 1, 3) and shapes["treesat_mlc_thresh"] == (None, 15)
    assert expected_shapes(load_manifest("pastis-hd"))["pastis_seg"] == (None, 16, 16)


def test_bad_batches_name_the_modality_and_expectation():
    model = tiny("treesatai-ts", "group")
    batch = make_batch(model.manifest, 2)
    with pytest.raises(BatchError, match=r"'s1_des'.*\[B, 4, 2, 6, 6\]"):
        model({k: v for k, v in batch.items() if k != "s1_des"}, "finetune")
    with pytest.raises(BatchError, match=r"'s2'.*\[2, 16, 10, 6, 6\]"):
        model({**batch, "s2": batch["s2"][:, :8]}, "finetune")
    with pytest.raises(BatchError, match=r"'aerial'.*float64.*float32 or uint8"):
        model({**batch, "aerial": batch["aerial"].double()}, "finetune")
    with pytest.raises(BatchError, match=r"'s2_dates'.*int16"):
        model({**batch, "s2_dates": batch["s2_dates"].long()}, "finetune")
    with pytest.raises(BatchError, match="treesat_mlc_thresh"):
        check_batch(model.manifest, {k: v for k, v in batch.items() if k != "treesat_mlc_thresh"}, targets=True)
    with pytest.raises(ModelError, match="phase"):
        model(batch, "train")
    bad_mask = {m: torch.zeros(2, model.layouts[m].pseudo_dates, model.layouts[m].tokens, dtype=torch.bool)
                for m in model.layouts}
    bad_mask["aerial"][0, 0, :3] = True
    with pytest.raises(BatchError, match="aerial"):
        model(batch, "pretrain", mask=bad_mask)


def test_nan_fails_fast_in_debug_mode_only():
    model = tiny("treesatai-ts", "group", debug_checks=True)
    batch = make_batch(model.manifest, 1)
    batch["s1_asc"][0, 1, 0, 2, 3] = float("nan")
    with pytest.raises(BatchError, match=r"\['s1_asc'\] contains NaN"):
        model(batch, "pretrain", generator=torch.Generator().manual_seed(0))
    lenient = tiny("treesatai-ts", "group")  # default: shape checks only, no device sync per step
    assert torch.isnan(lenient(batch, "pretrain", generator=torch.Generator().manual_seed(0)).loss)


def test_bad_configurations_are_rejected():
    with pytest.raises(ModelError, match="size"):
        build_model("treesatai-ts", "huge")
    with pytest.raises(ModelError, match="fusion"):
        build_model("treesatai-ts", "tiny", "early")
    with pytest.raises(ModelError, match="unknown model option 'dropout'"):
        build_model("treesatai-ts", "tiny", dropout=0.1)
    with pytest.raises(ModelError, match="inter_depth"):
        build_model("treesatai-ts", "tiny", "shared", inter_depth=2)
    with pytest.raises(ModelError, match="loss"):
        build_model("treesatai-ts", "tiny", "group", loss="huber")


def test_segmentation_grid_must_divide_the_target():
    target = "missing_value = 19\nresolution_m = "
    bad = load_manifest("pastis-hd").text.replace(target + "10.0", target + "32.0")
    with pytest.raises(ManifestError, match="not divisible"):
        parse_manifest(bad)
    manifest = load_manifest("pastis-hd")
    target = dataclasses.replace(manifest.targets["pastis_seg"], image_size=12)
    broken = dataclasses.replace(manifest, targets={"pastis_seg": target})
    with pytest.raises(ModelError, match=r"12 px is not divisible by the reference \(s2\) token grid 8"):
        build_model(broken, "tiny", "group", **TINY)


def test_mask_config_defaults_are_official():
    assert MaskConfig() == MaskConfig(ratio=0.75, scale=0.0, p_mod=0.25, p_bands=None, p_dates=0.25, p_loc=0.25,
                                      trim="official")
