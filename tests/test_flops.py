"""FLOPs/parameter accounting: the paper's §9.1 formula against Tables 20-21, the CLI, and our model's counts."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from maestro_cli.model import main
from maestro_data.manifest import load_manifest
from maestro_model import flops as F
from maestro_model.model import build_model

DATASETS = ("treesatai-ts", "pastis-hd", "flair2", "flair-hub")
# Paper Tables 20 (pretrain) and 21 (probe/fine-tune): forward GFLOPs per sample, MAESTRO-B, group fusion.
PAPER = {
    ("pretrain", "joint"): (28.7, 112.1, 118.2, 130.9),
    ("pretrain", "token"): (67.4, 347.2, 267.8, 293.8),
    ("finetune", "joint"): (78.3, 326.8, 334.8, 370.3),
    ("finetune", "token"): (190.0, 1099.9, 807.8, 881.7),
}
CASES = [(d, ph, ms, table[i]) for (ph, ms), table in PAPER.items() for i, d in enumerate(DATASETS)]


@pytest.mark.parametrize(("dataset", "phase", "multispectral", "gflops"), CASES)
def test_formula_reproduces_paper_tables(dataset: str, phase: str, multispectral: str, gflops: float) -> None:
    got = F.formula_flops(load_manifest(dataset), phase, "base", "group", multispectral) / 1e9
    assert got == pytest.approx(gflops, rel=0.02)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_token_based_costs_more_than_joint(dataset: str, phase: str) -> None:
    m = load_manifest(dataset)
    assert F.formula_flops(m, phase, multispectral="token") > 1.5 * F.formula_flops(m, phase, multispectral="joint")


def test_block_macs_by_hand() -> None:
    # 10 tokens, width 4, MLP 16: qkv+out 4*16, MLP 2*4*16 per token, then QK^T and AV 2*100*4
    assert F.block_macs(10, 4, 16) == 10 * (64 + 128) + 800


def test_visible_tokens_follow_python_rounding() -> None:
    assert [F.visible_tokens(n) for n in (225, 144, 72, 2, 6)] == [56, 36, 18, 0, 2]


def test_official_decoder_width_matches_model_spec() -> None:
    # model-spec §10.7: the real decoder (MLP 4 x C_e) costs about 15.7 GMACs on TreeSatAI-TS pre-training
    m = load_manifest("treesatai-ts")
    macs = sum(F.formula_macs(m, "pretrain", variant="official").values())
    assert macs / 1e9 == pytest.approx(15.7, abs=0.05)
    official, paper = F.formula_macs(m, "finetune", variant="official"), F.formula_macs(m, "finetune")
    assert official["encoder"] == paper["encoder"] and official["attn_pool"] > paper["attn_pool"]


def test_fusion_modes_split_sequences() -> None:
    m = load_manifest("treesatai-ts")
    shared = {s.key: (s.count, s.length) for s in F.encoder_sequences(m, "shared")}
    assert shared["s2"] == (16, 9) and shared["aerial"] == (1, 225)
    group = {s.key: (s.count, s.length) for s in F.encoder_sequences(m, "group", "token")}
    assert group["s1"] == (1, 144) and group["s2"] == (1, 432) and group["aerial"] == (1, 450)
    assert F.formula_flops(m, "pretrain", fusion="inter-group", inter_depth=0) == F.formula_flops(m, "pretrain")
    # inter-group: the 3 fusion blocks attend over all groups' tokens at once, which costs more attention
    assert F.formula_flops(m, "finetune", fusion="inter-group") > F.formula_flops(m, "finetune", fusion="group")
    # late temporal fusion attends over short sequences only
    assert F.formula_flops(m, "finetune", fusion="shared") < F.formula_flops(m, "finetune", fusion="mod")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": "huge"}, "model size"),
    ({"fusion": "late"}, "fusion mode"),
    ({"multispectral": "bands"}, "multispectral"),
    ({"fusion": "shared", "inter_depth": 3}, "inter_depth"),
    ({"phase": "train"}, "phase"),
])
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    args = {"phase": "pretrain", **kwargs}
    with pytest.raises(ValueError, match=match):
        F.formula_flops(load_manifest("treesatai-ts"), **args)


def test_cli_json_parses() -> None:
    result = CliRunner().invoke(main, ["flops", "--dataset", "pastis-hd", "--multispectral", "token", "--json",
                                       "--no-measure"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["paper_formula"]["pretrain"] == pytest.approx(347.2, rel=0.02)
    assert report["paper_formula"]["finetune"] == pytest.approx(1099.9, rel=0.02)


def test_cli_table_and_info() -> None:
    runner = CliRunner()
    table = runner.invoke(main, ["flops", "--dataset", "flair-hub", "--no-measure"])
    assert table.exit_code == 0 and "130.9" in table.output and "370.3" in table.output
    info = runner.invoke(main, ["info", "--dataset", "flair-hub", "--json", "--no-measure"])
    report = json.loads(info.output)
    assert report["modality_tokens"] == {"aerial": 1024, "dem": 256, "s2": 400, "s1_asc": 100, "s1_des": 100}
    assert [s["visible_pretrain"] for s in report["sequences"]] == [256, 64, 100, 50]


def test_cli_bad_dataset_is_one_clean_line() -> None:
    result = CliRunner().invoke(main, ["flops", "--dataset", "no-such-dataset", "--no-measure"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "no-such-dataset" in result.output and "Traceback" not in result.output


# --- our implementation -----------------------------------------------

OFFICIAL_PARAMS_M = [  # model-spec §3.6, verified by instantiating the official code
    ("treesatai-ts", "group", 297.4), ("treesatai-ts", "inter-group", 254.9),
    ("pastis-hd", "group", 296.4), ("pastis-hd", "inter-group", 253.9),
    ("flair-hub", "group", 400.3), ("flair-hub", "inter-group", 336.5),
]


@pytest.mark.parametrize(("dataset", "fusion", "millions"), OFFICIAL_PARAMS_M)
def test_parameter_counts_match_official(dataset: str, fusion: str, millions: float) -> None:
    with torch.device("meta"):
        model = build_model(load_manifest(dataset), "base", fusion)
    assert F.count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.1)


# small widths and depths (build_model overrides) so the counts run in a blink; the formula takes the same numbers
SMALL_DIMS = {"embed_dim": 40, "depth": 4, "heads": 2, "dim_head": 20, "mlp_ratio": 2, "decoder_dim": 32,
              "decoder_depth": 1, "decoder_heads": 2, "decoder_dim_head": 16, "decoder_mlp_ratio": 4}
SMALL_SPEC = F.size_spec("tiny", **SMALL_DIMS)


@pytest.mark.parametrize(("dataset", "fusion", "multispectral"), [
    ("flair-hub", "inter-group", "joint"), ("pastis-hd", "group", "token"), ("treesatai-ts", "shared", "joint"),
])
def test_official_formula_equals_flop_counter(dataset: str, fusion: str, multispectral: str) -> None:
    # the flop counter sees exactly the linear maps the official-architecture formula lists (batch 1)
    manifest = load_manifest(dataset)
    counts = F.implementation_counts(manifest, "tiny", fusion, multispectral, **SMALL_DIMS)
    for phase in ("pretrain", "finetune"):
        assert counts["flops"][phase] == F.formula_flops(manifest, phase, SMALL_SPEC, fusion, multispectral,
                                                         variant="official"), phase


def test_flop_counter_on_tiny_dims() -> None:
    manifest = load_manifest("pastis-hd")
    spec = SMALL_SPEC
    model = build_model(manifest, "tiny", "inter-group", inter_depth=1, **SMALL_DIMS)
    g = torch.Generator().manual_seed(0)
    batch = F.example_batch(manifest, 1, "cpu", g)
    # a real CPU run counts what the formula predicts
    for phase in ("finetune", "pretrain"):
        got = F.measured_flops(model, batch, phase, generator=g)
        assert got == F.formula_flops(manifest, phase, spec, "inter-group", inter_depth=1, variant="official")
    train = F.measured_flops(model, batch, "pretrain", generator=g, backward=True)
    forward = F.formula_flops(manifest, "pretrain", spec, "inter-group", inter_depth=1, variant="official")
    assert 2.5 * forward < train < 3 * forward  # backward: about twice the forward (no input gradient)


def test_pretrain_counted_on_the_meta_device() -> None:
    manifest = load_manifest("treesatai-ts")
    counts = F.implementation_counts(manifest, "tiny", "group", "token", phases=("pretrain",), **SMALL_DIMS)
    assert counts["device"]["pretrain"] == "meta"
    assert counts["flops"]["pretrain"] == F.formula_flops(manifest, "pretrain", SMALL_SPEC, "group", "token",
                                                          variant="official")
