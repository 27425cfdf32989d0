"""Multi-crop augmentation benchmark (no decoding): images/s of the Cell-DINO 2 x 224 + 8 x 96 augmentation of
synthetic 16-bit fields, every provider in the same run on the same images.

Rows (op "augment", items = images, speed-up vs the reference row of the same shape):
  reference        the reference per-crop torchvision composition (benchmarks.bench_data.ReferenceStyleCellAugmentation:
                   whole-image divide / drop / protein scaling per crop, RandomResizedCrop, per-channel loops),
                   1 thread = one dinov2 DataLoader worker (one core).
  celldino_torch   celldino.data.augment.CellAugmentationDINO (crop first, then the pixel ops), 1 thread.
  cpp              celldino._C CPU op, one batch-level call, 1 thread (per-core figure), fp32 and bf16 out.
  cpp_threads      the same with all torch threads.
  cuda             celldino._C CUDA op on uint16 images already on the GPU, bf16 out (speed-up: per GPU vs the
                   reference per core); beside it torch_batched_gpu, the batched grid_sample stand-in of
                   bench_data (the best plain-torch GPU path we have), as the GPU baseline.
Decode + augment (what a data loader really does) is in bench_data.

    python -m benchmarks.run_all augment [--quick] [--augment-images N] [--augment-size S]
"""
import math

import numpy as np
import torch

from . import common
from .bench_data import (GLOBAL_SCALE, GLOBAL_SIZE, LOCAL_SCALE, LOCAL_SIZE, N_LOCAL, ReferenceStyleCellAugmentation,
                         multicrop_torch_batched, sample_multicrop_params, synthetic_field)

NAN = (math.nan, math.nan, math.nan)


def add_arguments(parser):
    parser.add_argument("--augment-images", type=int, default=None,
                        help="images per batch (default 64 on GPU, 4 on CPU)")
    parser.add_argument("--augment-size", type=int, default=None,
                        help="field side in pixels (default 1080 on GPU, 320 on CPU / --quick)")
    parser.add_argument("--augment-channels", type=str, default="4,5", help="channel counts, comma separated")


def _fields(channels, size, n, seed=0):
    return [torch.from_numpy(synthetic_field(np.random.default_rng([seed, channels, i]), channels, size))
            for i in range(n)]


def _timed(fn, rep, threads=None, sync=False):
    """common.bench of fn() (1 warm-up call, `rep` timed; do_bench on the GPU when `sync`) on `threads` torch
    threads (None: as they are)."""
    with common.num_threads(threads):
        return common.bench(fn, warmup=1, rep=rep, device="cuda" if sync else "cpu")


def run(args):
    from celldino.data import fused_augment as fa
    from celldino.data.augment import CellAugmentationDINO

    on_gpu = torch.cuda.is_available()
    quick = getattr(args, "quick", False) or not on_gpu
    n_images = getattr(args, "augment_images", None) or (4 if quick else 64)
    size = getattr(args, "augment_size", None) or (320 if quick else 1080)
    channel_list = [int(c) for c in str(getattr(args, "augment_channels", "4,5") or "4,5").split(",")]
    rep = 3 if quick else 5
    n_ref = min(n_images, 2 if quick else 4)  # the slow reference rows time a subset
    built = fa.extension_available()
    why = "" if built else "skipped: celldino._C not built"
    cpu_threads = torch.get_num_threads()
    rows = []
    for channels in channel_list:
        images = _fields(channels, size, n_images)
        shape = f"{channels}x{size}x{size}"
        params = sample_multicrop_params([tuple(im.shape) for im in images], 1)

        def add(provider, timing, n, baseline_ms, note="", dtype="uint16", device=None):
            rows.append(common.printed_row(
                lambda r: common.rate_line(f"augment {shape} {provider}", r, note),
                "augment", "augment", provider, shape, dtype, "2x224+8x96", timing, items=n or None,
                baseline="reference", baseline_ms=baseline_ms, device=device or "cpu", note=note))

        reference = ReferenceStyleCellAugmentation()
        sub = images[:n_ref]
        t_ref = _timed(lambda: [reference(im) for im in sub], rep, threads=1)  # same runs as every row
        ref_per_image = t_ref[0] / len(sub)
        add("reference", t_ref, len(sub), t_ref[0], "1 thread")
        ours = CellAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, N_LOCAL, GLOBAL_SIZE, LOCAL_SIZE, seed=0)
        t = _timed(lambda: [ours(im) for im in sub], rep, threads=1)
        add("celldino_torch", t, len(sub), ref_per_image * len(sub), "1 thread")

        per_batch_ref = ref_per_image * n_images
        if built:
            for out_dtype in (torch.float32, torch.bfloat16):
                tag = "bf16 out" if out_dtype == torch.bfloat16 else "fp32 out"
                t = _timed(lambda: fa.fused_multicrop(images, params, out_dtype=out_dtype), rep, threads=1)
                add("cpp", t, n_images, per_batch_ref, f"1 thread, {tag}, batch {n_images}")
            t = _timed(lambda: fa.fused_multicrop(images, params, out_dtype=torch.bfloat16), rep, threads=cpu_threads)
            add("cpp_threads", t, n_images, per_batch_ref, f"{cpu_threads} threads, bf16 out, batch {n_images}")
        else:
            add("cpp", NAN, 0, None, why)
            add("cpp_threads", NAN, 0, None, why)

        if not on_gpu:
            add("cuda", NAN, 0, None, "skipped: needs a CUDA GPU")
            add("torch_batched_gpu", NAN, 0, None, "skipped: needs a CUDA GPU")
            continue
        gpu_images = torch.stack(images).cuda()
        t = _timed(lambda: multicrop_torch_batched(gpu_images, params), rep, sync=True)
        add("torch_batched_gpu", t, n_images, per_batch_ref, "batched grid_sample stand-in, fp32 out",
            device="cuda")
        if built and fa.cuda_extension_available():
            gpu_list = list(gpu_images.unbind(0))
            t = _timed(lambda: fa.fused_multicrop(gpu_list, params, out_dtype=torch.bfloat16), rep, sync=True)
            add("cuda", t, n_images, per_batch_ref,
                f"bf16 out, batch {n_images}, params packed + uploaded per call; speed-up per GPU vs reference "
                "per core", device="cuda")
        else:
            add("cuda", NAN, 0, None, why or "skipped: celldino._C built without CUDA", device="cuda")
    return rows
