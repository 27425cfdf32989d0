"""Checkpoint reading in every format, inference of the model settings, chunked <-> unchunked remapping, strict
loading errors and the weights_only refusal."""
import os

import pytest
import torch
from safetensors.torch import save_file

from celldino.hub import load_backbone
from celldino.models import vit_giant2, vit_large, vit_small
from celldino.models.checkpoint import (CheckpointError, CheckpointMismatchError, infer_model_kwargs,
                                        load_state_dict_strict, read_checkpoint, remap_block_keys,
                                        split_state_dict)

KW = dict(patch_size=8, img_size=32, in_chans=5, embed_dim=64, depth=4, num_heads=4, num_register_tokens=1,
          init_values=1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = vit_small(block_chunks=2, **KW).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 5, 40, 24)


def unchunked(model):
    return remap_block_keys(model.state_dict(), 0, model.n_blocks)


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


FORMATS = {
    "hub_chunked": lambda m: m.state_dict(),
    "unchunked": unchunked,
    "teacher_checkpoint": lambda m: {"teacher": {**prefixed(m.state_dict(), "backbone."),
                                                 "dino_head.mlp.0.weight": torch.zeros(8, 64),
                                                 "dino_head.last_layer.weight_g": torch.ones(10, 1)}},
    "ddp_module_prefix": lambda m: prefixed(unchunked(m), "module."),
    "compiled_prefix": lambda m: {k.replace("blocks.", "_orig_mod.blocks.", 1) if k.startswith("blocks.") else
                                  "_orig_mod." + k: v for k, v in m.state_dict().items()},
    "meta_arch_model": lambda m: {"model": {**prefixed(unchunked(m), "student.backbone."),
                                            **prefixed(m.state_dict(), "teacher.backbone.")}, "iteration": 7},
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_to_the_same_model(fmt, model, image, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(FORMATS[fmt](model), path)
    loaded = load_backbone(path, num_heads=4)
    assert not loaded.training
    assert loaded.config["block_chunks"] == (2 if fmt in ("hub_chunked", "teacher_checkpoint", "compiled_prefix",
                                                           "meta_arch_model") else 0)
    for key in ("patch_size", "img_size", "in_chans", "embed_dim", "depth", "num_register_tokens"):
        assert loaded.config[key] == KW[key], key
    torch.testing.assert_close(loaded(image), model(image), rtol=0, atol=0)


def test_plain_safetensors_file(model, image, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in unchunked(model).items()}, str(path))
    torch.testing.assert_close(load_backbone(path, num_heads=4)(image), model(image), rtol=0, atol=0)


@pytest.mark.parametrize("target", [0, 1, 2, 4])
def test_remap_to_any_block_chunks(target, model, image, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)  # chunked in 2
    loaded = load_backbone(path, num_heads=4, block_chunks=target)
    keys = [k for k in loaded.state_dict() if k.endswith("norm1.weight")]
    if target == 0:
        assert keys == [f"blocks.{i}.norm1.weight" for i in range(4)]
    else:
        size = 4 // target
        assert keys == [f"blocks.{i // size}.{i}.norm1.weight" for i in range(4)]
    torch.testing.assert_close(loaded(image), model(image), rtol=0, atol=0)


def test_remap_round_trip_is_identity(model):
    sd = model.state_dict()
    for chunks in (0, 1, 4, 3):
        back = remap_block_keys(remap_block_keys(sd, chunks, 4), 2, 4)
        assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


def test_chunked_weights_into_unchunked_model_are_not_silently_skipped(model, image):
    """The reference loads with strict=False, so chunked keys into an unchunked model leave random blocks; here
    the keys are remapped and every block is loaded."""
    fresh = vit_small(block_chunks=0, **KW).eval()
    load_state_dict_strict(fresh, model.state_dict())
    torch.testing.assert_close(fresh(image), model(image), rtol=0, atol=0)


def test_head_keys_are_returned_separately(model):
    backbone, head = split_state_dict(FORMATS["teacher_checkpoint"](model))
    assert set(backbone) == set(model.state_dict())
    assert set(head) == {"mlp.0.weight", "last_layer.weight_g"}


def test_infer_reference_vitl16_hub_layout():
    with torch.device("meta"):
        m = vit_large(patch_size=16, img_size=224, in_chans=4, block_chunks=4, init_values=1.0)
    kw = infer_model_kwargs(m.state_dict())
    assert kw["arch"] == "vit_large" and kw["num_heads"] == 16
    assert (kw["patch_size"], kw["img_size"], kw["in_chans"], kw["block_chunks"]) == (16, 224, 4, 4)
    assert kw["num_register_tokens"] == 0 and kw["ffn_layer"] == "mlp" and kw["mlp_ratio"] == 4
    assert kw["init_values"] is not None and kw["qkv_bias"] and kw["proj_bias"] and kw["ffn_bias"]


def test_infer_giant_swiglu_registers_no_layerscale():
    with torch.device("meta"):
        m = vit_giant2(patch_size=14, img_size=518, num_register_tokens=4, ffn_layer="swiglufused", block_chunks=0,
                       init_values=None, qkv_bias=False)
    kw = infer_model_kwargs(m.state_dict())
    assert kw["arch"] == "vit_giant2" and kw["num_heads"] == 24 and kw["ffn_layer"] == "swiglufused"
    assert (kw["patch_size"], kw["img_size"], kw["in_chans"], kw["block_chunks"]) == (14, 518, 3, 0)
    assert kw["num_register_tokens"] == 4 and kw["init_values"] is None and not kw["qkv_bias"]
    with torch.device("meta"):
        rebuilt = vit_giant2(**{k: v for k, v in kw.items() if k not in ("arch", "num_heads", "embed_dim", "depth")})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_strict_mismatch_lists_missing_unexpected_and_shapes(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["blocks.0.1.ls2.gamma"]
    sd["blocks.0.0.extra.weight"] = torch.zeros(1)
    sd["norm.bias"] = torch.zeros(65)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_backbone(path, num_heads=4, block_chunks=2, embed_dim=64)
    text = str(info.value)
    assert str(path) in text and "strict" in text
    assert "missing keys (1): blocks.0.1.ls2.gamma" in text
    assert "unexpected keys (1): blocks.0.0.extra.weight" in text
    assert "norm.bias checkpoint [65] vs model [64]" in text
    assert isinstance(info.value, KeyError)


def test_too_many_missing_keys_are_summarised(model):
    fresh = vit_small(block_chunks=0, **KW)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(\d+\): .*, \.\.\. and \d+ more"):
        load_state_dict_strict(fresh, {"cls_token": model.cls_token})


class NotATensor:
    def __init__(self):
        self.payload = "anything"


def test_pickled_objects_are_refused(model, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"teacher": prefixed(model.state_dict(), "backbone."), "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"NotATensor\).*weights_only=True") as info:
        load_backbone(path, num_heads=4)
    assert str(path) in str(info.value)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        read_checkpoint(junk)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="does not download"):
        load_backbone("https://dl.fbaipublicfiles.com/some/weights.pth")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abcd")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors file"):
        read_checkpoint(bad_st)


def test_not_a_backbone(tmp_path):
    path = tmp_path / "head_only.pth"
    torch.save({"mlp.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight"):
        load_backbone(path)
    path2 = tmp_path / "fsdp_local.pth"
    torch.save({"model": {"student.backbone._flat_param": torch.zeros(10)}, "iteration": 1}, path2)
    with pytest.raises(CheckpointError, match="sharded FSDP"):
        load_backbone(path2)
    path3 = tmp_path / "nested.pth"
    torch.save({"config": {"lr": 1.0}}, path3)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_backbone(path3)


def test_reference_fsdp_rank_checkpoint_is_refused_with_a_pointer(tmp_path):
    """The reference's model_<iter>.rank_<r>.pth holds FSDP1 LOCAL_STATE_DICT flat parameters as ShardedTensor
    objects (written here by a real 1-rank gloo group in a child process): weights_only loading stops at that
    class, and the error must say what the file is, not advise re-saving it."""
    path = tmp_path / "model_0000003.rank_0.pth"
    script = (
        "import os, sys, torch, torch.distributed as dist\n"
        "from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards\n"
        "dist.init_process_group('gloo', init_method='file://' + sys.argv[2], rank=0, world_size=1)\n"
        "st = init_from_local_shards([Shard.from_tensor_and_offsets(torch.randn(10), [0], 0)], 10)\n"
        "torch.save({'model': {'teacher.backbone._fsdp_wrapped_module._flat_param': st}, 'iteration': 3}, sys.argv[1])\n"
        "dist.destroy_process_group()\n")
    import subprocess
    import sys
    # a file store, not a TCP port chosen here: that port could be taken before the child binds it
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "gloo_store")], check=True, timeout=120)
    with pytest.raises(CheckpointError, match=r"model_0000003.rank_0.pth: this is a sharded FSDP training "
                                              r"checkpoint.*teacher_checkpoint.pth"):
        load_backbone(path)


def test_custom_dims_need_num_heads(model, image, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_backbone(path)
    text = str(info.value)  # names the CLI option, the Python keyword and the format that records it
    assert "--num-heads N" in text and "num_heads=N" in text and ".safetensors export" in text
    with pytest.raises(CheckpointError, match="num_heads 3 does not divide embed_dim 64"):
        load_backbone(path, num_heads=3)
    torch.testing.assert_close(load_backbone(path, num_heads=4)(image), model(image), rtol=0, atol=0)


def _dcp_checkpoint_dir(path, iteration):
    """A real torch.distributed.checkpoint directory laid out as checkpoints/iter_<n>/ (+ meta.json) but holding
    no teacher backbone (tests/models/test_dcp_checkpoints.py loads real `celldino train` checkpoints)."""
    import json
    import warnings

    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming ... a single process"
        dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=str(path))
    (path / "meta.json").write_text(json.dumps({"iteration": iteration, "world_size": 1}))
    return path


def test_directories_that_hold_no_backbone_are_clear_errors(model, tmp_path, capsys):
    from celldino.cli import main as celldino

    out = tmp_path / "out"
    ckpt_dir = _dcp_checkpoint_dir(out / "checkpoints" / "iter_00000011", 11)
    with pytest.raises(CheckpointError) as info:
        load_backbone(ckpt_dir)
    text = str(info.value)  # names the directory, what is missing and the keys it found
    assert text.startswith(f"{ckpt_dir}: DCP checkpoint with no teacher backbone")
    assert "train.model.teacher.backbone.*" in text and "'model.w'" in text
    assert celldino(["export", "--checkpoint", str(ckpt_dir), "--output-dir", str(tmp_path / "exp")]) == 1
    err = capsys.readouterr().err
    assert str(ckpt_dir) in err and "no teacher backbone" in err and "not found" not in err
    assert not (tmp_path / "exp").exists()
    # any other directory: what was expected, and the checkpoint files it holds
    teacher = out / "eval" / "training_11" / "teacher_checkpoint.pth"
    teacher.parent.mkdir(parents=True)
    torch.save(FORMATS["teacher_checkpoint"](model), teacher)
    with pytest.raises(CheckpointError, match=f"training_11 is a directory but not a training checkpoint "
                                              f"directory.*holds {teacher}"):
        load_backbone(teacher.parent)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty is a directory but not .* checkpoints/iter_<n>/ directory$"):
        load_backbone(empty)


def test_checkpoint_files_are_not_left_half_written(model, tmp_path):
    from celldino.models.checkpoint import save_pth
    target = tmp_path / "out" / "w.pth"
    save_pth(model.state_dict(), str(target))
    assert os.listdir(target.parent) == ["w.pth"]
