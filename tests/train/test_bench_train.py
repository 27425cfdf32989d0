"""bench_train runs on CPU (tiny size) and its reference-style trainer optimises the same objective as ours."""
import argparse

import pytest
import torch

from celldino.benchmarks import bench_train, step_profile


def test_bench_train_rows_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the GPU run is a benchmark, not a test")
    try:
        rows = bench_train.run(argparse.Namespace(quick=True, train_batch=[2], train_steps=2,
                                                  train_variant=["ac=train.activation_checkpointing=full"]))
    finally:
        torch.set_flush_denormal(False)  # the benchmark turns it on for CPU timing; restore the default
    assert [r["provider"] for r in rows] == ["reference-style", "celldino", "celldino[ac]", "reference-style+data",
                                             "celldino+fused_aug", "celldino+torch_aug"]
    for r in rows:
        assert r["bench"] == "train" and r["median_ms"] > 0 and r["items_per_s"] > 0 and r["tflops"] != ""
    assert [r["op"] for r in rows] == ["ssl_step"] * 3 + ["ssl_step+data"] * 3
    for r in rows[1:3]:
        assert r["baseline"] == "reference-style" and r["speedup_vs_baseline"] > 0
    for r in rows[4:]:
        assert r["baseline"] == "reference-style+data" and r["speedup_vs_baseline"] > 0
        assert "DataLoader workers" in r["note"] and "waits" in r["note"]
    assert "train.activation_checkpointing=full" in rows[2]["note"]


def test_run_overrides_apply_to_every_provider_and_are_noted():
    try:
        rows = bench_train.run(argparse.Namespace(quick=True, train_batch=[2], train_steps=1, train_e2e_steps=0,
                                                  train_overrides="train.activation_checkpointing=full"))
    finally:
        torch.set_flush_denormal(False)
    assert [r["provider"] for r in rows] == ["reference-style", "celldino"]
    assert all("run overrides: train.activation_checkpointing=full" in r["note"] for r in rows)
    args = argparse.Namespace(quick=True, train_overrides="train.activation_checkpointing=full")
    assert bench_train._cfg(args, 2, on_gpu=False).train.activation_checkpointing == "full"
    with pytest.raises(ValueError, match="expected NAME=KEY=VALUE"):
        bench_train._run_overrides(argparse.Namespace(train_overrides="novalue"))


def test_train_variant_parsing():
    assert bench_train.parse_variant("zero3=compute_precision.sharding=zero3,train.fsdp=true") == (
        "zero3", ["compute_precision.sharding=zero3", "train.fsdp=true"])
    for bad in ("noequals", "name=", "=train.fsdp=true", "name=novalue"):
        with pytest.raises(ValueError, match="expected NAME=KEY=VALUE"):
            bench_train.parse_variant(bad)


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


# ---- --train-profile: where the step's time goes -------------------------------------------------------------------

def _read_breakdown(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_profile_writes_trace_table_and_breakdown_per_provider(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the GPU run is a benchmark, not a test")
    import gzip
    import json
    args = argparse.Namespace(quick=True, train_batch=[2], train_steps=1, train_profile=str(tmp_path / "prof"),
                              train_profile_steps=1, train_profile_trace_mb=10.0, train_e2e_steps=0)
    try:
        rows = bench_train.run(args)
    finally:
        torch.set_flush_denormal(False)
    assert [r["provider"] for r in rows] == ["reference-style", "celldino"]  # timed rows still made
    printed = capsys.readouterr().out
    for provider in ("celldino", "reference-style"):
        stem = tmp_path / "prof" / f"{provider}_B2"
        with gzip.open(f"{stem}_trace.json.gz", "rt") as f:
            trace = json.load(f)
        assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in trace["traceEvents"])
        top = open(f"{stem}_top.txt").read()
        assert "Self CPU" in top and "1 profiled step(s) after 1 warm-up" in top
        table = _read_breakdown(f"{stem}_breakdown.csv")
        assert sorted(r["category"] for r in table) == sorted(step_profile.CATEGORY_NAMES)
        assert sum(float(r["percent"]) for r in table) == pytest.approx(100.0, abs=0.05)
        by_cat = {r["category"]: float(r["ms_per_step"]) for r in table}
        assert by_cat["matmul/GEMM"] > 0 and by_cat["attention"] > 0  # a ViT step has both
        assert by_cat["communication"] == 0  # one CPU process: nothing to communicate
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"[train profile] {provider}_B2:"))
        assert line.count("%") == 3


def test_profile_steps_skips_an_oversized_trace_and_attributes_a_matmul_step(tmp_path, capsys):
    """A step that is almost only matmuls: the breakdown says so; a trace over the limit is not written."""
    a = torch.randn(384, 384)

    def step(batch, iteration):
        for _ in range(4):
            batch @ batch
    result = step_profile.profile_steps(step, a, 0, torch.device("cpu"), str(tmp_path), "toy", active=2,
                                        max_trace_mb=1e-9)
    assert not (tmp_path / "toy_trace.json.gz").exists() and "not written" in capsys.readouterr().out
    assert (tmp_path / "toy_top.txt").exists() and not list(tmp_path.glob("*.tmp*"))
    table = {r["category"]: float(r["percent"]) for r in _read_breakdown(tmp_path / "toy_breakdown.csv")}
    assert max(table, key=table.get) == "matmul/GEMM" and table["matmul/GEMM"] > 50
    assert result["breakdown"][0][0] == "matmul/GEMM" and result["wall_ms"] > 0


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
     "cublas", "matmul/GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul/GEMM"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)",
     "matmul/GEMM"),
    ("aten::addmm", "matmul/GEMM"),
    ("triton_tem_fused_mm_0", "matmul/GEMM"),
    ("aten::mkldnn_convolution", "matmul/GEMM"),
    ("_attn_fwd_kernel", "attention"),
    ("_attn_bwd_dkdv_kernel", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>(Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassB_f16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("triton_red_fused_native_layer_norm_0", "triton fused elementwise/norm"),
    ("triton_poi_fused__to_copy_add_gelu_1", "triton fused elementwise/norm"),
    ("_sk_col_pass_kernel", "celldino sinkhorn/koleo"),
    ("_koleo_bwd_kernel", "celldino sinkhorn/koleo"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("c10d::_reduce_scatter_base_", "communication"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>",
     "optimizer/EMA (foreach)"),
    ("aten::_foreach_mul_", "optimizer/EMA (foreach)"),
    ("Memcpy DtoD (Device -> Device)", "copies/memset"),
    ("Memset (Device)", "copies/memset"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copies/memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "eager elementwise/norm/"
     "reduction"),
    ("aten::native_layer_norm", "eager elementwise/norm/reduction"),
    ("ProfilerStep*", "other"),
    ("cudaLaunchKernel", "other"),
])
def test_classify_kernel_names(name, category):
    assert step_profile.classify(name) == category


def test_gpu_breakdown_counts_device_events_once():
    """On a GPU only device-side events count (CPU ops and GPU user annotations would double count)."""
    from types import SimpleNamespace
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(key, device_type, device_us, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us,
                               self_cpu_time_total=5.0, is_user_annotation=annotation)
    events = [ev("aten::mm", cpu, 300.0), ev("nvjet_tst_128x256", cuda, 300.0), ev("_attn_fwd_kernel", cuda, 100.0),
              ev("Memcpy HtoD (Pageable -> Device)", cuda, 100.0), ev("ProfilerStep#2", cuda, 500.0, True)]
    times = step_profile.self_times_us(events, on_gpu=True)
    assert [name for name, _ in times] == ["nvjet_tst_128x256", "_attn_fwd_kernel", "Memcpy HtoD (Pageable -> Device)"]
    table = {c: (ms, pct) for c, ms, pct in step_profile.breakdown(times, n_steps=2)}
    assert table["matmul/GEMM"] == pytest.approx((0.15, 60.0))
    assert table["attention"] == pytest.approx((0.05, 20.0)) and table["copies/memset"] == pytest.approx((0.05, 20.0))
    assert table["other"] == (0.0, 0.0)


# ---- timing logic and partial runs ------------------------------------------------------------------------------------

def test_cuda_step_timing_syncs_once_and_keeps_each_steps_time():
    """The CUDA branch, with fake events on a fake GPU clock: no synchronize between timed steps (the host may run
    ahead), per-step times from consecutive events, so the distribution is kept."""
    clock = {"t": 0.0, "syncs": []}
    durations = iter([9.0, 4.0, 1.0, 3.0, 2.0])  # one warm-up step, then four timed ones (ms)

    class Event:
        def record(self):
            self.t = clock["t"]

        def elapsed_time(self, other):
            return other.t - self.t

    steps_seen = []

    def step(batch, iteration):
        steps_seen.append((iteration, len(clock["syncs"])))
        clock["t"] += next(durations)

    timing = bench_train._time_steps(step, None, 1, 4, torch.device("cuda"), event=Event,
                                     synchronize=lambda: clock["syncs"].append(clock["t"]))
    assert clock["syncs"] == [9.0, 19.0]  # after the warm-up and at the end, never per step
    assert [i for i, _ in steps_seen] == [0, 1, 2, 3, 4] and [n for _, n in steps_seen[1:]] == [1, 1, 1, 1]
    assert tuple(timing) == pytest.approx((2.5, 1.6, 3.4)) and timing.runs == 4


def _run_all_train(tmp_path, **extra):
    from celldino.benchmarks import run_all
    args = argparse.Namespace(names=["train"], quick=True, results_dir=str(tmp_path), no_report=True, train_batch=[2],
                              train_steps=1, **extra)
    try:
        return run_all.main(args)
    finally:
        torch.set_flush_denormal(False)


def _csv(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_stop_in_celldinos_profiling_pass_keeps_its_row(monkeypatch, tmp_path):
    import os
    import signal

    def profile(args, provider, *rest):
        if provider == "celldino":  # a time limit hits the profile of the first provider
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(bench_train, "_profile", profile)
    assert _run_all_train(tmp_path, train_e2e_steps=0) == 1
    rows = _csv(tmp_path / "train.csv")
    assert [r["provider"] for r in rows] == ["celldino"] and float(rows[0]["median_ms"]) > 0
    assert rows[0]["baseline"] == "reference-style" and rows[0]["speedup_vs_baseline"] == ""
    assert rows[0]["note"].endswith("partial run (stopped)")


def test_stop_after_the_first_end_to_end_provider_keeps_its_row(monkeypatch, tmp_path):
    import os
    import signal

    from celldino.benchmarks import train_e2e
    real, calls = train_e2e.time_stream, []

    def time_stream(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second end-to-end provider starts: a time limit stops the run
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train_e2e, "time_stream", time_stream)
    from celldino.data import fused_augment
    assert _run_all_train(tmp_path, train_e2e_steps=1) == 1
    rows = _csv(tmp_path / "train.csv")
    # without celldino._C the fused provider is a skipped row and the torch one is the first measured
    e2e_rows = ["celldino+fused_aug"] + ([] if fused_augment.extension_available() else ["celldino+torch_aug"])
    assert [r["provider"] for r in rows] == ["celldino", "reference-style"] + e2e_rows
    assert float(rows[0]["speedup_vs_baseline"]) > 0  # the step rows were complete before the stop
    e2e = rows[-1]
    assert float(e2e["median_ms"]) > 0 and e2e["speedup_vs_baseline"] == "" and "waits" in e2e["note"]
    assert e2e["note"].endswith("partial run (stopped)")
