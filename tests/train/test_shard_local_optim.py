"""The FSDP2 optimizer step and gradient clipping on local shards (celldino.train.optim) against torch's own
DTensor paths and a float64 reference, on gloo ranks: uneven shapes (a shard can be empty), FSDP (Shard) and
HSDP (Replicate x Shard, the ranks along either dimension) layouts."""
import argparse

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from celldino.train import optim
from gloo_ranks import run_on_gloo_ranks

SHAPES = [(7, 5), (3,), (1,), (4, 2, 3), (9,)]  # 1 row on 2 ranks: rank 1's shard is empty


def _mesh_and_placements(layout, world):
    if layout == "fsdp":
        return init_device_mesh("cpu", (world,)), [Shard(0)]
    # hsdp: the ranks shard; hsdp_replicas: the ranks hold replicas (a norm summed over the replicas is too large)
    shape = (1, world) if layout == "hsdp" else (world, 1)
    return init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")), [Replicate(), Shard(0)]


def _sharded(tensors, mesh, placements):
    return [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, placements)) for t in tensors]


def _groups(params):
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.04},
            {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]


def _optimizer_rank(rank, world, layout, kind):
    mesh, placements = _mesh_and_placements(layout, world)
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    ours, theirs = _sharded(values, mesh, placements), _sharded(values, mesh, placements)
    kwargs = {kind: True}  # foreach (the trainer's on CPU) or fused (its CUDA setting; torch has it on CPU too)
    ours_opt = optim.ShardLocalAdamW(_groups(ours), betas=(0.9, 0.999), **kwargs)
    theirs_opt = torch.optim.AdamW(_groups(theirs), betas=(0.9, 0.999), **kwargs)
    for step_grads in grads:
        for params in (ours, theirs):
            for p, g in zip(params, step_grads):
                p.grad = distribute_tensor(g.clone(), mesh, placements)
        ours_opt.step()
        theirs_opt.step()
    same_params = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(ours, theirs))
    same_state = []
    for a, b in zip(ours, theirs):
        sa, sb = ours_opt.state[a], theirs_opt.state[b]
        same_state.append(sorted(sa) == sorted(sb) and torch.equal(sa["step"], sb["step"])
                          and sa["step"].dtype == sb["step"].dtype and sa["step"].device == sb["step"].device
                          and all(isinstance(sa[k], DTensor) and sa[k].placements == sb[k].placements
                                  and torch.equal(sa[k].full_tensor(), sb[k].full_tensor())
                                  for k in ("exp_avg", "exp_avg_sq")))
    return same_params, same_state


@pytest.mark.parametrize("layout,kind", [("fsdp", "foreach"), ("hsdp", "foreach"), ("hsdp_replicas", "foreach"),
                                         ("fsdp", "fused")])
def test_shard_local_adamw_equals_torch_adamw_on_dtensors(tmp_path, layout, kind):
    results = run_on_gloo_ranks(_optimizer_rank, (layout, kind), tmp_path / "store", world=2)
    for rank, (same_params, same_state) in results.items():
        assert same_params, rank
        assert all(same_state), (rank, same_state)


def _built_for_shards(rank, world, cfg):
    mesh, placements = _mesh_and_placements("fsdp", world)
    return type(optim.build_optimizer(cfg, _groups(_sharded([torch.zeros(4)] * 3, mesh, placements)),
                                      torch.device("cpu"))).__name__


def _clip_rank(rank, world, layout, max_norm):
    mesh, placements = _mesh_and_placements(layout, world)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    params = _sharded([torch.zeros(s) for s in SHAPES], mesh, placements)
    for p, g in zip(params, grads):
        p.grad = distribute_tensor(g.clone(), mesh, placements)
    total = optim.clip_grad_norm(params, max_norm)
    expected = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    scale = min(1.0, max_norm / (expected.item() + 1e-6))
    errors = [(p.grad.full_tensor().double() - g.double() * scale).abs().max().item() for p, g in zip(params, grads)]
    return type(total), total.item(), expected.item(), max(errors)


@pytest.mark.parametrize("layout,max_norm", [("fsdp", 1.0), ("hsdp", 1.0), ("hsdp_replicas", 1.0), ("fsdp", 1e6)])
def test_clip_grad_norm_on_shards_matches_float64(tmp_path, layout, max_norm):
    results = run_on_gloo_ranks(_clip_rank, (layout, max_norm), tmp_path / "store", world=2)
    for rank, (total_type, total, expected, error) in results.items():
        assert total_type is torch.Tensor, rank  # a plain tensor, the same on every rank
        assert total == pytest.approx(expected, rel=1e-6), rank
        assert error < 1e-6, (rank, error)


def test_build_optimizer_steps_on_shards_only_for_dtensor_parameters(tmp_path):
    cfg = argparse.Namespace(optim=argparse.Namespace(adamw_beta1=0.9, adamw_beta2=0.999))
    plain = optim.build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(3))]}], torch.device("cpu"))
    assert type(plain) is torch.optim.AdamW
    assert run_on_gloo_ranks(_built_for_shards, (cfg,), tmp_path / "store", world=1) == {0: "ShardLocalAdamW"}
    with pytest.raises(ValueError, match="amsgrad"):
        optim.ShardLocalAdamW([torch.nn.Parameter(torch.zeros(3))], amsgrad=True)


def _scaled_steps(params, opt, scaler, grad, unscale_first):
    """One step through `scaler` with `grad` (x the scale, as a scaled loss's backward leaves it); returns the
    parameter and the step counter after it."""
    scaler.scale(torch.zeros(()))  # as scaler.scale(loss).backward(): the scale initialised
    mesh = getattr(params[0], "device_mesh", None)
    scaled = grad * 8.0
    params[0].grad = distribute_tensor(scaled, mesh, params[0].placements) if mesh is not None else scaled
    if unscale_first:  # the trainer unscales before clipping
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    value = (params[0].full_tensor() if mesh is not None else params[0]).detach().clone()
    return value, opt.state[params[0]]["step"].item()


def _scaled_step_rank(rank, world, unscale_first):
    """Fused steps through the trainer's grad scaler (compute_precision.policy=reference with FSDP2:
    ShardedGradScaler) against torch's fused AdamW through GradScaler on the whole tensors: a step with a non-finite
    gradient (on one rank's shard) is skipped on every rank, and without unscale_ the fused kernel unscales."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    mesh, placements = _mesh_and_placements("fsdp", world)
    good = torch.arange(12.0).view(6, 2) / 10
    bad = good.clone()
    bad[5, 1] = float("inf")  # on the last rank's shard only: found_inf is reduced over the ranks
    ours, expected = [], []
    params = _sharded([torch.ones(6, 2)], mesh, placements)
    opt = optim.ShardLocalAdamW(params, lr=0.1, weight_decay=0.04, fused=True)
    scaler = ShardedGradScaler(device="cpu", init_scale=8.0, growth_interval=100)
    plain = [torch.nn.Parameter(torch.ones(6, 2))]
    torch_opt = torch.optim.AdamW(plain, lr=0.1, weight_decay=0.04, fused=True)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=100)
    for grad in (good, bad, good):
        ours.append(_scaled_steps(params, opt, scaler, grad, unscale_first))
        expected.append(_scaled_steps(plain, torch_opt, torch_scaler, grad, unscale_first))
    return ours, expected


@pytest.mark.parametrize("unscale_first", [True, False])
def test_shard_local_adamw_honours_the_grad_scaler_like_torch(tmp_path, unscale_first):
    results = run_on_gloo_ranks(_scaled_step_rank, (unscale_first,), tmp_path / "store", world=2)
    for rank, (ours, expected) in results.items():
        assert [steps for _, steps in ours] == [1, 1, 2], rank  # the non-finite step skipped, its count too
        assert torch.equal(ours[1][0], ours[0][0]) and torch.isfinite(ours[2][0]).all(), rank
        for (value, steps), (torch_value, torch_steps) in zip(ours, expected):
            assert torch.equal(value, torch_value) and steps == torch_steps, rank
