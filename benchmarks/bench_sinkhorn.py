"""Sinkhorn-Knopp teacher targets: streamed Triton kernel vs the DINOv2 torch algorithm, same run, same device.

Shapes (GPU): DINO CLS rows = 2B crops (B = 32 and 64 per GPU) and iBOT masked patches (~2.5k rows) with
K = 65536 (Cell-DINO) and 131072 (DINOv2 ViT-L/14), bf16 and fp32 logits, 3 iterations.
Providers: `dinov2` (the reference code as written: fp32 copy, exp, ~10 full passes per iteration; the baseline),
`torch_ref` (celldino.kernels.sinkhorn_knopp_reference: the same with the max shift), `triton` (streamed kernel).
GB/s counts the streamed kernel's traffic for every provider ((2n+1) reads of the logits in their dtype + one fp32
write), so the triton figure is its achieved bandwidth and the others are effective rates. Peak memory is the extra
CUDA memory of one call, output included.

    python -m benchmarks.run_all sinkhorn          # CSV -> benchmarks/results/sinkhorn.csv
"""
import torch

from . import common

N_ITER = 3
TEMP = 0.07


def add_arguments(parser):
    parser.add_argument("--sinkhorn-k", type=int, nargs="*", default=None, help="prototype counts (GPU default "
                        "65536 131072)")


@torch.no_grad()
def dinov2_sinkhorn(teacher_output, teacher_temp, n_iterations=N_ITER):
    """The DINOv2 `sinkhorn_knopp_teacher` algorithm (single process), reproduced from reference_spec.md §5.3."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def _shapes(args, on_gpu):
    if not on_gpu or getattr(args, "quick", False):
        return [("dino_cls", 32, 256), ("ibot", 120, 256)], [torch.float32]  # smoke sizes (interpreter-friendly)
    ks = getattr(args, "sinkhorn_k", None) or [65536, 131072]
    shapes = []
    for K in ks:
        shapes += [("dino_cls", 64, K), ("dino_cls", 128, K), ("ibot", 2500, K)]
    return shapes, [torch.bfloat16, torch.float32]


def _providers(device):
    from celldino.kernels import sinkhorn as sk
    references = [("dinov2", dinov2_sinkhorn), ("torch_ref", sk.sinkhorn_knopp_reference)]
    return common.with_triton_provider(references, sk.sinkhorn_knopp_triton, device)


def _call(fn, logits):
    """One timed call of provider `fn`: the targets of `logits` (the benchmark's temperature and iterations)."""
    return lambda: fn(logits, TEMP, N_ITER)


def run(args):
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes, dtypes = _shapes(args, on_gpu)
    providers, note = _providers(device)
    rows = []
    for op, n_rows, K in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            # teacher head outputs: cosine-like logits (weight-normalised last layer), scaled to a sharp softmax
            logits = (torch.randn(n_rows, K, device=device) * 0.3).to(dtype)
            traffic = (2 * N_ITER + 1) * logits.numel() * logits.element_size() + logits.numel() * 4
            rows += common.time_providers(
                f"sinkhorn {op} {n_rows}x{K} {dtype}", providers, lambda fn: _call(fn, logits), device,
                bench_name="sinkhorn", op=op, shape=f"{n_rows}x{K}", dtype=dtype, mode="fwd", baseline="dinov2",
                bytes_moved=traffic, note=note)
    return rows
