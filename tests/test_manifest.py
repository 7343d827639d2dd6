"""Manifests: the shipped ones carry the paper/official numbers; inconsistent ones are rejected naming the key."""

from __future__ import annotations

import re

import pytest

from maestro_data.errors import ManifestError
from maestro_data.manifest import builtin_manifests, load_manifest, parse_manifest


def test_builtin_manifests_are_the_four_datasets():
    assert builtin_manifests(variants=False) == ["flair-hub", "flair2", "pastis-hd", "treesatai-ts"]
    assert set(builtin_manifests()) - set(builtin_manifests(variants=False)) == {
        "treesatai-ts-from-flair-hub", "treesatai-ts-from-s2-naip"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # modality: (image size, patch size, bins, model channels, norm factor, log, norm groups, fusion group)
        ("treesatai-ts", {"aerial": (300, 20, 1, 4, 255, False, (1, 3), "aerial"),
                          "s2": (6, 2, 16, 10, 5000, False, (4, 4, 2), "s2"),
                          "s1_asc": (6, 2, 4, 2, 5, True, (1, 1), "s1"),
                          "s1_des": (6, 2, 4, 2, 5, True, (1, 1), "s1")}),
        ("pastis-hd", {"spot": (160, 16, 1, 3, 255, False, (3,), "spot"),
                       "s2": (16, 2, 16, 10, 10000, False, (4, 4, 2), "s2"),
                       "s1_asc": (16, 2, 4, 2, 20, False, (1, 1), "s1"),
                       "s1_des": (16, 2, 4, 2, 20, False, (1, 1), "s1")}),
        ("flair-hub", {"aerial": (512, 16, 1, 4, 255, False, (1, 3), "aerial"),
                       "dem": (512, 32, 1, 2, 1000, False, (2,), "dem"),
                       "s2": (10, 2, 16, 10, 5000, False, (4, 4, 2), "s2"),
                       "s1_asc": (10, 2, 4, 2, 5, True, (1, 1), "s1"),
                       "s1_des": (10, 2, 4, 2, 5, True, (1, 1), "s1")}),
        ("flair2", {"aerial": (512, 16, 1, 4, 255, False, (1, 3), "aerial"),
                    "dem": (512, 32, 1, 2, 1000, False, (2,), "dem"),
                    "s2": (10, 2, 16, 10, 5000, False, (4, 4, 2), "s2")}),
    ],
)
def test_paper_tables_5_to_7(name, expected):
    m = load_manifest(name)
    assert list(m.modalities) == list(expected)
    for mod, (size, patch, bins, ch, norm, log, groups, group) in expected.items():
        s = m.modalities[mod]
        assert (s.image_size, s.patch_size, s.temporal_bins, s.channels, s.norm_factor, s.log_scale, s.norm_groups,
                s.fusion_group) == (size, patch, bins, ch, norm, log, groups, group), mod


def test_dataset_level_numbers():
    t, p, f, f2 = (load_manifest(n) for n in ("treesatai-ts", "pastis-hd", "flair-hub", "flair2"))
    assert (t.grid_pos_enc, p.grid_pos_enc, f.grid_pos_enc) == (96, 256, 160)
    assert (t.ref_input, p.ref_input, f.ref_input) == (None, "s2", "aerial")
    assert (t.crop_m, p.crop_m, f.crop_m) == (60, 160, 102.4)
    assert p.repeats == 8 and t.repeats == 1 and f.repeats == 1
    assert p.reference_date_tuple() == (2019, 182, 0)
    assert f.modalities["aerial"].select == (3, 0, 1, 2)
    assert f.modalities["aerial"].model_bands == ("NIR", "R", "G", "B")
    assert p.modalities["s1_asc"].select == (0, 1) and p.modalities["s1_asc"].stored_channels == 3
    assert f.modalities["dem"].rescale_elev
    assert t.modalities["s2"].cloud_mask.threshold == 0 and t.modalities["s2"].cloud_mask.bands == ("snow", "cloud")
    assert f.targets["cosia"].ignore == (15, 16, 17, 18) and f.targets["cosia"].num_classes == 15
    assert f2.targets["cosia"].ignore == (1, 2, 7, 15, 16, 17, 18) and f2.targets["cosia"].num_classes == 15
    assert p.targets["pastis_seg"].missing_value == 19 and p.targets["pastis_seg"].num_classes == 19
    assert t.targets["treesat_mlc_thresh"].threshold == 0.07 and len(t.targets["treesat_mlc_thresh"].classes) == 15
    assert t.groups == {"aerial": ("aerial",), "s2": ("s2",), "s1": ("s1_asc", "s1_des")}
    assert "s1_asc" not in f2.modalities
    # token counts of model-spec §1.3
    assert sum(s.num_tokens for s in f.modalities.values()) == 1880
    assert sum(s.num_tokens for s in t.modalities.values()) == 441
    assert sum(s.num_tokens for s in p.modalities.values()) == 1636
    assert sum(s.num_tokens for s in f2.modalities.values()) == 1680


def test_hash_ignores_comments_and_formatting():
    text = load_manifest("treesatai-ts").text
    other = parse_manifest("# a comment\n" + text.replace("tile_m = 60.0", "tile_m = 60.0   # metres"))
    assert other.sha256 == load_manifest("treesatai-ts").sha256
    changed = parse_manifest(text.replace("temporal_bins = 16", "temporal_bins = 4"))
    assert changed.sha256 != other.sha256


def _broken(old: str, new: str, count: int = 1) -> str:
    text = load_manifest("flair-hub").text
    assert old in text, old
    return text.replace(old, new, count)


@pytest.mark.parametrize(
    ("old", "new", "key", "why"),
    [
        ("image_size = 512\npatch_size = 16", "image_size = 512\npatch_size = 15", "modalities.aerial.image_size",
         "not divisible by patch_size"),
        ("norm_groups = [1, 3]", "norm_groups = [1, 2]", "modalities.aerial.norm_groups", "sum to the 4"),
        ("temporal_bins = 1\nnorm_factor = 255.0", "temporal_bins = 1\nnorm_factor = 255.0\ncolour = 3",
         "modalities.aerial.colour", "unknown key"),
        ("resolution_m = 10.24\nimage_size = 10\npatch_size = 2\ntemporal_bins = 16",
         "resolution_m = 10.0\nimage_size = 10\npatch_size = 2\ntemporal_bins = 16", "modalities.s2.resolution_m",
         "not a multiple of the pixel size"),
        ("image_size = 512\npatch_size = 16", "image_size = 256\npatch_size = 16", "modalities.aerial.image_size",
         "crop_m 102.4 / resolution_m 0.2 = 512"),
        ("select = [3, 0, 1, 2]", "select = [3, 0, 1, 4]", "modalities.aerial.select", "distinct indices"),
        ('dtype = "uint8"\nbands = ["R"', 'dtype = "uint9"\nbands = ["R"', "modalities.aerial.dtype", "must be one of"),
        ("ignore = [15, 16, 17, 18]", "ignore = [15, 16, 17]", "targets.cosia.ignore", "not ignored"),
        ("num_classes = 15", "num_classes = 25", "targets.cosia.num_classes", "exceeds"),
        ('ref_input = "aerial"', 'ref_input = "s3"', "ref_input", "is not a modality"),
        ('reference_date = "aerial"', 'reference_date = "s2"', "reference_date", "time series"),
        ("threshold = 0.0", "threshold = 150.0", "modalities.s2.cloud_mask.threshold", "[0, 100]"),
        ("crop_m = 102.4", "crop_m = 40.0", "crop_m", "not a whole multiple"),
        ("schema = 1", "schema = 7", "schema", "unsupported manifest schema"),
        ("grid_pos_enc = 160", "grid_pos_enc = -1", "grid_pos_enc", "must be > 0"),
        ("norm_factor = 5000.0", 'norm_factor = "5000"', "modalities.s2.norm_factor", "expected a number"),
        ("missing_value = -1", "missing_value = 3", "targets.cosia.missing_value", "collides"),
        ('"#6b714f",\n          "#000000"]', '"#6b714f"]', "targets.cosia.colors", "18 colours for 19 classes"),
        ('"#6b714f",\n          "#000000"]', '"#6b714f",\n          "black"]', "targets.cosia.colors",
         "'black' is not a '#rrggbb' colour"),
        ('hillshade = ["DSM", "DTM"]', 'hillshade = ["DSM", "NDVI"]', "modalities.dem.display", "'NDVI' is not a band"),
        ('display = { rgb = ["R", "G", "B"], false', 'display = { rgb = ["R", "G"], false', "modalities.aerial.display",
         "rgb: needs 3 bands"),
        ('hillshade = ["DSM", "DTM"]', 'relief = ["DSM"]', "modalities.dem.display", "unknown view 'relief'"),
    ],
)
def test_inconsistent_manifest_names_the_key(old, new, key, why):
    with pytest.raises(ManifestError, match=re.escape(key) + r": .*" + re.escape(why)):
        parse_manifest(_broken(old, new), origin="broken.toml")


def test_unknown_builtin_and_bad_toml(tmp_path):
    with pytest.raises(ManifestError, match="no manifest file 'nope'.*built-in: flair-hub"):
        load_manifest("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ManifestError, match="bad.toml: not valid TOML"):
        load_manifest(bad)


def test_user_copy_with_four_s2_bins(tmp_path):
    path = tmp_path / "flair-hub-d4.toml"
    path.write_text(load_manifest("flair-hub").text.replace("temporal_bins = 16", "temporal_bins = 4"))
    m = load_manifest(path)
    assert m.modalities["s2"].temporal_bins == 4 and m.modalities["s2"].num_tokens == 100


def test_storage_digest_ignores_stream_time_settings():
    """A copy that only changes what the stream applies (bins, normalisation, thresholds, ignored labels) reads
    the same store and shards; a change of what is stored (dtype, bands, sources, classes) does not."""
    base = load_manifest("flair-hub")
    stream_only = parse_manifest(base.text.replace("temporal_bins = 16", "temporal_bins = 4")
                                 .replace("norm_factor = 5000.0", "norm_factor = 10000.0")
                                 .replace("ignore = [15, 16, 17, 18]", "ignore = [15, 16, 17, 18, 0]"))
    assert stream_only.sha256 != base.sha256 and stream_only.storage_sha256 == base.storage_sha256
    for old, new in (('dtype = "uint16"', 'dtype = "int16"'), ('"B11", "B12"]', '"B11", "B13"]'),
                     ('"undefined"]', '"other"]')):
        assert parse_manifest(base.text.replace(old, new)).storage_sha256 != base.storage_sha256, new


def test_display_keys_change_no_digest_and_give_band_indices():
    """Colours and views are for figures only: stores, shards and checkpoints of a manifest without them match."""
    m = load_manifest("treesatai-ts")
    bare = "\n".join(line for line in m.text.splitlines()
                     if not line.startswith(("display =", "colors =", "          \"#")))
    plain = parse_manifest(bare)
    assert plain.targets["treesat_mlc_thresh"].colors == () and plain.modalities["s2"].display == ()
    assert (plain.sha256, plain.storage_sha256) == (m.sha256, m.storage_sha256)
    assert m.modalities["aerial"].view("rgb") == (3, 1, 2) and m.modalities["aerial"].view("false_color") == (0, 3, 1)
    assert m.modalities["s1_asc"].view("rgb") == ()
    assert load_manifest("flair-hub").modalities["dem"].view("hillshade") == (0, 1)
    assert load_manifest("flair-hub").targets["cosia"].colors[0] == "#db0e9a"
