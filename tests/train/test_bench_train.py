"""bench_train runs on CPU (tiny size) and its reference-style trainer optimises the same objective as ours."""
import argparse

import pytest
import torch

from celldino.benchmarks import bench_train


def test_bench_train_rows_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the GPU run is a benchmark, not a test")
    try:
        rows = bench_train.run(argparse.Namespace(quick=True, train_batch=[2], train_steps=2))
    finally:
        torch.set_flush_denormal(False)  # the benchmark turns it on for CPU timing; restore the default
    assert [r["provider"] for r in rows] == ["reference-style", "celldino"]
    for r in rows:
        assert r["bench"] == "train" and r["median_ms"] > 0 and r["items_per_s"] > 0 and r["tflops"] != ""
    assert rows[1]["baseline"] == "reference-style" and rows[1]["speedup_vs_baseline"] > 0


def test_reference_style_step_computes_the_same_loss_at_step_zero():
    """Same weights, same batch: the baseline's hand-written losses equal SSLMetaArch.compute_losses (fp32, CPU)."""
    cfg = bench_train._cfg(argparse.Namespace(quick=True), 4, on_gpu=False)
    cfg.student.drop_path_rate = 0.0
    from celldino.train.ssl_meta_arch import SSLMetaArch
    ref = bench_train.ReferenceStyleStep(cfg, torch.device("cpu"))
    batch = bench_train.make_batch(cfg, torch.device("cpu"), torch.float32)
    torch.manual_seed(int(cfg.train.seed))
    ours = SSLMetaArch(cfg)
    ours.train()
    total, _ = ours.compute_losses(batch, ref.schedules[3][0])
    assert ref.train_step(batch, 0).item() == pytest.approx(total.item(), rel=1e-5)
