"""Schedules and parameter groups against hand-computed values (reference_spec.md §1.5)."""
import math

import pytest
import torch
from torch import nn

from celldino.config import apply_scaling_rules_to_cfg, load_config
from celldino.train.param_groups import fuse_params_groups, get_params_groups_with_decay
from celldino.train.schedules import CosineScheduler, build_schedulers


def test_cosine_scheduler_warmup_peak_hold_and_tail():
    s = CosineScheduler(base_value=1.0, final_value=0.1, total_iters=14, warmup_iters=4, start_warmup_value=0.0,
                        freeze_iters=2)
    assert [s[i] for i in range(2)] == [0.0, 0.0]                       # frozen
    assert [s[i] for i in range(2, 6)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # linspace(0, 1, 4)
    assert s[6] == pytest.approx(1.0)                                   # cosine starts at the peak: held twice
    n = 14 - 4 - 2
    for j in range(n):
        assert s[6 + j] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * j / n)))
    assert s[14] == 0.1 and s[10_000] == 0.1                            # past the end: final value


def test_cosine_scheduler_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="exceed"):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=6)


def test_fractional_epochs_count_whole_iterations_and_the_run_ends_with_its_schedules(tmp_path):
    """2.5 epochs of 4 iterations = 10 iterations for the run and every schedule (the run length was once truncated
    to 8 while the schedules ran to 10, so training stopped mid-schedule); a product that is not whole is refused."""
    from train_helpers import tiny_cfg
    from celldino.train.trainer import Trainer
    cfg = tiny_cfg("optim.epochs=2.5", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.warmup_epochs=0.5",
                   "evaluation.eval_period_iterations=0")
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        assert trainer.max_iter == 10 == len(trainer.lr_schedule) == len(trainer.momentum_schedule)
        assert trainer.lr_schedule[1] == pytest.approx(trainer.cfg.optim.lr)  # warmup of 2 iterations ends there
    finally:
        trainer.close()
    for key in ("optim.epochs=2.3", "optim.warmup_epochs=0.3", "teacher.warmup_teacher_temp_epochs=0.1",
                "optim.freeze_last_layer_epochs=0.6"):
        with pytest.raises(ValueError, match=f"{key.split('=')[0]}=.* x train.OFFICIAL_EPOCH_LENGTH=4 is .* "
                                             "iterations: expected a whole number"):
            Trainer(tiny_cfg("train.OFFICIAL_EPOCH_LENGTH=4", key), tmp_path / key)


def test_hpaone_schedules_at_chosen_iterations():
    """Derived values of reference_spec §1.2 for 32 GPUs: lr 3.536e-4, warmups of 35,120 iterations."""
    cfg = apply_scaling_rules_to_cfg(load_config("cell_dino/vitl16_hpaone"), world_size=32)
    assert cfg.optim.lr == pytest.approx(5e-4 * math.sqrt(512 / 1024))
    lr, wd, mom, temp, last = build_schedulers(cfg)
    assert len(lr) == 175_600
    assert lr[0] == 0.0 and lr[35_119] == pytest.approx(cfg.optim.lr) and lr[35_120] == pytest.approx(cfg.optim.lr)
    assert lr[175_599] == pytest.approx(1e-6, rel=1e-3)
    assert wd[0] == pytest.approx(0.04) and wd[175_600] == pytest.approx(0.2)
    assert mom[0] == pytest.approx(0.996) and mom[200_000] == 1.0
    assert temp[0] == pytest.approx(0.04) and temp[35_119] == pytest.approx(0.07)
    assert temp[100_000] == pytest.approx(0.07)
    assert temp[17_559] == pytest.approx(0.04 + 0.03 * 17_559 / 35_119)
    assert last[1_755] == 0.0 and last[1_756] == pytest.approx(lr[1_756])


class _FakeViT(nn.Module):
    """Parameter names as a DINOv2 ViT writes them (plain or chunked blocks), without any model code."""

    def __init__(self, depth=4, chunks=0):
        super().__init__()
        names = ["cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed.proj.weight",
                 "patch_embed.proj.bias", "norm.weight", "norm.bias"]
        per_chunk = depth // chunks if chunks else depth
        for i in range(depth):
            prefix = f"blocks.{i // per_chunk}.{i}" if chunks else f"blocks.{i}"
            names += [f"{prefix}.norm1.weight", f"{prefix}.attn.qkv.weight", f"{prefix}.attn.qkv.bias",
                      f"{prefix}.ls1.gamma", f"{prefix}.mlp.fc1.weight"]
        self.params = {n: nn.Parameter(torch.zeros(1)) for n in names}

    def named_parameters(self, *args, **kwargs):  # noqa: D401 - mimic nn.Module
        return iter(self.params.items())


@pytest.mark.parametrize("chunks", [0, 2])
def test_layerwise_decay_and_weight_decay_multipliers(chunks):
    groups = {g["name"]: g for g in get_params_groups_with_decay(_FakeViT(depth=4, chunks=chunks), 0.9, 0.2)}
    L = 4
    assert groups["cls_token"]["lr_multiplier"] == pytest.approx(0.9 ** (L + 1))
    assert groups["pos_embed"]["lr_multiplier"] == pytest.approx(0.9 ** (L + 1))
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.9 ** (L + 1) * 0.2)
    prefix = lambda i: f"blocks.{i // 2}.{i}" if chunks else f"blocks.{i}"  # noqa: E731
    for i in range(L):
        assert groups[f"{prefix(i)}.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9 ** (L - i))
        assert groups[f"{prefix(i)}.attn.qkv.weight"]["wd_multiplier"] == 1.0
        assert groups[f"{prefix(i)}.attn.qkv.bias"]["wd_multiplier"] == 0.0
        assert groups[f"{prefix(i)}.norm1.weight"]["wd_multiplier"] == 0.0
        assert groups[f"{prefix(i)}.ls1.gamma"]["wd_multiplier"] == 0.0
    assert groups["norm.weight"]["lr_multiplier"] == 1.0 and groups["norm.weight"]["wd_multiplier"] == 0.0
    assert not any(g["is_last_layer"] for g in groups.values())


def test_head_groups_have_no_decay_and_flag_last_layer():
    head = nn.ModuleDict({"mlp": nn.Linear(3, 3), "last_layer": nn.Linear(3, 5, bias=False)})
    groups = {g["name"]: g for g in get_params_groups_with_decay(head, 0.9, 0.2)}
    assert all(g["lr_multiplier"] == 1.0 for g in groups.values())
    assert groups["last_layer.weight"]["is_last_layer"] and not groups["mlp.weight"]["is_last_layer"]
    assert groups["mlp.bias"]["wd_multiplier"] == 0.0


def test_fused_groups_partition_every_parameter_once():
    model = _FakeViT(depth=4)
    groups = get_params_groups_with_decay(model, 0.9, 0.2)
    fused = fuse_params_groups(groups)
    assert sum(len(g["params"]) for g in fused) == len(groups)
    keys = {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in fused}
    assert len(keys) == len(fused)
