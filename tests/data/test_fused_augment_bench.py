"""benchmarks/bench_augment.py: a tiny run yields every provider's row; the fused rows are measured (not skipped)
whenever celldino._C is built, and the GPU rows say why they are skipped on a CPU machine. benchmarks/bench_data.py:
with celldino._C missing (made to look so) its rows are skipped with the reason instead of crashing the run, GPU
crops fall back to the torch stand-in unless the CUDA part is built, every row gets the same timed runs (the true
median of common.wall_timing is tested in tests/benchmarks/test_common.py)."""

import argparse
import math

import torch

from benchmarks import bench_augment
from celldino.data import fused_augment as fa


def test_tiny_run_has_every_row():
    parser = argparse.ArgumentParser()
    bench_augment.add_arguments(parser)
    args = parser.parse_args(["--augment-images", "2", "--augment-size", "48", "--augment-channels", "4"])
    args.quick = True
    rows = bench_augment.run(args)
    by_provider = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
    assert set(by_provider) == {"reference", "celldino_torch", "cpp", "cpp_threads", "cuda", "torch_batched_gpu"}
    assert all(r["bench"] == "augment" and r["shape"] == "4x48x48" for r in rows)
    ref = by_provider["reference"][0]
    assert ref["items_per_s"] and ref["speedup_vs_baseline"] == 1.0
    if fa.extension_available():
        for r in by_provider["cpp"] + by_provider["cpp_threads"]:
            assert r["items_per_s"] and r["speedup_vs_baseline"], r
    if not torch.cuda.is_available():
        for r in by_provider["cuda"] + by_provider["torch_batched_gpu"]:
            assert math.isnan(r["median_ms"]) and "skipped" in r["note"]


# ---- bench_data: the rows when celldino._C is missing, the same runs for every row, a true median ---------------------

def _data_args(**extra):
    return argparse.Namespace(quick=True, data_images=2, data_size=64, data_fields="4:none", **extra)


def _without_extension(monkeypatch):
    monkeypatch.setattr(fa, "extension_available", lambda: False)
    monkeypatch.setattr(fa, "cuda_extension_available", lambda: False)


def test_data_bench_without_the_extension_skips_its_rows(monkeypatch):
    from benchmarks import bench_data
    _without_extension(monkeypatch)
    rows = bench_data.run(_data_args())
    by = {r["provider"]: r for r in rows if r["op"] == "decode+augment"}
    for name in ("cpp", "loader+cpp_aug"):
        assert math.isnan(by[name]["median_ms"]) and "skipped: celldino._C not built" in by[name]["note"]
    assert by["reference"]["items_per_s"] and by["celldino_torch"]["speedup_vs_baseline"]
    assert bench_data._fused_multicrop()[0] is None
    crop, name = bench_data._gpu_multicrop()  # GPU crops fall back to the batched torch stand-in, and say so
    assert crop is bench_data.multicrop_torch_batched and "stand-in" in name


def test_data_bench_uses_the_cuda_kernel_only_when_its_cuda_part_is_built(monkeypatch):
    from benchmarks import bench_data
    monkeypatch.setattr(fa, "extension_available", lambda: True)
    monkeypatch.setattr(fa, "cuda_extension_available", lambda: False)  # CPU op built, CUDA part not
    assert bench_data._gpu_multicrop()[0] is bench_data.multicrop_torch_batched
    assert bench_data._fused_multicrop() == (fa.apply_crop_params, None)
    monkeypatch.setattr(fa, "cuda_extension_available", lambda: True)
    crop, name = bench_data._gpu_multicrop()
    assert crop is fa.apply_crop_params and "fused CUDA kernel" in name


def test_data_bench_times_every_row_with_the_same_runs(monkeypatch):
    from benchmarks import bench_data
    reps = []

    def fake_time(fn, rep, sync=False):
        reps.append(rep)
        return (1.0, 1.0, 1.0)

    monkeypatch.setattr(bench_data, "_time", fake_time)
    monkeypatch.setattr(bench_data, "loader_rate", lambda *a, **k: (1.0, 0.0))
    rows = bench_data.run(_data_args())
    timed = [r for r in rows if r["items_per_s"]]
    assert {r["provider"] for r in timed} >= {"tifffile", "reference", "celldino_torch"}
    assert len(reps) >= 3 and len(set(reps)) == 1
