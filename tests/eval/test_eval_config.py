"""`--config-file` of `celldino embed` / `eval knn` / `eval linear` (reference: dinov2/eval/{knn,linear}.py build the
model from the eval config's student.* and take the autocast dtype from its teacher backbone param_dtype).

The shipped ViT-L recipes are compared with the reference's way of building (`build_model_from_cfg`, on the meta
device: no weights are made); the command-line paths use tiny ViTs saved as hub `.pth` files, which record none of
the non-inferable settings, so everything those runs get beyond the shapes comes from the config or the flags."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from celldino.cli import build_parser
from celldino.cli import main as celldino
from celldino.config import load_config
from celldino.eval._cli import load_model, resolve_autocast_dtype
from celldino.eval.eval_config import (ConfigMismatchError, autocast_dtype_from_config, backbone_kwargs_from_config,
                                       check_backbone_matches_config, load_eval_config)
from celldino.eval.inputs import build_input_dataset, make_eval_transform
from celldino.hub import NON_INFERABLE_DEFAULTS, export_backbone
from celldino.models import build_model_from_cfg

from eval_helpers import tiny_vit

RECIPES = {"eval/cell_dino/vitl16_pretrain": dict(in_chans=4, channel_adaptive=False),
           "eval/cell_dino/vitl16_channel_adaptive_pretrain": dict(in_chans=1, channel_adaptive=True)}
# a tiny one-channel model (embed_dim 32, depth 2, 2 heads, patch 8, pos_embed for 32 x 32 images)
TINY_STUDENT = ("student:\n  arch: vit_small\n  embed_dim: 32\n  depth: 2\n  num_heads: 2\n  patch_size: 8\n"
                "  in_chans: 1\n")


# ---- the shipped recipes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_shipped_eval_recipes_give_the_reference_model(recipe):
    """The kwargs handed to load_backbone plus what the weights tell give the model the reference builds from the
    same file; those weights pass the check; the autocast dtype is the reference's fp16."""
    cfg = load_eval_config(recipe)
    kwargs = backbone_kwargs_from_config(cfg)
    assert kwargs == dict(channel_adaptive=RECIPES[recipe]["channel_adaptive"], interpolate_offset=0.1,
                          interpolate_antialias=False)
    assert autocast_dtype_from_config(cfg) == "fp16"
    with torch.device("meta"):
        reference, embed_dim = build_model_from_cfg(cfg, only_teacher=True)
    assert embed_dim == 1024 and reference.n_blocks == 24 and reference.patch_size == 16
    assert reference.config["in_chans"] == RECIPES[recipe]["in_chans"]
    for key, value in kwargs.items():
        assert reference.config[key] == value, key
    check_backbone_matches_config(reference, cfg)  # the weights the reference would save agree


def test_the_plain_recipe_refuses_channel_adaptive_weights():
    """The ViT-L/16 4-channel recipe against one-channel (bag-of-channels) ViT-L weights: in_chans names both."""
    cfg = load_eval_config("eval/cell_dino/vitl16_pretrain")
    with torch.device("meta"):
        boc, _ = build_model_from_cfg(load_eval_config("eval/cell_dino/vitl16_channel_adaptive_pretrain"),
                                      only_teacher=True)
    with pytest.raises(ConfigMismatchError, match=r"student\.in_chans is 4 in the config but 1 in the weights"):
        check_backbone_matches_config(boc, cfg)


# ---- tiny models through the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    """A tiny one-channel ViT as a hub .pth (no metadata: interpolation and channel_adaptive are not recorded)."""
    model = tiny_vit(in_chans=1, seed=7, depth=2)
    return export_backbone(model, str(tmp_path_factory.mktemp("ckpt")), "tiny")["pth"], model


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """Three 3-channel 48 x 48 images: larger than the model's 32 x 32 pos_embed, so it is interpolated."""
    folder = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / f"c{i}.png")
    return str(folder)


def _config(tmp_path, extra="", in_chans=1, name="eval.yaml"):
    path = tmp_path / name
    path.write_text(TINY_STUDENT.replace("in_chans: 1", f"in_chans: {in_chans}") + extra)
    return str(path)


def _parse(*args):
    return build_parser().parse_args(["embed", "--input", "x", "--output", "x.npy", *args])


def _per_channel_cls(model, dataset, **settings):
    """Bag of channels computed directly: the one-channel model's final-norm CLS of each channel, concatenated."""
    model = copy.deepcopy(model)
    for key, value in settings.items():
        setattr(model, key, value)
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return torch.cat([model(x[:, c:c + 1]) for c in range(x.shape[1])], dim=1)


def _embed(ckpt, folder, out, *args):
    return celldino(["embed", "--checkpoint", ckpt, "--input", folder, "--output", str(out), "--crop-size", "0",
                     "--num-workers", "0", "--no-progress", *args])


def test_a_channel_adaptive_config_is_bag_of_channels_with_the_config_settings(tmp_path, tiny_pth, rgb_folder):
    """--config-file with student.channel_adaptive gives the features of --bag-of-channels on the model loaded by
    hand with channel_adaptive=True and the config's interpolation, and those are the per-channel final-norm CLS
    tokens of the one-channel model, concatenated (computed here directly)."""
    pth, model = tiny_pth
    cfg = _config(tmp_path, "  channel_adaptive: true\n  interpolate_offset: 0.0\n  interpolate_antialias: true\n")
    assert _embed(pth, rgb_folder, tmp_path / "cfg.npy", "--config-file", cfg) == 0

    # by hand: the same weights, channel_adaptive kwarg, --bag-of-channels
    from celldino.eval.embed import embed_dataset
    from celldino.hub import load_backbone

    by_hand = load_backbone(pth, num_heads=2, channel_adaptive=True, interpolate_offset=0.0,
                            interpolate_antialias=True)
    dataset = build_input_dataset(rgb_folder, transform=make_eval_transform(crop_size=0))
    embed_dataset(by_hand, dataset, str(tmp_path / "hand.npy"), bag_of_channels=True, compute_projection=False,
                  num_workers=0, progress=False)
    got, hand = np.load(tmp_path / "cfg.npy"), np.load(tmp_path / "hand.npy")
    assert got.shape == (3, 3 * 32)
    np.testing.assert_array_equal(got, hand)

    direct = _per_channel_cls(model, dataset, interpolate_offset=0.0, interpolate_antialias=True)
    np.testing.assert_allclose(got, direct.numpy(), atol=1e-5, rtol=1e-5)
    # the interpolation settings matter for these 48 x 48 images: the defaults give other features
    assert _embed(pth, rgb_folder, tmp_path / "plain.npy", "--bag-of-channels", "--num-heads", "2") == 0
    assert np.abs(np.load(tmp_path / "plain.npy") - got).max() > 1e-4


def test_explicit_flags_win_over_the_config_which_wins_over_the_defaults(tmp_path, tiny_pth):
    pth, _ = tiny_pth
    cfg = _config(tmp_path, "  interpolate_offset: 0.0\n  interpolate_antialias: true\n")
    model = load_model(_parse("--checkpoint", pth, "--num-heads", "2"))
    assert (model.interpolate_offset, model.interpolate_antialias) == (
        NON_INFERABLE_DEFAULTS["interpolate_offset"], NON_INFERABLE_DEFAULTS["interpolate_antialias"])
    model = load_model(_parse("--checkpoint", pth, "--config-file", cfg))  # num_heads from the config
    assert (model.interpolate_offset, model.interpolate_antialias, model.num_heads) == (0.0, True, 2)
    model = load_model(_parse("--checkpoint", pth, "--config-file", cfg, "--interpolate-offset", "0.25",
                              "--no-interpolate-antialias"))
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.25, False)
    model = load_model(_parse("--checkpoint", pth, "--num-heads", "2", "--interpolate-offset", "0",
                              "--interpolate-antialias"))
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.0, True)
    model = load_model(_parse("--checkpoint", pth, "--config-file", cfg, "--config-overrides",
                              "student.interpolate_offset=0.5"))
    assert model.interpolate_offset == 0.5


def test_the_interpolation_flags_reach_the_features(tmp_path, tiny_pth, rgb_folder):
    """--interpolate-offset / --interpolate-antialias without a config give the by-hand model's features."""
    pth, model = tiny_pth
    assert _embed(pth, rgb_folder, tmp_path / "flags.npy", "--bag-of-channels", "--num-heads", "2",
                  "--interpolate-offset", "0.0", "--interpolate-antialias") == 0
    dataset = build_input_dataset(rgb_folder, transform=make_eval_transform(crop_size=0))
    direct = _per_channel_cls(model, dataset, interpolate_offset=0.0, interpolate_antialias=True)
    np.testing.assert_allclose(np.load(tmp_path / "flags.npy"), direct.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("command", [["embed", "--input", "x", "--output", "x.npy"],
                                     ["eval", "knn", "--train-dataset", "a", "--val-dataset", "b", "--output-dir", "o"],
                                     ["eval", "linear", "--train-dataset", "a", "--val-dataset", "b",
                                      "--output-dir", "o"]])
def test_a_config_that_disagrees_with_the_weights_is_a_clear_error(tmp_path, tiny_pth, capsys, command):
    pth, _ = tiny_pth
    cfg = _config(tmp_path, "  num_register_tokens: 4\n", in_chans=3)
    assert celldino(command + ["--checkpoint", pth, "--config-file", cfg]) == 1
    err = capsys.readouterr().err
    assert f"student.in_chans is 3 in --config-file {cfg} but 1 in --checkpoint {pth}" in err
    assert f"student.num_register_tokens is 4 in --config-file {cfg} but 0 in --checkpoint {pth}" in err
    # the arch's width and depth, from a recipe: named as student.arch with both sides
    assert celldino(command + ["--checkpoint", pth, "--num-heads", "2", "--config-file",
                               "eval/cell_dino/vitl16_channel_adaptive_pretrain"]) == 1
    err = capsys.readouterr().err
    assert "student.arch is vit_large in --config-file eval/cell_dino/vitl16_channel_adaptive_pretrain " \
           "(embed_dim 1024, depth 24) but embed_dim 32, depth 2 (a custom size)" in err
    assert "student.patch_size is 16" in err and "student.in_chans" not in err


def test_config_errors_name_the_file_and_the_key(tmp_path, tiny_pth, capsys):
    pth, _ = tiny_pth
    assert load_model(_parse("--checkpoint", pth, "--config-file", str(tmp_path / "missing.yaml"))) is None
    assert "neither an existing file nor a recipe name" in capsys.readouterr().err
    assert load_model(_parse("--checkpoint", pth, "--config-file", _config(tmp_path), "--config-overrides",
                             "student.in_chan=1")) is None
    assert "unknown config key `student.in_chan`" in capsys.readouterr().err
    assert load_model(_parse("--checkpoint", pth, "--config-overrides", "student.in_chans=1")) is None
    assert "need a --config-file" in capsys.readouterr().err
    bad = _config(tmp_path, "  channel_adaptive: true\n", in_chans=3)
    assert load_model(_parse("--checkpoint", pth, "--config-file", bad)) is None
    assert "student.channel_adaptive is true but student.in_chans is 3" in capsys.readouterr().err


def test_the_autocast_dtype_comes_from_the_config_unless_dtype_is_given(tmp_path, tiny_pth):
    assert resolve_autocast_dtype(None, "fp16", "cuda:1") == "fp16"
    assert resolve_autocast_dtype(None, "fp16", "cpu") == "auto"  # CPU: fp32, as auto
    assert resolve_autocast_dtype("fp32", "fp16", "cuda") == "fp32"
    assert resolve_autocast_dtype("auto", "bf16", "cuda") == "auto"
    assert resolve_autocast_dtype(None, None, "cuda") == "auto"
    pth, _ = tiny_pth
    cfg = _config(tmp_path)
    bf16 = "compute_precision.teacher.backbone.mixed_precision.param_dtype=bf16"
    args = _parse("--checkpoint", pth, "--config-file", cfg, "--device", "cuda", "--config-overrides", bf16)
    assert load_model(args) is not None and args.dtype == "bf16"  # nothing runs on the device here
    args = _parse("--checkpoint", pth, "--config-file", cfg, "--device", "cuda", "--dtype", "fp32")
    assert load_model(args) is not None and args.dtype == "fp32"
    args = _parse("--checkpoint", pth, "--config-file", cfg, "--device", "cpu")
    assert load_model(args) is not None and args.dtype == "auto"
    assert autocast_dtype_from_config(load_config(cfg)) == "fp16"  # the reference's default


def test_the_flags_exist_on_all_three_commands():
    parser = build_parser()
    for cmd in (["eval", "knn"], ["eval", "linear"]):
        parsed = parser.parse_args(cmd + ["--checkpoint", "c", "--train-dataset", "a", "--val-dataset", "b",
                                          "--output-dir", "o", "--config-file", "f", "--config-overrides", "a=1",
                                          "b=2", "--interpolate-offset", "0", "--interpolate-antialias"])
        assert (parsed.config_file, parsed.config_overrides, parsed.interpolate_offset,
                parsed.interpolate_antialias, parsed.dtype) == ("f", ["a=1", "b=2"], 0.0, True, None)


@pytest.fixture(scope="module")
def recorded_heads(tmp_path_factory):
    """The demo's 192-wide, 3-head backbone as a celldino export: its .safetensors records num_heads 3, the .pth
    beside it records nothing."""
    from celldino.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(3)
    model = DinoVisionTransformer(patch_size=8, in_chans=1, embed_dim=192, depth=6, num_heads=3)
    return export_backbone(model, str(tmp_path_factory.mktemp("heads")), "demo3")


def test_the_config_num_heads_never_replaces_the_recorded_one(recorded_heads, capsys):
    """The weights' shapes do not depend on num_heads: a config value other than the file's record would load and
    compute other features. It is an error naming the key and both values; the config's value is used only for a
    file that records none (the .pth)."""
    st, pth = recorded_heads["safetensors"], recorded_heads["pth"]
    assert load_model(_parse("--checkpoint", st, "--config-file", "demo")).num_heads == 3  # agrees
    assert load_model(_parse("--checkpoint", st, "--config-file", "demo", "--config-overrides",
                             "student.num_heads=6")) is None
    err = capsys.readouterr().err
    assert f"student.num_heads is 6 in --config-file demo but 3 in --checkpoint {st}" in err
    # a file without a record: the config tells it (and an explicit flag still wins)
    assert load_model(_parse("--checkpoint", pth, "--config-file", "demo", "--config-overrides",
                             "student.num_heads=6")).num_heads == 6
    assert load_model(_parse("--checkpoint", st, "--config-file", "demo", "--num-heads", "6")).num_heads == 6


@pytest.mark.parametrize("command", [["embed", "--input", "x", "--output", "x.npy"],
                                     ["eval", "knn", "--train-dataset", "a", "--val-dataset", "b", "--output-dir", "o"],
                                     ["eval", "linear", "--train-dataset", "a", "--val-dataset", "b",
                                      "--output-dir", "o"]])
def test_a_bad_param_dtype_is_a_config_error_on_every_command(tmp_path, tiny_pth, capsys, command):
    """An unknown teacher backbone param_dtype is reported like the other config errors (one line, exit code 1),
    also on CPU where the dtype would not be used: the config is wrong either way."""
    pth, _ = tiny_pth
    cfg = _config(tmp_path)
    bad = "compute_precision.teacher.backbone.mixed_precision.param_dtype=int8"
    assert celldino(command + ["--checkpoint", pth, "--config-file", cfg, "--device", "cpu",
                               "--config-overrides", bad]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"celldino: --config-file {cfg}: compute_precision.teacher.backbone.mixed_precision.param_dtype is 'int8'; "
        "expected fp16, bf16 or fp32")
    assert "Traceback" not in err


def test_the_recorded_num_heads_is_read_from_the_export_or_the_one_beside(tmp_path, recorded_heads):
    """recorded_num_heads: a .safetensors export's metadata, nothing for a plain .pth, and for a training
    teacher_checkpoint.pth the teacher_backbone.safetensors written beside it (as load_backbone reads it)."""
    import shutil

    from celldino.eval._cli import recorded_num_heads

    assert recorded_num_heads(recorded_heads["safetensors"]) == 3
    assert recorded_num_heads(recorded_heads["pth"]) is None
    shutil.copy(recorded_heads["pth"], tmp_path / "teacher_checkpoint.pth")
    assert recorded_num_heads(tmp_path / "teacher_checkpoint.pth") is None
    shutil.copy(recorded_heads["safetensors"], tmp_path / "teacher_backbone.safetensors")
    assert recorded_num_heads(tmp_path / "teacher_checkpoint.pth") == 3
