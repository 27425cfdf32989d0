"""benchmarks/bench_data.py helpers: the batched GPU multi-crop stand-in equals the plain-torch crop applier, the
reference-style baseline produces the reference's outputs, synthetic fields are reproducible, and a tiny run of
the benchmark yields every row (skipped rows say why)."""

import argparse
import math

import numpy as np
import pytest
import tifffile
import torch

from benchmarks import bench_data
from celldino.data import fused_augment
from celldino.data.crop_params import apply_all_crop_params_torch


@pytest.mark.parametrize("shape", [(5, 301, 257), (4, 64, 90), (1, 50, 50)])
def test_batched_multicrop_matches_per_crop_torch(shape):
    rng = np.random.default_rng(0)
    c, h, w = shape
    images = torch.from_numpy(np.stack([bench_data.synthetic_field(rng, c, max(h, w))[:, :h, :w] for _ in range(3)]))
    images[1, 0] = 7  # a constant channel: normalised to exactly 0 by both
    for seed in range(3):
        params = bench_data.sample_multicrop_params([shape] * 3, seed)
        got_global, got_local = bench_data.multicrop_torch_batched(images, params)
        assert got_global.shape == (6, c, 224, 224) and got_local.shape == (24, c, 96, 96)
        want = apply_all_crop_params_torch([im.to(torch.float32) / 65535 for im in images], params)
        for got, ref in zip(list(got_global) + list(got_local), want):
            # outputs are in std units; the two differ only by float32 rounding of the sampling coordinates
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_reference_style_augmentation_outputs():
    np.random.seed(0)
    torch.manual_seed(0)
    image = torch.from_numpy(bench_data.synthetic_field(np.random.default_rng(1), 5, 260))
    out = bench_data.ReferenceStyleCellAugmentation()(image)
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8
    assert out["global_crops_teacher"] is out["global_crops"] and out["offsets"] == ()
    for crop, size in [(x, 224) for x in out["global_crops"]] + [(x, 96) for x in out["local_crops"]]:
        assert crop.shape == (5, size, size) and crop.dtype == torch.float32
        mean = crop.mean(dim=(1, 2))
        std = crop.std(dim=(1, 2), unbiased=False)
        live = std > 0.5  # channels zeroed by the channel drop stay (near) 0
        assert live.sum() >= 4
        torch.testing.assert_close(mean[live], torch.zeros(int(live.sum())), atol=1e-4, rtol=0)
        torch.testing.assert_close(std[live], torch.ones(int(live.sum())), atol=1e-4, rtol=0)
    assert torch.equal(image, torch.from_numpy(bench_data.synthetic_field(np.random.default_rng(1), 5, 260)))


def test_fields_are_reproducible_and_lossless(tmp_path):
    a = bench_data.write_fields(str(tmp_path), 4, "none", 2, 48, seed=3)
    b = bench_data.write_fields(str(tmp_path), 4, "deflate", 2, 48, seed=3)
    for pa, pb in zip(a, b):
        x, y = tifffile.imread(pa), tifffile.imread(pb)
        assert x.shape == (48, 48, 4) and x.dtype == np.uint16 and np.array_equal(x, y)
        assert torch.equal(bench_data.tifffile_decode(pa), torch.from_numpy(np.moveaxis(x, -1, 0).copy()))
    with tifffile.TiffFile(b[0]) as tf:
        assert tf.pages[0].compression == 8  # deflate
    assert not np.array_equal(tifffile.imread(a[0]), tifffile.imread(a[1]))


def test_tiny_benchmark_run():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    args = parser.parse_args(["--data-images", "2", "--data-size", "64"])
    args.quick = True
    rows = bench_data.run(args)
    providers = {(r["op"], r["provider"]) for r in rows}
    loader = ("decode+augment", "loader+cuda_aug" if torch.cuda.is_available() else "loader+cpp_aug")
    assert providers == {("decode", "tifffile"), ("decode", "dali_cpu"), ("decode", "dali_gpu"),
                         ("decode+augment", "reference"), ("decode+augment", "celldino_torch"),
                         ("decode+augment", "cpp"), ("decode+augment", "dali_gpu+aug"), loader}
    assert len(rows) == 8 * len(bench_data.FIELDS)
    for r in rows:
        assert "failed" not in r["note"], r
        if r["note"].find("skipped") >= 0:
            assert math.isnan(r["median_ms"])
        else:
            assert r["items_per_s"] > 0 and r["speedup_vs_baseline"] > 0
    measured = {(r["op"], r["provider"]) for r in rows if not math.isnan(r["median_ms"])}
    assert {("decode", "tifffile"), ("decode", "dali_cpu"), ("decode+augment", "reference"),
            ("decode+augment", "celldino_torch")} <= measured
    if fused_augment.extension_available() and not torch.cuda.is_available():
        assert loader in measured  # the trainer's own DataLoader stream with the C++ op in its workers
