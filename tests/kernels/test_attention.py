"""Multi-crop attention: Triton kernel (CPU: TRITON_INTERPRET=1, set by tests/conftest.py) and torch reference
against a dense masked float64 attention.

Tolerance rule (DESIGN.md, flash-attention's): |triton - fp64| <= 2 x |same-precision torch reference - fp64| +
a tiny floor, for the output and dq, dk, dv. The same-precision reference is `multicrop_attention_reference`
(SDPA per crop-length group) run in the input dtype.
"""
import numpy as np
import pytest
import torch

from celldino.kernels import _dispatch, attention
from celldino.kernels.attention import (build_tile_table, multicrop_attention, multicrop_attention_reference,
                                        multicrop_attention_triton)
from sm90_lowering import run_lowering_script

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def cu_of(lengths, device="cpu"):
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)


def dense_attention_fp64(q, k, v, lengths, scale=None):
    """Independent ground truth: one [T, T] score matrix, -inf outside the crop blocks, float64 softmax."""
    q, k, v = (t.double() for t in (q, k, v))
    crop = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                   torch.tensor(lengths, device=q.device))
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    scores = scores.masked_fill(crop[:, None] != crop[None, :], float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def assert_within_rule(got, ref_same, ref64, dtype, what):
    err = (got.double() - ref64).abs().max().item()
    bound = 2 * (ref_same.double() - ref64).abs().max().item() + FLOOR[dtype]
    assert err <= bound, f"{what}: |triton - fp64| = {err:.3e} > 2 x |torch - fp64| + floor = {bound:.3e}"


def check_against_fp64(lengths, heads, head_dim, dtype, device="cpu", scale=None, **triton_kwargs):
    total = sum(lengths)
    cu = cu_of(lengths, device)
    q, k, v = (torch.randn(total, heads, head_dim, device=device).to(dtype) for _ in range(3))
    grad_out = torch.randn(total, heads, head_dim, device=device)
    ours = grads(lambda *t: multicrop_attention_triton(*t, cu, scale=scale, **triton_kwargs), (q, k, v), grad_out)
    same = grads(lambda *t: multicrop_attention_reference(*t, cu, scale=scale), (q, k, v), grad_out)
    exact = grads(lambda *t: dense_attention_fp64(*t, lengths, scale=scale), (q, k, v), grad_out)
    assert ours[0].dtype == dtype and ours[0].shape == q.shape
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, same, exact):
        assert torch.isfinite(a).all(), name
        assert_within_rule(a, b, c, dtype, f"{name} lengths={lengths} H={heads} D={head_dim} {dtype}")


# (lengths, heads, head_dim, tile, block_n): tile/block_n are small on the CPU so few tokens exercise everything
CASES = {
    "one-token-crop": ([1], 1, 32, 32, 16),
    "one-crop-straddles-tiles": ([97], 2, 32, 32, 16),
    "short-crops-share-tiles": ([3, 7, 1, 12, 9, 30, 2, 2], 3, 32, 32, 16),
    "mixed-long-and-short": ([37, 5, 1, 50, 97, 20], 2, 40, 32, 16),
    "empty-crop": ([12, 0, 20, 0], 1, 32, 32, 16),
    "dinov2-p16-tile128": ([197, 197, 37, 37, 37, 37], 2, 64, 128, 32),
    "dinov2-p14-registers": ([257 + 4, 50 + 4, 50 + 4], 1, 80, 64, 32),
    "very-long-crop-split-backward": ([9, 200, 3, 30], 2, 32, 32, 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_fp64_within_rule(case, dtype):
    lengths, heads, head_dim, tile, block_n = CASES[case]
    check_against_fp64(lengths, heads, head_dim, dtype, tile=tile, block_n=block_n)


def test_fused_backward_key_tile_smaller_than_packing_tile(monkeypatch):
    """On a GPU the fused backward autotunes its key tile (64 or 128) independently of the 128-row packing tile:
    packed groups then span several key tiles and go through the fp32 dq scratch."""
    monkeypatch.setattr(attention, "_PINNED_BLOCK_K", 16)
    check_against_fp64([3, 7, 1, 12, 9, 30, 40], 2, 32, torch.float32, tile=32, block_n=16)
    check_against_fp64([5, 20], 1, 32, torch.float16, tile=32, block_n=16)


def test_triton_custom_scale_and_default_tile():
    check_against_fp64([50, 37, 37, 5], 2, 32, torch.float32, scale=0.3)


def test_reference_matches_dense_fp64():
    lengths = [37, 1, 50, 37, 0, 9]  # equal-length crops that are not adjacent share one SDPA group
    total, heads, head_dim = sum(lengths), 2, 16
    cu = cu_of(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(total, heads, head_dim, dtype=torch.float64)
    ref = grads(lambda *t: multicrop_attention_reference(*t, cu, scale=0.2), (q, k, v), grad_out)
    dense = grads(lambda *t: dense_attention_fp64(*t, lengths, scale=0.2), (q, k, v), grad_out)
    for a, b in zip(ref, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a crop of one token returns its value row exactly
    torch.testing.assert_close(ref[0][37], v[37], rtol=0, atol=1e-15)


def test_non_contiguous_qkv_views_match_contiguous():
    """The model passes q/k/v as strided views of one qkv Linear output: same bits as contiguous inputs."""
    lengths, heads, head_dim = [20, 37, 5], 2, 32
    total, cu = sum(lengths), cu_of(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, requires_grad=True)
    grad_out = torch.randn(total, heads, head_dim)
    out = multicrop_attention_triton(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, tile=32, block_n=16)
    # non-contiguous incoming gradient as well
    (g_qkv,) = torch.autograd.grad(out, qkv, grad_out.transpose(0, 1).contiguous().transpose(0, 1))
    parts = [qkv[:, i].detach().contiguous().requires_grad_() for i in range(3)]
    out_c = multicrop_attention_triton(*parts, cu, tile=32, block_n=16)
    g_c = torch.autograd.grad(out_c, parts, grad_out)
    assert not qkv[:, 0].is_contiguous()
    assert torch.equal(out, out_c)
    for i in range(3):
        assert torch.equal(g_qkv[:, i], g_c[i])


def test_expanded_grad_and_python_offsets():
    """out.sum() sends a zero-stride gradient; cu_seqlens may be a tuple of ints (the model's compile path)."""
    lengths = [20, 37, 5]
    offsets = (0, 20, 57, 62)
    q, k, v = (torch.randn(62, 2, 32, requires_grad=True) for _ in range(3))
    out = multicrop_attention_triton(q, k, v, offsets, tile=32, block_n=16)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    exact = grads(lambda *t: dense_attention_fp64(*t, lengths), (q, k, v), torch.ones(62, 2, 32))
    same = grads(lambda *t: multicrop_attention_reference(*t, cu_of(lengths)), (q, k, v), torch.ones(62, 2, 32))
    for name, a, b, c in zip(("dq", "dk", "dv"), got, same[1:], exact[1:]):
        assert_within_rule(a, b, c, torch.float32, name)


def test_tile_table_covers_rows_once_and_packs_whole_crops():
    rng = np.random.default_rng(0)
    for tile in (32, 128):
        lengths = [int(x) for x in rng.choice([0, 1, 5, 37, 50, 97, 197, 257, 700], size=40)]
        table = build_tile_table(lengths, tile)
        crop_id = table.crop_id
        starts = np.concatenate([[0], np.cumsum(lengths)])
        total = starts[-1]
        np.testing.assert_array_equal(crop_id, np.repeat(np.arange(len(lengths)), lengths))
        seen = np.zeros(total, dtype=int)
        for row_lo, row_hi, key_lo, key_hi, single in table.tiles:
            assert 0 < row_hi - row_lo <= tile
            seen[row_lo:row_hi] += 1
            first, last = crop_id[row_lo], crop_id[row_hi - 1]
            # keys: exactly the crops the rows belong to
            assert (key_lo, key_hi) == (starts[first], starts[last + 1])
            assert single == (crop_id[key_lo] == crop_id[key_hi - 1])
            if first != last:  # a packed tile holds whole crops only
                assert row_lo == key_lo and row_hi == key_hi and key_hi - key_lo <= tile
        np.testing.assert_array_equal(seen, 1)
        spans = table.tiles[:, 3] - table.tiles[:, 2]
        assert (np.diff(spans) <= 0).all(), "tiles are scheduled longest first"
        # backward: fused groups (crop-closed) + split tiles of very long crops cover every row once
        seen[:] = 0
        for lo, hi in table.groups:
            assert crop_id[lo] != (crop_id[lo - 1] if lo else -1) and (hi == total or crop_id[hi] != crop_id[hi - 1])
            assert hi - lo <= tile or crop_id[lo] == crop_id[hi - 1]
            assert -(-(hi - lo) // tile) <= attention.FUSED_BWD_MAX_TILES
            seen[lo:hi] += 1
        for row_lo, row_hi, key_lo, key_hi, _ in table.long_tiles:
            assert key_hi - key_lo > attention.FUSED_BWD_MAX_TILES * tile
            seen[row_lo:row_hi] += 1
        np.testing.assert_array_equal(seen, 1)
        assert table.max_group == max(hi - lo for lo, hi in table.groups)


def test_tile_table_by_hand():
    # 2 x 197 + 8 x 37 at tile 128: each global crop -> 128 + 69 rows over its 197 keys; locals packed 3 + 3 + 2
    table = build_tile_table([197, 197] + [37] * 8, 128)
    assert [tuple(t) for t in table.tiles] == [
        (0, 128, 0, 197, 1), (128, 197, 0, 197, 1), (197, 325, 197, 394, 1), (325, 394, 197, 394, 1),
        (394, 505, 394, 505, 0), (505, 616, 505, 616, 0), (616, 690, 616, 690, 0)]
    assert [tuple(g) for g in table.groups] == [(0, 197), (197, 394), (394, 505), (505, 616), (616, 690)]
    assert table.long_tiles.shape == (0, 5) and table.max_group == 197
    # a crop of more than FUSED_BWD_MAX_TILES tiles goes to the split backward
    table = build_tile_table([40, 5 * 32 + 1, 7], 32)
    assert [tuple(g) for g in table.groups] == [(0, 40), (201, 208)]
    assert len(table.long_tiles) == 6 and set(table.long_tiles[:, 2:4].ravel()) == {40, 201}


def test_cu_seqlens_cache_follows_tensor_identity_and_version():
    cu = cu_of([3, 4])
    assert attention._lengths(cu) == (3, 4)
    assert attention._lengths(cu) == (3, 4)
    cu[2] = 9  # in-place edit bumps the version: the cached lengths must not be reused
    assert attention._lengths(cu) == (3, 6)
    assert attention._lengths([0, 2, 2, 5]) == (2, 0, 3)
    # tensors made under inference_mode have no version counter: read each time, never cached (they crashed)
    with torch.inference_mode():
        frozen = cu_of([2, 5])
    assert attention._lengths(frozen) == (2, 5) and attention._lengths(frozen) == (2, 5)
    q = torch.randn(7, 1, 16)
    torch.testing.assert_close(multicrop_attention_triton(q, q, q, frozen),
                               multicrop_attention_reference(q, q, q, frozen))


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(10, 1, 16)
    with pytest.raises(ValueError, match="ends at 9"):
        multicrop_attention_triton(q, q, q, cu_of([4, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        multicrop_attention_triton(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim 160"):
        big = torch.randn(10, 1, 160)
        multicrop_attention_triton(big, big, big, cu_of([10]))
    with pytest.raises(ValueError, match="total_tokens, heads, head_dim"):
        multicrop_attention_reference(q[:, 0], q[:, 0], q[:, 0], cu_of([10]))
    for fn in (multicrop_attention_triton, multicrop_attention_reference):  # offsets must be integers
        with pytest.raises(ValueError, match="int32 / int64 tensor"):
            fn(q, q, q, torch.tensor([0.0, 4.5, 10.0]))
        with pytest.raises(ValueError, match="must hold integers"):
            fn(q, q, q, [0, 4.5, 10])
    with pytest.raises(ValueError, match="tile must be a power of 2"):
        multicrop_attention_triton(q, q, q, cu_of([10]), tile=-4)


def test_dispatch_follows_backend(monkeypatch):
    lengths = [5, 7]
    q = torch.randn(12, 1, 16)
    calls = []
    real = attention.multicrop_attention_triton
    monkeypatch.setattr(attention, "multicrop_attention_triton",
                        lambda *a, **kw: calls.append("triton") or real(*a, **kw))
    try:
        _dispatch.set_backend("torch")
        ref = multicrop_attention(q, q, q, cu_of(lengths))
        assert calls == []
        _dispatch.set_backend("triton")  # CPU tensors: allowed because TRITON_INTERPRET=1 (conftest)
        out = multicrop_attention(q, q, q, cu_of(lengths))
        assert calls == ["triton"]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        _dispatch.set_backend("auto")  # CPU tensors -> reference
        multicrop_attention(q, q, q, cu_of(lengths))
        assert calls == ["triton"]
        # auto never sends what the kernel cannot do (fp64) to Triton
        multicrop_attention(q.double(), q.double(), q.double(), cu_of(lengths))
        assert calls == ["triton"]
    finally:
        _dispatch.set_backend(None)


@pytest.mark.parametrize("offsets", ["int32 tensor", "tuple of ints"])
def test_torch_compile_sees_one_opaque_op(offsets, recwarn):
    """fullgraph=True fails on any graph break: the dispatcher and the Triton path must trace into one custom op.
    Offsets given as ints (the model's compiled path) stay ints in the graph: no tensor constant is made from them
    (a CPU constant would keep inductor from capturing CUDA graphs)."""
    lengths = [20, 5, 1]
    cu = cu_of(lengths) if offsets == "int32 tensor" else tuple(cu_of(lengths).tolist())
    q, k, v = (torch.randn(26, 2, 16, requires_grad=True) for _ in range(3))
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    def f(q, k, v):
        return multicrop_attention(q, k, v, cu).square().sum()

    torch._dynamo.reset()
    try:
        _dispatch.set_backend("triton")
        compiled = torch.compile(f, backend=recording_backend, fullgraph=True)
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
        want = torch.autograd.grad(f(q, k, v), (q, k, v))
    finally:
        _dispatch.set_backend(None)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not [w for w in recwarn if "lru_cache" in str(w.message)]
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    assert not [n for n in calls if n.target in (torch.tensor, torch.as_tensor)]
    (op,) = [n for n in calls if "multicrop_attention_fwd" in str(n.target)]
    assert (op.args[3] is None) == (offsets == "tuple of ints")


# inductor with a tuple of ints is plain SDPA to inductor (and the model's compiled CPU block, tested in
# tests/models/test_vit_compile.py): ~20 s of cold C++ compilation that tests nothing of ours here
@pytest.mark.parametrize("compiler,offsets", [("aot_eager", "int32 tensor"), ("aot_eager", "tuple of ints"),
                                              ("inductor", "int32 tensor")])
def test_reference_path_compiles_fullgraph_with_either_offsets_form(compiler, offsets):
    """The CPU (torch) path under torch.compile(fullgraph=True): a tuple of ints is a graph constant, a tensor goes
    through the reference custom op (reading it on the host would break the graph). Same values and gradients."""
    lengths = [20, 0, 5, 20, 1]
    cu = cu_of(lengths) if offsets == "int32 tensor" else tuple(cu_of(lengths).tolist())
    q, k, v = (torch.randn(46, 2, 16) for _ in range(3))
    grad_out = torch.randn(46, 2, 16)
    torch._dynamo.reset()
    try:
        _dispatch.set_backend("torch")
        compiled = torch.compile(lambda *t: multicrop_attention(*t, cu, scale=0.3), backend=compiler, fullgraph=True,
                                 dynamic=False)
        got = grads(compiled, (q, k, v), grad_out)
    finally:
        _dispatch.set_backend(None)
    want = grads(lambda *t: multicrop_attention_reference(*t, cu_of(lengths), scale=0.3), (q, k, v), grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_reference_custom_op_backward_matches_dense(dtype):
    """The reference op's written-out backward: float64 equals the dense float64 attention; fp16 (computed in fp32)
    is within the tolerance rule of autograd through fp16 SDPA."""
    lengths = [37, 1, 0, 9, 37]
    cu = cu_of(lengths)
    q, k, v = (torch.randn(sum(lengths), 2, 16).to(dtype) for _ in range(3))
    grad_out = torch.randn(sum(lengths), 2, 16)
    op = grads(lambda *t: torch.ops.celldino.multicrop_attention_reference(*t, cu, 0.25), (q, k, v), grad_out)
    exact = grads(lambda *t: dense_attention_fp64(*t, lengths, scale=0.25), (q, k, v), grad_out)
    if dtype == torch.float64:
        for a, b in zip(op, exact):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.library.opcheck(attention._reference_op, (*(t.requires_grad_() for t in (q, k, v)), cu, None))
    else:
        same = grads(lambda *t: multicrop_attention_reference(*t, cu, scale=0.25), (q, k, v), grad_out)
        for name, a, b, c in zip(("out", "dq", "dk", "dv"), op, same, exact):
            assert a.dtype == dtype
            assert_within_rule(a, b, c, dtype, name)


def test_custom_op_registration_passes_opcheck():
    lengths = [9, 4]
    q, k, v = (torch.randn(13, 1, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(attention._fwd_op, (q, k, v, cu_of(lengths), [], 0.25, 32, 16))
    torch.library.opcheck(attention._fwd_op, (q, k, v, None, cu_of(lengths).tolist(), 0.25, 32, 16))


# ---------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 40, 128])
def test_gpu_autotuned_matches_fp64_within_rule(dtype, head_dim):
    images = 3
    lengths = ([197, 197] + [37] * 8) * images  # DINOv2 ViT-*/16 student layout
    check_against_fp64(lengths, 6, head_dim, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_registers_and_odd_crops(dtype):
    lengths = [261, 261, 54, 54, 54, 1, 97, 128, 129, 0, 50]
    check_against_fp64(lengths, 4, 64, dtype, device="cuda")
    check_against_fp64(lengths, 4, 64, dtype, device="cuda", tile=64)


@pytest.mark.gpu
def test_gpu_dispatch_auto_uses_triton_and_noncontiguous_views():
    lengths = [197, 37, 37]
    total, cu = sum(lengths), cu_of(lengths, "cuda")
    qkv = torch.randn(total, 3, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = multicrop_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu)
    parts = [qkv[:, i].detach().contiguous().requires_grad_() for i in range(3)]
    out_c = multicrop_attention_triton(*parts, cu)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, grad_out)
    g_c = torch.autograd.grad(out_c, parts, grad_out)
    for i in range(3):
        torch.testing.assert_close(g[:, i], g_c[i], rtol=0, atol=0)


# ---- the GPU code path compiles (CI has no GPU: the interpreter does not lower to PTX) ---------------------------

COMPILE_SCRIPT = r'''
import sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from celldino.kernels import attention as A

def signature(fn, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in ("LSE", "DELTA", "DQ_ACC"):
            sig[name] = "*fp32"
        elif name in ("TILES", "GROUPS", "CROP"):
            sig[name] = "*i32"
        elif name.isupper() and name not in ("HEAD_DIM", "TILE", "BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK_T",
                                             "DOT_PRECISION"):
            sig[name] = "*" + dtype
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name.startswith("stride_") or name in ("n_tiles", "n_heads", "n_groups", "total_tokens"):
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig

n = 0
def compile_all(fn, configs, dtype, consts):
    global n
    for cfg in configs:
        full = {**consts, **cfg.kwargs}
        full = {k: v for k, v in full.items() if k in fn.arg_names}
        triton.compile(ASTSource(fn, signature(fn, dtype), full), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        n += 1

# every autotune config at the shapes that matter (bf16, head_dim 64, 128-row tiles), plus the first config of
# fp16 head_dim 80 (padded to 128) and fp32 (64-row tiles, no TF32)
for dtype, head_dim, tile, configs in (("bf16", 64, 128, None), ("fp16", 80, 128, 1), ("fp32", 64, 64, 1)):
    consts = dict(HEAD_DIM=head_dim, TILE=tile, BLOCK_D=A._block_d(head_dim),
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    for tuned in (A._attn_fwd_tuned, A._attn_bwd_fused_tuned, A._attn_bwd_dkdv_tuned, A._attn_bwd_dq_tuned):
        compile_all(tuned.fn, tuned.configs[:configs], dtype, consts)
    compile_all(A._attn_bwd_delta_kernel, [triton.Config({"BLOCK_T": 64}, num_warps=4)], dtype, consts)
print("compiled", n)
'''


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(attention, "triton"), reason="needs triton")
def test_every_gpu_config_compiles_for_sm90(tmp_path):
    """Lower every autotune config to an sm_90 cubin in a process without TRITON_INTERPRET (no GPU needed)."""
    stdout = run_lowering_script(COMPILE_SCRIPT, tmp_path, timeout=900)
    assert "compiled 39" in stdout, stdout



def test_int_offsets_reuse_their_tile_table_and_are_still_checked():
    """Compiled blocks pass the crop offsets as ints on every call: the second call with the same offsets returns
    the cached table; offsets that do not match q still raise."""
    q = torch.zeros(30, 2, 8)
    first = attention._table_for([0, 7, 30], q, 16)
    assert attention._table_for([0, 7, 30], q, 16) is first
    with pytest.raises(ValueError, match="ends at 29 but q has 30 tokens"):
        attention._table_for([0, 7, 29], q, 16)
    with pytest.raises(ValueError, match="non-decreasing"):
        attention._table_for([0, 9, 7, 30], q, 16)
