"""Activation checkpointing and compile change nothing in the losses; the precision plan follows the config; the
FLOP model used for TFLOP/s and MFU agrees with torch's FlopCounterMode; metrics helpers."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from celldino.train.metrics import SmoothedValue, _linear_flops_per_row, backbone_forward_flops, ssl_step_flops
from celldino.train.parallel import fsdp_shard_size, make_plan
from celldino.train.ssl_meta_arch import SSLMetaArch
from celldino.train.trainer import run_training

from train_helpers import tiny_cfg


def test_activation_checkpointing_modes_give_identical_losses(tmp_path):
    histories = {}
    for mode in ("none", "full", "selective"):
        cfg = tiny_cfg(f"train.activation_checkpointing={mode}", "student.drop_path_rate=0.2", "optim.epochs=1")
        histories[mode] = run_training(cfg, tmp_path / mode)["loss_history"]
    # recomputation replays the same RNG (stochastic depth) and the same ops: bit-identical on CPU
    assert histories["full"] == histories["none"] and histories["selective"] == histories["none"]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    overrides = ("optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2", "student.layerscale=1.0")
    eager = run_training(tiny_cfg(*overrides), tmp_path / "eager")["loss_history"]
    compiled = run_training(tiny_cfg(*overrides, "train.compile=true"), tmp_path / "compiled")["loss_history"]
    for (_, a), (_, b) in zip(compiled, eager):
        assert a == pytest.approx(b, rel=1e-4)


def test_precision_plan():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plan = make_plan(tiny_cfg(), cpu, distributed=False)
    assert not plan.fsdp and not plan.compile and plan.input_dtype == torch.float32 and plan.autocast_dtype is None
    plan = make_plan(tiny_cfg(), cuda, distributed=True)  # auto on a GPU: bf16 params, fp32 reduction, compile
    assert plan.fsdp and plan.compile and not plan.grad_scaler
    assert plan.student["backbone"].param_dtype == torch.bfloat16
    assert plan.student["backbone"].reduce_dtype == torch.float32
    assert plan.student["backbone"].reshard_after_forward is False  # reference SHARD_GRAD_OP = ZeRO-2
    assert plan.teacher["backbone"].reshard_after_forward is True   # forward only
    ref = make_plan(tiny_cfg("compute_precision.policy=reference"), cuda, distributed=True)
    assert ref.grad_scaler and ref.student["backbone"].param_dtype == torch.float16
    assert ref.student["backbone"].reduce_dtype == torch.float16
    assert ref.student["dino_head"].reduce_dtype == torch.float32  # the reference's fp32 head reduction
    z3 = make_plan(tiny_cfg("compute_precision.sharding=zero3"), cuda, distributed=True)
    assert z3.student["backbone"].reshard_after_forward is True
    plain_bf16 = make_plan(tiny_cfg("compute_precision.policy=bf16"), cpu, distributed=False)
    assert plain_bf16.autocast_dtype == torch.bfloat16  # unsharded: autocast instead of FSDP mixed precision
    with pytest.raises(ValueError, match="policy"):
        make_plan(tiny_cfg("compute_precision.policy=fp8"), cpu, distributed=False)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        make_plan(tiny_cfg("train.activation_checkpointing=some"), cpu, distributed=False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        make_plan(tiny_cfg("compute_precision.policy=reference"), cpu, distributed=False)
    # one unsharded process has one autocast dtype: per-module param dtypes that differ need FSDP
    with pytest.raises(ValueError, match=r"\['teacher.dino_head'\] ask for another dtype"):
        make_plan(tiny_cfg("compute_precision.policy=reference",
                           "compute_precision.teacher.dino_head.mixed_precision.param_dtype=fp32"), cuda,
                  distributed=False)
    with pytest.raises(ValueError, match=r"\['student.ibot_head'\] ask for another dtype"):  # fp32 backbone too
        make_plan(tiny_cfg("compute_precision.policy=reference",
                           "compute_precision.student.backbone.mixed_precision.param_dtype=fp32",
                           "compute_precision.student.dino_head.mixed_precision.param_dtype=fp32",
                           "compute_precision.teacher.backbone.mixed_precision.param_dtype=fp32",
                           "compute_precision.teacher.dino_head.mixed_precision.param_dtype=fp32",
                           "compute_precision.teacher.ibot_head.mixed_precision.param_dtype=fp32"), cuda,
                  distributed=False)
    for value in ("null", "0", "1.5"):  # a number of blocks, naming the key (null was a TypeError traceback)
        with pytest.raises(ValueError, match="train.fsdp_blocks_per_unit: expected a whole number >= 1"):
            make_plan(tiny_cfg(f"train.fsdp_blocks_per_unit={value}"), cpu, distributed=False)
    # FSDP2 keeps buffers in fp32: another reference buffer_dtype is refused rather than ignored
    with pytest.raises(ValueError, match="student.dino_head.mixed_precision.buffer_dtype: only fp32"):
        make_plan(tiny_cfg("compute_precision.policy=reference",
                           "compute_precision.student.dino_head.mixed_precision.buffer_dtype=fp16"), cuda,
                  distributed=False)


def test_flop_model_matches_flop_counter():
    cfg = tiny_cfg("student.num_register_tokens=2")
    model = SSLMetaArch(cfg).eval()
    backbone = model.teacher.backbone
    x = torch.randn(3, 1, 32, 32)
    with FlopCounterMode(display=False) as counter:
        backbone.forward_features(x)
    ours, tokens = backbone_forward_flops(backbone, 3, 32)
    n = 16 + 1 + 2
    assert tokens == 3 * n
    attention = 4 * n * n * 32 * 2 * 3  # QK^T and AV per crop and block (SDPA on CPU is not counted by torch)
    assert ours == counter.get_total_flops() + attention
    rows = torch.randn(7, 32)
    with FlopCounterMode(display=False) as counter:
        model.teacher.dino_head(rows)
    assert 7 * _linear_flops_per_row(model.teacher.dino_head) == counter.get_total_flops()
    step, student_tokens = ssl_step_flops(model, cfg, batch_size=4, n_masked=10)
    g, gt = backbone_forward_flops(backbone, 8, 32)
    loc, lt = backbone_forward_flops(backbone, 8, 16)
    head = _linear_flops_per_row(model.student.dino_head)
    assert step == 3 * (g + loc + head * (16 + 10)) + g + head * (8 + 10)
    assert student_tokens == gt + lt


def test_smoothed_value_median_is_the_lower_middle_like_torch():
    meter = SmoothedValue(window_size=4)
    for v in (5, 1, 4, 2, 3):
        meter.update(v)
    assert list(meter.window) == [1.0, 4.0, 2.0, 3.0]
    assert meter.median == torch.tensor([1.0, 4.0, 2.0, 3.0]).median().item() == 2.0
    assert meter.avg == 2.5 and meter.global_avg == 3.0


def test_fsdp_setting_one_process(tmp_path, monkeypatch):
    """train.fsdp: auto and false train one process unsharded; true shards it over a 1-rank (gloo) group with the
    same fp32 losses; false with several processes is refused before any group is made."""
    from torch.distributed.fsdp import FSDPModule

    from celldino.train import distributed
    from celldino.train.trainer import Trainer

    overrides = ("optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=3")
    histories = {}
    for setting in ("auto", "false", "true"):
        trainer = Trainer(tiny_cfg(*overrides, f"train.fsdp={setting}"), tmp_path / setting)
        try:
            sharded = any(isinstance(m, FSDPModule) for m in trainer.model.modules())
            assert sharded == (setting == "true") and distributed.is_initialized() == (setting == "true")
            histories[setting] = trainer.run()["loss_history"]
        finally:
            trainer.close()
    assert histories["false"] == histories["auto"]
    for (_, a), (_, b) in zip(histories["true"], histories["auto"]):
        assert a == pytest.approx(b, rel=1e-5)

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="train.fsdp=false runs one process only"):
        Trainer(tiny_cfg(*overrides, "train.fsdp=false"), tmp_path / "refused")
    assert not distributed.is_initialized()


def test_compile_mode_reaches_every_block(monkeypatch):
    """train.compile_mode is validated and passed to each block's compile (default -> torch's default mode)."""
    from celldino.train import parallel

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw.get("mode")))
    for mode, expected in (("default", None), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")):
        seen.clear()
        cfg = tiny_cfg("train.compile=true", f"train.compile_mode={mode}")
        plan = make_plan(cfg, torch.device("cpu"), distributed=False)
        parallel.parallelize(SSLMetaArch(cfg), plan, torch.device("cpu"))
        assert seen == [expected] * 4  # 2 student + 2 teacher blocks
    with pytest.raises(ValueError, match="train.compile_mode: expected one of"):
        make_plan(tiny_cfg("train.compile_mode=fast"), torch.device("cpu"), distributed=False)


def test_fsdp_shard_size_follows_the_reference_strategies():
    """train.fsdp_shard_size=auto maps the reference's FSDP1 strategies onto the mesh: HYBRID_SHARD and
    _HYBRID_SHARD_ZERO2 shard within a node (LOCAL_WORLD_SIZE ranks), NO_SHARD replicates (1), the others shard
    over every rank; compute_precision.sharding=zero2/zero3 and an explicit size take precedence; sizes that do not
    divide the world and mixed strategies are refused, naming the key."""
    def every(strategy):
        return [f"compute_precision.{role}.{name}.sharding_strategy={strategy}"
                for role in ("student", "teacher") for name in ("backbone", "dino_head", "ibot_head")]
    assert fsdp_shard_size(tiny_cfg(), 16, 8) == 16
    assert fsdp_shard_size(tiny_cfg(*every("HYBRID_SHARD")), 16, 8) == 8
    assert fsdp_shard_size(tiny_cfg(*every("_HYBRID_SHARD_ZERO2")), 16, 8) == 8
    assert fsdp_shard_size(tiny_cfg(*every("NO_SHARD")), 16, 8) == 1
    assert fsdp_shard_size(tiny_cfg(*every("FULL_SHARD")), 16, 8) == 16
    assert fsdp_shard_size(tiny_cfg(*every("HYBRID_SHARD"), "compute_precision.sharding=zero3"), 16, 8) == 16
    assert fsdp_shard_size(tiny_cfg("train.fsdp_shard_size=4"), 16, 8) == 4
    with pytest.raises(ValueError, match="train.fsdp_shard_size: 3 ranks per shard group do not divide the 16"):
        fsdp_shard_size(tiny_cfg("train.fsdp_shard_size=3"), 16, 8)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=6"):
        fsdp_shard_size(tiny_cfg(*every("HYBRID_SHARD")), 16, 6)
    for word in ("node", "true", "2.5", "0"):  # int() would have made true 1 (replicate everywhere) and 2.5 2
        with pytest.raises(ValueError, match="train.fsdp_shard_size: expected auto or a number"):
            fsdp_shard_size(tiny_cfg(f"train.fsdp_shard_size={word}"), 16, 8)
    mixed = every("SHARD_GRAD_OP")[:-1] + ["compute_precision.teacher.ibot_head.sharding_strategy=NO_SHARD"]
    with pytest.raises(ValueError, match="make them agree or set train.fsdp_shard_size"):
        fsdp_shard_size(tiny_cfg(*mixed), 16, 8)


def test_a_bare_cuda_device_gets_the_current_index(monkeypatch):
    """init_process_group refuses device_id=cuda without an index (a benchmark passed one): init adds it."""
    from celldino.train import distributed
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.with_index("cuda") == torch.device("cuda", 3)
    assert distributed.with_index(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert distributed.with_index("cpu") == torch.device("cpu")
