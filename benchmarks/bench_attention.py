"""Multi-crop attention: the celldino Triton kernel against every way of running the same block-diagonal
attention, same run, same device, same inputs.

Layouts (GPU): the DINOv2 / Cell-DINO student token stream of a per-GPU batch, crop-major as the packed model
forward lays it out ([B x global crop 0, B x global crop 1, B*n_local x local crops]), head dim 64:
  vits16 (6 heads, 2x197 + 8x37, B 64), vitb16 (12 heads, B 32), vitl16 (16 heads, B 16 and 64; Cell-DINO),
  vitl14 (16 heads, 2x257 + 8x50, B 32; DINOv2), vitl14reg (the same + 4 register tokens per crop).
Providers:
  sdpa_per_group  one SDPA call per crop-length group on strided views, outputs concatenated (DINOv3; baseline)
  celldino        celldino.kernels multicrop_attention_triton (packed 128-row tiles; `celldino_t64`: 64 rows)
  varlen          flash-attn's flash_attn_varlen_func if installed, else torch.nn.attention.varlen.varlen_attn
  flex            FlexAttention (compiled) with a block-diagonal BlockMask built once per layout (not timed)
  xformers        memory_efficient_attention + BlockDiagonalMask (DINOv2), if xformers is installed
  padded_sdpa     crops zero-padded to the longest, SDPA with a key-padding mask; padded_eager: matmul+softmax
Modes: fwd, bwd (backward of a retained graph), fwd+bwd. TFLOP/s count the useful block-diagonal work only:
4 * sum(L_i^2) * H * D for fwd, 2.5x that for bwd (flash-attention's convention). Peak memory is the extra CUDA
memory of one fwd+bwd call. Every provider's output is checked against the baseline first (max |diff| in `note`).

    python -m benchmarks.run_all attention                  # CSV -> benchmarks/results/attention.csv
    python -m benchmarks.bench_attention --attn-layouts vitl16 --attn-providers sdpa_per_group celldino varlen
On CPU: a tiny layout, fp32, the torch providers (plus celldino when TRITON_INTERPRET=1 was set before import).
"""
import argparse
import contextlib
import functools

import torch
import torch.nn.functional as F

from . import common

# name -> (heads, global tokens, local tokens, n_local, batches)
LAYOUTS = {
    "vits16": (6, 197, 37, 8, (64,)),
    "vitb16": (12, 197, 37, 8, (32,)),
    "vitl16": (16, 197, 37, 8, (16, 64)),
    "vitl14": (16, 257, 50, 8, (32,)),
    "vitl14reg": (16, 261, 54, 8, (32,)),
}
CPU_LAYOUT = ("tiny", 2, 50, 17, 2, 2)  # name, heads, global, local, n_local, batch
HEAD_DIM = 64
PROVIDERS = ["sdpa_per_group", "celldino", "celldino_t64", "varlen", "flex", "xformers", "padded_sdpa",
             "padded_eager"]
MODES = ["fwd", "bwd", "fwd+bwd"]
PADDED_LIMIT_BYTES = 24 * 2**30  # skip padded providers whose score tensors alone would exceed this


def add_arguments(parser):
    parser.add_argument("--attn-layouts", nargs="*", default=None, help=f"layouts (default all: {list(LAYOUTS)})")
    parser.add_argument("--attn-batches", type=int, nargs="*", default=None, help="images per GPU (overrides)")
    parser.add_argument("--attn-providers", nargs="*", default=None, help=f"providers (default all: {PROVIDERS})")
    parser.add_argument("--attn-dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU")


def crop_lengths(n_global, n_local, global_len, local_len, batch):
    """Crop-major packed layout, as the model's packed forward concatenates the crop lists."""
    return [global_len] * (n_global * batch) + [local_len] * (n_local * batch)


def attention_flops(lengths, heads, head_dim):
    return 4.0 * sum(n * n for n in lengths) * heads * head_dim


def _groups(lengths):
    """(start, count, length) of each run of equal-length consecutive crops."""
    groups, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        groups.append((start, j - i, lengths[i]))
        start += (j - i) * lengths[i]
        i = j
    return groups


def sdpa_per_group(q, k, v, groups):
    """DINOv3's multi-crop attention: one SDPA per crop shape on [crops, heads, L, D] views, then concatenate."""
    outs = []
    for start, count, n in groups:
        end = start + count * n
        qg, kg, vg = (t[start:end].view(count, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(count * n, *q.shape[1:]))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class _Padded:
    """Zero-pad every crop to the longest one; key-padding mask. The gather/scatter copies are part of the cost."""

    def __init__(self, lengths, device):
        self.n, self.lmax = len(lengths), max(lengths)
        starts = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
        pos = torch.arange(self.lmax, device=device)
        valid = pos[None, :] < torch.tensor(lengths, device=device)[:, None]  # [crops, lmax]
        self.valid = valid
        self.flat = (starts[:, None] + pos[None, :])[valid]  # packed token index of every valid padded slot
        self.slot = valid.reshape(-1).nonzero().squeeze(1)
        self.key_mask = valid[:, None, None, :]  # [crops, 1, 1, lmax] broadcast over heads and queries

    def pad(self, t):
        out = t.new_zeros(self.n * self.lmax, *t.shape[1:])
        out = out.index_copy(0, self.slot, t.index_select(0, self.flat))
        return out.view(self.n, self.lmax, *t.shape[1:]).transpose(1, 2)  # [crops, heads, lmax, D]

    def unpad(self, o):  # [crops, heads, lmax, D] -> packed [T, heads, D]
        return o.transpose(1, 2).reshape(self.n * self.lmax, o.shape[1], o.shape[3]).index_select(0, self.slot)

    def sdpa(self, q, k, v):
        return self.unpad(F.scaled_dot_product_attention(self.pad(q), self.pad(k), self.pad(v),
                                                         attn_mask=self.key_mask))

    def eager(self, q, k, v):
        qp, kp, vp = self.pad(q), self.pad(k), self.pad(v)
        scores = (qp @ kp.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        scores = scores.masked_fill(~self.key_mask, float("-inf"))
        return self.unpad(scores.softmax(-1) @ vp)


def _make_providers(names, lengths, heads, device, dtype):
    """name -> callable(q, k, v) for every requested provider that can run here (and why the others cannot)."""
    from celldino.kernels import attention
    made, skipped = {}, {}
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    cu_dev = cu.to(device)
    groups = _groups(lengths)
    on_gpu = device.type == "cuda"
    for name in names:
        try:
            if name == "sdpa_per_group":
                made[name] = functools.partial(sdpa_per_group, groups=groups)
            elif name in ("celldino", "celldino_t64"):
                if not common.triton_kernels_run_on(device):
                    raise RuntimeError(common.TRITON_UNAVAILABLE)
                tile = 64 if name == "celldino_t64" else None
                made[name] = functools.partial(attention.multicrop_attention_triton, cu_seqlens=cu, tile=tile)
            elif name == "varlen":
                if not on_gpu:
                    raise RuntimeError("needs CUDA")
                lmax = max(lengths)
                try:
                    from flash_attn import flash_attn_varlen_func
                    made["varlen"] = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_dev, cu_dev, lmax, lmax)
                    skipped["varlen_impl"] = "flash_attn.flash_attn_varlen_func"
                except ImportError:
                    from torch.nn.attention.varlen import varlen_attn
                    made["varlen"] = lambda q, k, v: varlen_attn(q, k, v, cu_dev, cu_dev, lmax, lmax)
                    skipped["varlen_impl"] = "torch.nn.attention.varlen.varlen_attn (flash-attn not installed)"
            elif name == "flex":
                if not on_gpu:
                    raise RuntimeError("needs CUDA (compiled FlexAttention)")
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                crop = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                               torch.tensor(lengths, device=device))
                total = crop.numel()
                block_mask = create_block_mask(lambda b, h, qi, ki: crop[qi] == crop[ki], None, None, total, total,
                                               device=device)
                # compiled (lazily, at its first call) and called only under provider_context("flex")
                flex = torch.compile(flex_attention, dynamic=False)

                def run_flex(q, k, v, flex=flex, block_mask=block_mask):
                    out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               block_mask=block_mask)
                    return out[0].transpose(0, 1)
                made[name] = run_flex
            elif name == "xformers":
                import xformers.ops as xops
                bias = xops.fmha.BlockDiagonalMask.from_seqlens(lengths)
                made[name] = lambda q, k, v: xops.memory_efficient_attention(q[None], k[None], v[None],
                                                                             attn_bias=bias)[0]
            elif name in ("padded_sdpa", "padded_eager"):
                score_bytes = len(lengths) * heads * max(lengths) ** 2 * torch.finfo(dtype).bits // 8
                if name == "padded_eager" and score_bytes * 3 > PADDED_LIMIT_BYTES:
                    raise RuntimeError(f"padded scores need ~{3 * score_bytes / 2**30:.0f} GiB")
                padded = _Padded(lengths, device)
                made[name] = padded.sdpa if name == "padded_sdpa" else padded.eager
            else:
                raise RuntimeError(f"unknown provider (choose from {PROVIDERS})")
        except Exception as exc:  # noqa: BLE001 - an unavailable baseline is reported, never fatal
            skipped[name] = f"{type(exc).__name__}: {exc}"[:200]
    return made, skipped


def provider_context(name):
    """The settings a provider's compile and calls need, scoped to them (a context manager). FlexAttention: the
    "bwd" timing replays one graph's backward (retain_graph=True), which compiled backward graphs refuse while
    they donate buffers, so buffer donation is off while flex is compiled and timed, and restored afterwards (set
    process-wide it would also cost later benchmarks in the same process, e.g. train, their donation)."""
    if name == "flex":
        import torch._functorch.config as functorch_config
        return functorch_config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def _time_modes(fn, q, k, v, grad_out, device, reps):
    """{mode: common.Timing} and the peak extra memory of one fwd+bwd."""
    def zero_grads():
        for t in (q, k, v):
            t.grad = None

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        zero_grads()
        fn(q, k, v).backward(grad_out)

    fwd_bwd()  # compile / autotune outside the timed region (do_bench sizes its loop from the first calls)
    graph = {"out": fn(q, k, v)}  # one retained graph, replayed by bwd()

    def bwd():
        zero_grads()
        graph["out"].backward(grad_out, retain_graph=True)

    timings = {
        "fwd": common.bench(fwd, device=device, **reps),
        "bwd": common.bench(bwd, device=device, **reps),
        "fwd+bwd": common.bench(fwd_bwd, device=device, **reps),
    }
    graph.clear()  # frees the retained graph
    zero_grads()
    return timings, common.peak_extra_memory_mb(fwd_bwd, device=device)


def _cases(args, on_gpu):
    if not on_gpu or getattr(args, "quick", False):
        name, heads, glen, llen, n_local, batch = CPU_LAYOUT
        return [(name, heads, glen, llen, n_local, batch, 32 if not on_gpu else HEAD_DIM)]
    names = getattr(args, "attn_layouts", None) or list(LAYOUTS)
    cases = []
    for name in names:
        if name not in LAYOUTS:
            raise ValueError(f"--attn-layouts: unknown layout {name!r}; choose from {list(LAYOUTS)}")
        heads, glen, llen, n_local, batches = LAYOUTS[name]
        for batch in getattr(args, "attn_batches", None) or batches:
            cases.append((name, heads, glen, llen, n_local, batch, HEAD_DIM))
    return cases


def run(args):
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        getattr(args, "attn_dtype", None) or ("bf16" if on_gpu else "fp32")]
    names = getattr(args, "attn_providers", None) or PROVIDERS
    if "sdpa_per_group" not in names:
        names = ["sdpa_per_group"] + list(names)  # the baseline of every speed-up
    reps = common.reps_for(device)
    rows = []
    for name, heads, glen, llen, n_local, batch, head_dim in _cases(args, on_gpu):
        lengths = crop_lengths(2, n_local, glen, llen, batch)
        total = sum(lengths)
        shape = f"{name} B{batch} H{heads} D{head_dim} 2x{glen}+{n_local}x{llen} T{total}"
        print(f"  attention {shape} {dtype}", flush=True)
        torch.manual_seed(0)
        # q, k, v as strided views of one qkv projection, the way the model produces them
        qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        q, k, v = (qkv[:, i].detach().requires_grad_() for i in range(3))
        grad_out = torch.randn(total, heads, head_dim, device=device, dtype=dtype)
        made, skipped = _make_providers(names, lengths, heads, device, dtype)
        for prov, why in skipped.items():
            if prov != "varlen_impl":
                print(f"    skip {prov}: {why}", flush=True)
        flops = attention_flops(lengths, heads, head_dim)
        with torch.no_grad():
            expected = made["sdpa_per_group"](q, k, v).float()
        baseline = {}
        for prov, fn in made.items():
            try:
                with provider_context(prov):
                    with torch.no_grad():
                        diff = (fn(q, k, v).float() - expected).abs().max().item()
                    timings, peak = _time_modes(fn, q, k, v, grad_out, device, reps)
            except Exception as exc:  # noqa: BLE001 - keep the other providers' rows
                print(f"    {prov} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            note = f"max|out - sdpa_per_group| {diff:.2e}"
            if prov == "varlen":
                note += f"; {skipped.get('varlen_impl', '')}"
            for mode in MODES:
                mode_flops = flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
                if prov == "sdpa_per_group":
                    baseline[mode] = timings[mode][0]
                rows.append(common.row("attention", "multicrop_attention", prov, shape, dtype, mode, timings[mode],
                                       flops=mode_flops, peak_mem_mb=peak if mode == "fwd+bwd" else None,
                                       baseline="sdpa_per_group", baseline_ms=baseline.get(mode), device=device,
                                       note=note))
            summary = " ".join(f"{m} {timings[m][0]:.3f}ms" for m in MODES)
            print(f"    {prov:15s} {summary}  ({note})", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    rows = run(args)
    print(f"-> {common.write_csv('attention', rows, args.results_dir)}")


if __name__ == "__main__":
    main()
