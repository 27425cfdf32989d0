"""KoLeo micro-benchmark: fused Triton forward/backward vs the reference torch code, same run, same device.

KoLeo is launch-bound at the Cell-DINO batch (16 per GPU): these rows are a micro-benchmark, not an end-to-end
claim (anchors.md §A4). Shapes (GPU): B in 16..4096, D in 384..2048, fp32 and bf16, modes fwd and fwd+bwd.
Providers: `reference` (celldino.kernels.koleo_loss_reference, the DINOv2 code; the baseline) and `triton`.
TFLOP/s counts the x x^T matmul (2 B^2 D) for fwd and the same for fwd+bwd (the backward is O(B D)).

    python -m benchmarks.run_all koleo             # CSV -> benchmarks/results/koleo.csv
"""
import torch

from . import common


def add_arguments(parser):
    parser.add_argument("--koleo-batch", type=int, nargs="*", default=None, help="batch sizes (GPU default "
                        "16 64 256 1024 4096)")


def _shapes(args, on_gpu):
    if not on_gpu or getattr(args, "quick", False):
        return [(16, 384), (48, 128)], [torch.float32]  # smoke sizes (interpreter-friendly)
    batches = getattr(args, "koleo_batch", None) or [16, 64, 256, 1024, 4096]
    shapes = [(b, d) for b in batches for d in (384, 1024, 2048)]
    return shapes, [torch.float32, torch.bfloat16]


def _providers(device):
    from celldino.kernels import koleo as ko
    return common.with_triton_provider([("reference", ko.koleo_loss_reference)], ko.koleo_loss_triton, device)


def _call(fn, x, mode):
    """One timed call of provider `fn` on x: the loss alone (fwd), or the loss and its gradient (fwd+bwd)."""
    if mode == "fwd":
        return lambda: fn(x.detach())

    def fwd_bwd():
        x.grad = None
        fn(x).backward()
    return fwd_bwd


def run(args):
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes, dtypes = _shapes(args, on_gpu)
    providers, note = _providers(device)
    rows = []
    for B, D in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            x = torch.randn(B, D, device=device).to(dtype).requires_grad_(True)
            for mode in ("fwd", "fwd+bwd"):
                rows += common.time_providers(
                    f"koleo {B}x{D} {dtype} {mode}", providers, lambda fn: _call(fn, x, mode), device,
                    bench_name="koleo", op="koleo", shape=f"{B}x{D}", dtype=dtype, mode=mode, baseline="reference",
                    flops=2.0 * B * B * D, note=note)
    return rows
