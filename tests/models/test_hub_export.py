"""Hub constructors with the reference names (spec §8 table), loading from local files, export to safetensors and
reference-format .pth, and the `celldino export` command."""
import json
import re

import pytest
import torch
from safetensors import safe_open

from celldino import cli, hub
from celldino.models import vit_small
from reference_vit import spec_keys

# spec §8: name -> (dim, depth, patch, img_size, in_chans, channel_adaptive)
HUB_TABLE = {
    "cell_dino_hpa_vitl16": (1024, 24, 16, 224, 4, False),
    "cell_dino_hpa_vitl14": (1024, 24, 14, 518, 4, False),
    "cell_dino_cp_vits8": (384, 12, 8, 128, 5, False),
    "channel_adaptive_dino_vitl16": (1024, 24, 16, 224, 1, True),
}


@pytest.mark.parametrize("name", list(HUB_TABLE))
def test_hub_constructor_architecture(name):
    dim, depth, patch, img, in_chans, adaptive = HUB_TABLE[name]
    with torch.device("meta"):
        model = getattr(hub, name)(pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == spec_keys(dim, depth, patch, in_chans, img, registers=0, chunks=4, layerscale=True)
    assert model.bag_of_channels is adaptive
    assert model.interpolate_offset == 0.1 and model.interpolate_antialias is False
    assert model.num_register_tokens == 0
    assert name in hub.HUB_MODELS


@pytest.fixture(scope="module")
def vits8():
    """A ViT-S/8 with random weights in the released cell_dino_cp_vits8 layout (5 channels, 128 px, 4 chunks)."""
    torch.manual_seed(5)
    model = vit_small(patch_size=8, img_size=128, in_chans=5, block_chunks=4, init_values=1.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def vits8_file(vits8, tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "cell_dino_cp_vits8.pth"
    torch.save(vits8.state_dict(), path)
    return path


def test_hub_constructor_loads_local_file(vits8, vits8_file):
    x = torch.randn(1, 5, 64, 96)
    model = hub.cell_dino_cp_vits8(pretrained_path=str(vits8_file))
    assert not model.training
    torch.testing.assert_close(model(x), vits8(x), rtol=0, atol=0)
    # the generic loader infers everything (arch vit_small: no num_heads needed)
    inferred = hub.load_backbone(vits8_file)
    assert inferred.config["img_size"] == 128 and inferred.config["in_chans"] == 5 and inferred.num_heads == 6
    torch.testing.assert_close(inferred(x), vits8(x), rtol=0, atol=0)


def test_hub_constructor_accepts_teacher_format_and_refuses_urls(vits8, tmp_path):
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in vits8.state_dict().items()}}, path)
    x = torch.randn(1, 5, 64, 64)
    torch.testing.assert_close(hub.cell_dino_cp_vits8(pretrained_path=path)(x), vits8(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not download"):
        hub.cell_dino_cp_vits8(pretrained_url="https://example.org/w.pth")
    with pytest.raises(ValueError, match="pretrained_path"):
        hub.cell_dino_cp_vits8()
    with pytest.raises(ValueError, match="unsupported weights"):
        hub.cell_dino_cp_vits8(pretrained=False, weights="IMAGENET")


def test_hub_constructor_rejects_a_different_model(vits8_file):
    from celldino.models.checkpoint import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match="patch_embed.proj.weight checkpoint"):
        hub.cell_dino_cp_vits8(pretrained_path=vits8_file, in_channels=3)


def test_export_backbone_files(vits8, tmp_path):
    paths = hub.export_backbone(vits8, tmp_path / "out", "mine", block_chunks=4)
    pth = torch.load(paths["pth"], weights_only=True)
    assert set(pth) == set(vits8.state_dict())  # reference hub format: plain chunked keys
    assert all(torch.equal(pth[k], v) for k, v in vits8.state_dict().items())
    with safe_open(paths["safetensors"], framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(vits8.state_dict())
    assert meta["format"] == "celldino-backbone"
    assert json.loads(meta["arch"]) == "vit_small" and json.loads(meta["patch_size"]) == 8
    assert json.loads(meta["in_chans"]) == 5 and json.loads(meta["img_size"]) == 128
    assert json.loads(meta["block_chunks"]) == 4 and json.loads(meta["num_heads"]) == 6
    unchunked = hub.export_backbone(vits8, tmp_path / "flat", "flat", block_chunks=0)
    flat_keys = [k for k in torch.load(unchunked["pth"], weights_only=True) if k.startswith("blocks.")]
    assert flat_keys and all(re.match(r"^blocks\.\d+\.[a-z]", k) for k in flat_keys)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.pth", "mine.safetensors"]


def test_safetensors_export_records_non_inferable_settings(tmp_path):
    model = vit_small(patch_size=16, img_size=32, in_chans=1, embed_dim=32, depth=2, num_heads=2, block_chunks=0,
                      channel_adaptive=True, interpolate_offset=0.0, interpolate_antialias=True).eval()
    paths = hub.export_backbone(model, tmp_path, "boc", block_chunks=2)
    loaded = hub.load_backbone(paths["safetensors"])  # num_heads, BoC and interpolation come from the metadata
    assert loaded.num_heads == 2 and loaded.bag_of_channels and loaded.interpolate_offset == 0.0
    assert loaded.interpolate_antialias and loaded.config["block_chunks"] == 2
    x = torch.randn(2, 3, 48, 64)
    for (p1, c1), (p2, c2) in zip(loaded.get_intermediate_layers(x, 2), model.get_intermediate_layers(x, 2)):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
        torch.testing.assert_close(c1, c2, rtol=0, atol=0)


def test_export_cli_from_teacher_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = vit_small(patch_size=16, img_size=64, in_chans=4, embed_dim=64, depth=4, num_heads=4, block_chunks=2,
                      init_values=1e-5).eval()
    ckpt = tmp_path / "eval" / "training_99" / "teacher_checkpoint.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save({"teacher": {**{"backbone." + k: v for k, v in model.state_dict().items()},
                            "dino_head.last_layer.weight_g": torch.ones(3, 1)}}, ckpt)
    out = tmp_path / "exported"
    rc = cli.main(["export", "--checkpoint", str(ckpt), "--output-dir", str(out), "--num-heads", "4",
                   "--block-chunks", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "celldino_vit16" in printed and "safetensors" in printed
    pth = torch.load(out / "celldino_vit16.pth", weights_only=True)
    assert "blocks.3.3.attn.qkv.weight" in pth and "blocks.1.1.ls1.gamma" in pth
    x = torch.randn(2, 4, 64, 64)
    torch.testing.assert_close(hub.load_backbone(out / "celldino_vit16.safetensors")(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(hub.load_backbone(out / "celldino_vit16.pth", num_heads=4)(x), model(x),
                               rtol=0, atol=0)


def test_export_cli_reports_bad_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04junk")
    rc = cli.main(["export", "--checkpoint", str(junk), "--output-dir", str(tmp_path / "o"), "--name", "x"])
    assert rc == 1
    assert "junk.pth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
