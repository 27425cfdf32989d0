"""Streamed Sinkhorn-Knopp kernel against the DINOv2 algorithm re-computed in float64 (reference_spec.md §5.3).

Tolerance rule (DESIGN.md): |kernel - fp64| <= 2 x |fp32 torch reference - fp64| + a tiny floor, where the fp32
torch reference is the DINOv2 algorithm run literally in fp32 (no max subtraction) on the same inputs.
On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py).
"""

import pytest
import torch

from celldino import kernels
from celldino.kernels import sinkhorn as sk
from gloo_ranks import run_on_gloo_ranks
from sm90_lowering import run_lowering_script

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dinov2_sinkhorn(logits, temp, n_iter=3, n_rows=None, dtype=torch.float64):
    """DINOv2's `sinkhorn_knopp_teacher`, written from the spec, in `dtype` and without any max subtraction."""
    Q = torch.exp(logits.to(dtype) / temp).t()
    K, B = Q.shape
    B = float(n_rows or B)
    Q = Q / Q.sum()
    for _ in range(n_iter):
        Q = Q / Q.sum(1, keepdim=True) / K
        Q = Q / Q.sum(0, keepdim=True) / B
    return (Q * B).t()


def assert_tolerance_rule(got, logits, temp, n_iter=3, n_rows=None, expected=None, same_precision=None):
    expected = dinov2_sinkhorn(logits, temp, n_iter, n_rows) if expected is None else expected
    if same_precision is None:
        same_precision = dinov2_sinkhorn(logits, temp, n_iter, n_rows, dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    assert torch.isfinite(got).all()
    err = (got.double() - expected).abs().max().item()
    ref_err = (same_precision.double() - expected).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert err <= 2 * ref_err + floor, f"kernel error {err:.3g} vs fp32 reference error {ref_err:.3g}"


SHAPES = [(1, 7), (5, 33), (13, 101), (37, 257), (64, 96), (97, 50)]


@pytest.mark.parametrize("rows,K", SHAPES)
@pytest.mark.parametrize("temp", [0.07, 0.1])
def test_matches_dinov2_algorithm_in_float64(rows, K, temp):
    # clamped so t / T <= 4 / 0.07 = 57: exp() and the global sum of the fp32 reference stay finite for any seed
    # (unclamped, a 4-sigma draw among 37 x 257 logits overflows it to NaN and the tolerance rule means nothing)
    logits = (torch.randn(rows, K, device=DEVICE) * 1.5).clamp(-4, 4)
    got = sk.sinkhorn_knopp_triton(logits, temp)
    assert_tolerance_rule(got, logits, temp)


@pytest.mark.parametrize("n_iter", [0, 1, 2, 5])
def test_iteration_counts_and_global_row_count(n_iter):
    """n_rows is the GLOBAL row count (iBOT: all-reduced masked patches); with 0 iterations it scales the output."""
    logits = torch.randn(19, 45, device=DEVICE)
    for n_rows in (None, 57):
        got = sk.sinkhorn_knopp_triton(logits, 0.1, n_iterations=n_iter, n_rows=n_rows)
        assert_tolerance_rule(got, logits, 0.1, n_iter, n_rows)


def test_rows_sum_to_one_and_prototype_marginals_converge():
    rows, K = 24, 60
    logits = torch.randn(rows, K, device=DEVICE)
    targets = sk.sinkhorn_knopp_triton(logits, 0.1, n_iterations=3)
    assert torch.allclose(targets.sum(1), torch.ones(rows, device=DEVICE), atol=1e-5)
    # 3 iterations: the prototype marginals are those of the float64 algorithm (not yet uniform)
    expected_marginal = dinov2_sinkhorn(logits, 0.1).sum(0)
    assert torch.allclose(targets.sum(0).double(), expected_marginal, rtol=1e-5)
    # many iterations: every prototype gets rows / K of the mass, every row still sums to 1
    targets = sk.sinkhorn_knopp_triton(logits, 0.5, n_iterations=40)  # soft enough to converge in 40 steps
    assert torch.allclose(targets.sum(0), torch.full((K,), rows / K, device=DEVICE), rtol=1e-3)
    assert torch.allclose(targets.sum(1), torch.ones(rows, device=DEVICE), atol=1e-5)


def test_low_temperature_large_logits_do_not_overflow():
    """At T=0.04 logits above ~3.5 overflow exp() in fp32: the DINOv2 code returns NaN, we match float64."""
    logits = torch.randn(23, 77, device=DEVICE) * 0.4 + 8  # t / T up to ~240
    assert torch.isnan(dinov2_sinkhorn(logits, 0.04, dtype=torch.float32)).all()  # the reference fails here
    got = sk.sinkhorn_knopp_triton(logits, 0.04)
    expected = dinov2_sinkhorn(logits, 0.04)  # float64: exp(240) is representable
    # fp32 reference of the same algorithm, made safe by the (exactly equivalent) global-max shift
    shifted = dinov2_sinkhorn(logits - logits.max(), 0.04, dtype=torch.float32)
    assert_tolerance_rule(got, logits, 0.04, expected=expected, same_precision=shifted)


def test_prototype_shift_survives_where_a_global_shift_underflows():
    """Prototypes whose logits sit far below the global max: exp((t - global max) / 0.04) is 0 for a whole column
    and the global-max version divides 0 by 0. The per-prototype shift is exactly equivalent and stays finite."""
    rows, K = 16, 40
    offsets = torch.linspace(0, 12, K, device=DEVICE)  # per-prototype biases spanning 300 x T
    logits = torch.randn(rows, K, device=DEVICE) * 0.2 + offsets
    assert torch.isnan(dinov2_sinkhorn(logits - logits.max(), 0.04, dtype=torch.float32)).any()
    got = sk.sinkhorn_knopp_triton(logits, 0.04)
    shifted = dinov2_sinkhorn(logits - logits.amax(0), 0.04, dtype=torch.float32)
    assert_tolerance_rule(got, logits, 0.04, same_precision=shifted)
    # the torch reference of this module uses the same shift and is finite too
    assert torch.allclose(sk.sinkhorn_knopp_reference(logits, 0.04), got, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rows,K", [(13, 101), (40, 64)])
def test_fp16_logits_are_read_in_their_own_dtype(rows, K):
    logits = (torch.randn(rows, K, device=DEVICE) * 1.5).half()
    got = sk.sinkhorn_knopp_triton(logits, 0.07)
    assert_tolerance_rule(got, logits, 0.07)  # both references start from the exact fp16 values


def test_strided_input_and_reference_agree():
    base = torch.randn(60, 30, device=DEVICE)
    logits = base.t()  # [30, 60] with a non-unit last stride
    got = sk.sinkhorn_knopp_triton(logits, 0.1)
    assert_tolerance_rule(got, logits, 0.1)
    assert torch.allclose(sk.sinkhorn_knopp_reference(logits, 0.1), got, rtol=1e-5, atol=1e-8)


def test_dispatcher_follows_the_backend_switch():
    logits = torch.randn(9, 21, device=DEVICE)
    try:
        kernels.set_backend("triton")
        assert torch.equal(kernels.sinkhorn_knopp(logits, 0.1), sk.sinkhorn_knopp_triton(logits, 0.1))
        # float64 has no kernel: the reference takes it even when Triton is forced
        assert torch.equal(kernels.sinkhorn_knopp(logits.double(), 0.1), sk.sinkhorn_knopp_reference(logits, 0.1))
        kernels.set_backend("torch")
        assert torch.equal(kernels.sinkhorn_knopp(logits, 0.1), sk.sinkhorn_knopp_reference(logits, 0.1))
    finally:
        kernels.set_backend(None)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="rows, K"):
        sk.sinkhorn_knopp_triton(torch.randn(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        sk.sinkhorn_knopp_triton(torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sk.sinkhorn_knopp_reference(torch.randn(2, 3), 0.1, n_iterations=-1)
    for fn in (sk.sinkhorn_knopp_triton, sk.sinkhorn_knopp_reference):
        with pytest.raises(ValueError, match="temperature must be finite"):
            fn(torch.randn(2, 3), float("inf"))
        with pytest.raises(ValueError, match="n_rows"):
            fn(torch.randn(2, 3), 0.1, n_rows=-1)
        with pytest.raises(ValueError, match="n_rows"):
            fn(torch.randn(2, 3), 0.1, n_rows=0)  # fewer global rows than this rank holds
        with pytest.raises(ValueError, match="K >= 1"):
            fn(torch.randn(2, 0), 0.1)


def test_no_rows_anywhere_gives_an_empty_result():
    """iBOT with no masked patch on any rank calls it with 0 rows and n_rows=0 (the Triton path divided by B)."""
    for fn in (sk.sinkhorn_knopp_triton, sk.sinkhorn_knopp_reference):
        for n_rows in (None, 0):
            out = fn(torch.randn(0, 7), 0.07, n_rows=n_rows)
            assert out.shape == (0, 7) and out.dtype == torch.float32


# ---- distributed: 2 gloo processes, rows sharded, equal to one process on the concatenated rows ---------------

def _rank_targets(rank, world, logits, splits):
    results = {}
    local_even = logits.chunk(world)[rank]
    local_uneven = torch.split(logits, splits)[rank]
    for name, fn in (("triton", sk.sinkhorn_knopp_triton), ("torch", sk.sinkhorn_knopp_reference)):
        results[name, "dino"] = fn(local_even, 0.07)  # default n_rows = rows_local x world
        results[name, "ibot"] = fn(local_uneven, 0.07, n_rows=sum(splits))
        results[name, "n0"] = fn(local_uneven, 0.07, n_iterations=0, n_rows=sum(splits))
        results[name, "cold"] = fn(local_even * 4, 0.04)  # t/T up to ~500: needs the all-reduced shift
        results[name, "empty"] = fn(torch.split(logits, [0, len(logits)])[rank], 0.07, n_rows=len(logits))
    return results


@pytest.mark.distributed
def test_two_gloo_ranks_equal_single_process_on_concatenated_rows(tmp_path):
    logits = torch.randn(8, 37) * 1.5
    splits = [3, 5]  # uneven masked-patch counts per rank (iBOT)
    results = run_on_gloo_ranks(_rank_targets, (logits, splits), tmp_path / "gloo_store")
    single = {
        "dino": sk.sinkhorn_knopp_triton(logits, 0.07),
        "ibot": sk.sinkhorn_knopp_triton(logits, 0.07),
        "n0": sk.sinkhorn_knopp_triton(logits, 0.07, n_iterations=0),
        "cold": sk.sinkhorn_knopp_triton(logits * 4, 0.04),
        "empty": sk.sinkhorn_knopp_triton(logits, 0.07),  # rank 0 holds no masked patch at all
    }
    for case, full in single.items():
        parts = {"ibot": torch.split(full, splits), "n0": torch.split(full, splits),
                 "empty": torch.split(full, [0, len(full)])}.get(case, full.chunk(2))
        for rank in range(2):
            for backend in ("triton", "torch"):
                got = results[rank][backend, case]
                assert torch.isfinite(got).all()
                assert torch.allclose(got, parts[rank], rtol=1e-5, atol=1e-8), (case, backend, rank)
    assert_tolerance_rule(single["dino"], logits, 0.07)


# ---- GPU: bf16 logits at real sizes -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("rows,K", [(64, 65536), (2501, 8192), (37, 131072)])
def test_gpu_bf16_real_shapes(rows, K):
    logits = (torch.randn(rows, K, device="cuda") * 0.8).bfloat16()  # max t / T ~ 65: the fp32 reference is finite
    got = sk.sinkhorn_knopp_triton(logits, 0.07)
    assert_tolerance_rule(got, logits, 0.07)
    assert torch.allclose(got.sum(1), torch.ones(rows, device="cuda"), atol=1e-4)


# ---- the GPU code path compiles (CI has no GPU: the interpreter does not lower to PTX) ---------------------------

COMPILE_SCRIPT = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from celldino.kernels import sinkhorn as sk

def compile_all(autotuner, sig, const_sets):
    fn, n = autotuner.fn, 0
    for cfg in autotuner.configs:
        for consts in const_sets:
            consts = {**consts, **cfg.kwargs}
            full = {name: sig.get(name, "constexpr") for name in fn.arg_names}
            triton.compile(ASTSource(fn, full, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            n += 1
    return n

n = 0
for dt in ("*bf16", "*fp32"):
    common = dict(x_ptr=dt, stride_x="i32", shift_ptr="*fp32", R="i32", K="i32", r_bucket="i32", scale="fp32")
    n += compile_all(sk._sk_col_pass_kernel, dict(common, rinv_ptr="*fp32", out_ptr="*fp32", inv_b="fp32",
                     inv_k="fp32"), [dict(FIRST=f, FINAL_U=u) for f in (True, False) for u in (True, False)])
    n += compile_all(sk._sk_row_pass_kernel, dict(common, u_ptr="*fp32", rinv_ptr="*fp32"), [{}])
    n += compile_all(sk._sk_write_kernel, dict(common, out_ptr="*fp32", stride_o="i32", u_ptr="*fp32",
                     rinv_ptr="*fp32"), [{}])
print("compiled", n)
'''


@pytest.mark.skipif(sk.triton is None, reason="needs triton")
def test_every_gpu_config_compiles_for_sm90(tmp_path):
    """Lower every autotune config to an sm_90 cubin in a process without TRITON_INTERPRET (no GPU needed)."""
    stdout = run_lowering_script(COMPILE_SCRIPT, tmp_path)
    assert "compiled 58" in stdout, stdout
