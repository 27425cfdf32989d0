"""bench_optim times clipping and AdamW on FSDP2 shards, torch's DTensor path (the baseline) against celldino's
shard-local one, on the same parameters in one run; the baseline's clipping is the DTensor computation."""
import argparse

import torch
import torch.distributed as dist

from celldino.benchmarks import bench_optim
from celldino.train import optim


def test_bench_optim_rows_name_both_providers_and_their_speedups():
    rows = bench_optim.run(argparse.Namespace(quick=True))
    assert [(r["op"], r["provider"]) for r in rows] == [
        ("clip", "torch_dtensor"), ("clip", "shard_local"), ("adamw", "torch_dtensor"), ("adamw", "shard_local")]
    for r in rows:
        assert r["bench"] == "optim" and r["median_ms"] > 0 and r["baseline"] == "torch_dtensor"
        assert r["speedup_vs_baseline"] > 0 and "groups" in r["shape"]
    assert not dist.is_initialized()  # its 1-rank group is gone
    assert "depth 4:" in rows[0]["shape"]  # the CPU smoke depth
    assert bench_optim._cfg(argparse.Namespace(quick=True, optim_depth=24), on_gpu=False).student.depth == 24


def test_clipping_through_dtensor_uses_the_norm_of_all_gradients():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    total = optim.clip_grad_norm_through_dtensor(params, 1.0)
    assert total.item() == 5.0
    assert torch.allclose(params[1].grad, torch.tensor([0.0, 0.8]), atol=1e-6)


def _denormals_flushed():
    return (torch.tensor([1e-38]) / 100).item() == 0.0  # 1e-40 is an fp32 denormal


def test_denormals_are_flushed_only_while_a_cpu_benchmark_runs():
    from celldino.benchmarks import common
    seen = []
    with common.cpu_denormals_flushed("cpu"):
        seen.append(_denormals_flushed())
    assert seen == [True] and not _denormals_flushed()
    bench_optim.run(argparse.Namespace(quick=True))
    assert not _denormals_flushed()
