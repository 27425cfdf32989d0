"""benchmarks/bench_augment.py: a tiny run yields every provider's row; the fused rows are measured (not skipped)
whenever celldino._C is built, and the GPU rows say why they are skipped on a CPU machine."""

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
