"""Sinkhorn-Knopp teacher targets (DINOv2 `sinkhorn_knopp_teacher` semantics), optionally distributed.

The reference algorithm (reference_spec.md §5.3) on Q = exp(t / T)^T, K prototypes x B samples:
    Q /= sum(Q)                                   (all-reduced)
    repeat n_iterations: Q /= row sums (per prototype, all-reduced); Q /= K
                         Q /= column sums (per sample, local);       Q /= B
    return (Q * B)^T                              (each sample's targets sum to 1)

Streamed form used by the Triton path. Every intermediate Q equals E[b, k] * u_k * v_b with
E = exp((t - m_k) / T), so only the scaling vectors u (K) and v (rows) are kept, the logits are read in their own
dtype once per pass and the fp32 targets are written once:
    pass A (per prototype):  colsum_k = sum_b E[b, k] v_b   (all-reduced)     ->  u_k = 1 / (K colsum_k)
    pass B (per sample):     rowsum_b = sum_k E[b, k] u_k                      ->  v_b = 1 / (B rowsum_b)
    write:                   targets[b, k] = E[b, k] u_k / rowsum_b   (= Q * B of the last iteration)
The first normalisation by sum(Q) is dropped: the next step divides every prototype by its own sum, which cancels
any factor shared by a prototype's entries. For the same reason the shift m_k may be the *per-prototype* max of the
logits (all-reduced): exactly equivalent, like the global max, but never overflows (colsum_k >= 1) and underflows
only where the reference's own fp32 quotient would. A per-*row* max is not equivalent and is not used. With
n_iterations=0 the output is Q * B / sum(Q), which does depend on the shift: the global max is used there.

Total logits traffic: 2 x n_iterations + 1 reads (7 for the default 3 iterations) and one fp32 write, against about
ten fp32 read/write passes per iteration for the reference.
"""
import math

import torch
import torch.distributed as dist

from ._dispatch import autotune_configs, launch_autotuned, use_triton

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU-only installs still get the torch reference
    triton = None

LOG2E = 1.4426950408889634
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # others (e.g. float64) take the torch reference


def _world(group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _all_reduce(t, group, op=None):
    if _world(group) > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def _check_args(logits, temperature, n_iterations, n_rows=None):
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"sinkhorn_knopp: logits must be [rows, K >= 1], got shape {tuple(logits.shape)}")
    if not (temperature > 0 and math.isfinite(float(temperature))):
        raise ValueError(f"sinkhorn_knopp: temperature must be finite and > 0, got {temperature}")
    if int(n_iterations) != n_iterations or n_iterations < 0:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be a non-negative integer, got {n_iterations}")
    if n_rows is not None and (int(n_rows) != n_rows or n_rows < 0 or (n_rows == 0 and logits.shape[0] > 0)):
        raise ValueError(f"sinkhorn_knopp: n_rows (the global row count) must be a non-negative integer and at "
                         f"least this rank's {logits.shape[0]} rows, got {n_rows}")


def _shift(logits, n_iterations, group):
    """The max subtracted before exp: per prototype (exactly equivalent when n_iterations >= 1), else global."""
    rows, K = logits.shape
    if n_iterations > 0:
        shift = logits.amax(dim=0) if rows else logits.new_full((K,), -math.inf)
    else:
        shift = logits.max() if rows else logits.new_tensor(-math.inf)
    return _all_reduce(shift.contiguous(), group, dist.ReduceOp.MAX)


@torch.no_grad()
def sinkhorn_knopp_reference(logits, temperature, n_iterations=3, n_rows=None, group=None):
    """The reference algorithm in fp32, step for step, after subtracting the max (see the module docstring).

    logits: [rows_local, K]. n_rows: the global row count B (default rows_local x world size).
    Returns [rows_local, K] fp32 targets whose rows sum to 1.
    """
    _check_args(logits, temperature, n_iterations, n_rows)
    logits = logits.float()
    Q = torch.exp((logits - _shift(logits, n_iterations, group)) / temperature).t()  # K x rows_local
    K = Q.shape[0]
    B = float(n_rows) if n_rows is not None else float(Q.shape[1] * _world(group))
    Q /= _all_reduce(Q.sum(), group)
    for _ in range(n_iterations):
        row_sums = _all_reduce(Q.sum(dim=1, keepdim=True), group)
        Q /= row_sums
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

if triton is not None:

    # Pass A: per-prototype sums over the rows. Each program owns BLOCK_K prototypes and streams every row, so the
    # result is final without a cross-program reduction (and the online max of the first pass is exact).
    @triton.autotune(
        configs=autotune_configs([({"BLOCK_R": r, "BLOCK_K": k}, w, s)
                                  for r, k, w, s in [(16, 256, 4, 3), (32, 256, 8, 3), (8, 512, 4, 3), (32, 128, 4, 4),
                                                     (64, 128, 8, 3)]],
                                 {"BLOCK_R": 8, "BLOCK_K": 32}),
        key=["r_bucket", "K", "FIRST", "FINAL_U"],
    )
    @triton.jit
    def _sk_col_pass_kernel(x_ptr, stride_x, shift_ptr, rinv_ptr, out_ptr, R, K, r_bucket, scale, inv_b, inv_k,
                            FIRST: tl.constexpr, FINAL_U: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        cmask = cols < K
        row_offsets = tl.arange(0, BLOCK_R)
        if FIRST:
            # online max + rescaled sum (flash-softmax style): one read gives the shift m_k and colsum_k
            m = tl.full([BLOCK_K], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_K], tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + row_offsets
                mask = (rows < R)[:, None] & cmask[None, :]
                x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask,
                            other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked column: keep exp2 finite
                s = s * tl.exp2((m - m_ref) * scale) + tl.sum(tl.exp2((x - m_ref[None, :]) * scale), axis=0)
                m = m_new
            tl.store(shift_ptr + cols, m, mask=cmask)
            colsum = s
        else:
            m = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
            acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + row_offsets
                rmask = rows < R
                x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
                v = tl.load(rinv_ptr + rows, mask=rmask, other=0.0) * inv_b
                acc += tl.exp2((x - m[None, :]) * scale) * v[:, None]
            colsum = tl.sum(acc, axis=0)
        if FINAL_U:
            tl.store(out_ptr + cols, inv_k / tl.where(cmask, colsum, 1.0), mask=cmask)
        else:
            tl.store(out_ptr + cols, colsum, mask=cmask)

    # Pass B: per-row sums over the prototypes with the current u; stores 1 / rowsum_b.
    @triton.autotune(
        configs=autotune_configs([({"BLOCK_R": r, "BLOCK_K": k}, w, s)
                                  for r, k, w, s in [(1, 2048, 4, 3), (2, 1024, 4, 3), (4, 1024, 8, 3), (4, 512, 4, 4),
                                                     (8, 512, 8, 3)]],
                                 {"BLOCK_R": 4, "BLOCK_K": 32}),
        key=["r_bucket", "K"],
    )
    @triton.jit
    def _sk_row_pass_kernel(x_ptr, stride_x, shift_ptr, u_ptr, rinv_ptr, R, K, r_bucket, scale,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        col_offsets = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + col_offsets
            cmask = cols < K
            m = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
            u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
            x = tl.load(row_ptrs + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=float("-inf")).to(tl.float32)
            acc += tl.exp2((x - m[None, :]) * scale) * u[None, :]
        rowsum = tl.where(rmask, tl.sum(acc, axis=1), 1.0)  # padding rows: avoid a (masked) 1/0
        tl.store(rinv_ptr + rows, 1.0 / rowsum, mask=rmask)

    # Final write: targets[b, k] = E[b, k] u_k rinv_b, fp32, written once.
    @triton.autotune(
        configs=autotune_configs([({"BLOCK_R": r, "BLOCK_K": k}, w, s)
                                  for r, k, w, s in [(4, 1024, 4, 2), (8, 512, 4, 2), (16, 256, 4, 2),
                                                     (8, 1024, 8, 2)]],
                                 {"BLOCK_R": 8, "BLOCK_K": 32}),
        key=["r_bucket", "K"],
    )
    @triton.jit
    def _sk_write_kernel(x_ptr, stride_x, out_ptr, stride_o, shift_ptr, u_ptr, rinv_ptr, R, K, r_bucket, scale,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < R
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
        u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
        rinv = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
        out = tl.exp2((x - m[None, :]) * scale) * u[None, :] * rinv[:, None]
        tl.store(out_ptr + rows64 * stride_o + cols[None, :], out, mask=mask)


def _r_bucket(rows):
    """Autotune key for the row count: the iBOT masked-patch count changes every step, its power of 2 does not."""
    return triton.next_power_of_2(max(int(rows), 1))


@torch.no_grad()
def sinkhorn_knopp_triton(logits, temperature, n_iterations=3, n_rows=None, group=None):
    """Streamed Sinkhorn-Knopp (see the module docstring); same arguments and result as the reference."""
    if triton is None:
        raise RuntimeError("sinkhorn_knopp_triton needs triton")
    _check_args(logits, temperature, n_iterations, n_rows)
    x = logits.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    R, K = x.shape
    world = _world(group)
    distributed = world > 1
    B = float(n_rows) if n_rows is not None else float(R * world)
    scale = LOG2E / float(temperature)
    f32 = dict(device=x.device, dtype=torch.float32)
    shift = torch.empty(K, **f32)
    colsum = torch.empty(K, **f32)
    rinv = torch.ones(R, **f32)
    rb = _r_bucket(R)

    def col_pass(first, final_u):
        grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
        # B = 0 only on a rank without rows (nothing of it is used): it still takes part in the collectives
        launch_autotuned(_sk_col_pass_kernel, grid, x, x.stride(0), shift, rinv, colsum, R, K, rb, scale,
                         1.0 / B if B else 0.0, 1.0 / K, FIRST=first, FINAL_U=final_u)

    def reduce_u():
        """Distributed: the local per-prototype sums become global; returns u = 1 / (K colsum)."""
        _all_reduce(colsum, group)
        return (1.0 / K) / colsum

    # pass A of iteration 1 (v = 1) also finds the shift
    col_pass(first=True, final_u=not distributed and n_iterations > 0)
    if distributed:
        local_shift = shift.clone()
        _all_reduce(shift, group, dist.ReduceOp.MAX)
        rescale = torch.exp2((local_shift - shift) * scale)
        colsum *= torch.where(torch.isneginf(local_shift), torch.zeros_like(rescale), rescale)
    if n_iterations == 0:
        # Q * B / sum(Q) with the global max as the shift
        if distributed:
            _all_reduce(colsum, group)
        gmax = shift.max()
        to_global = torch.exp2((shift - gmax) * scale)
        u = to_global * (B / (colsum * to_global).sum())
    else:
        u = reduce_u() if distributed else colsum
        for it in range(n_iterations):
            if it > 0:
                col_pass(first=False, final_u=not distributed)
                u = reduce_u() if distributed else colsum
            if R:
                grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]),)  # noqa: E731
                launch_autotuned(_sk_row_pass_kernel, grid, x, x.stride(0), shift, u, rinv, R, K, rb, scale)
    out = torch.empty((R, K), **f32)
    if R:
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
        launch_autotuned(_sk_write_kernel, grid, x, x.stride(0), out, out.stride(0), shift, u.contiguous(), rinv, R, K,
                         rb, scale)
    return out


def sinkhorn_knopp(logits, temperature, n_iterations=3, n_rows=None, group=None):
    """Teacher targets [rows_local, K] (fp32, rows sum to 1) of `n_iterations` Sinkhorn-Knopp steps at `temperature`.

    n_rows: the GLOBAL row count B (DINO: rows_local x world, the default; iBOT: the all-reduced masked-patch count).
    group: process group whose ranks hold the other rows (None: the default group when initialised).
    """
    if logits.dtype in _KERNEL_DTYPES and use_triton(logits):
        return sinkhorn_knopp_triton(logits, temperature, n_iterations, n_rows, group)
    return sinkhorn_knopp_reference(logits, temperature, n_iterations, n_rows, group)
