"""KoLeo loss (DINOv2 semantics): -mean log distance of each L2-normalised row to its nearest other row.

Reference steps (reference_spec.md §5.5): n = normalize(x, eps); nearest neighbour j(i) = argmax_{j != i} n_i . n_j;
d_i = ||n_i - n_j(i) + eps|| (torch PairwiseDistance adds eps to the difference); loss = -mean log(d_i + eps).

Triton path, fp32 arithmetic whatever the input dtype:
- forward: one kernel tiles x x^T (the rows in their own dtype, fp32 accumulation, exact fp32 products for fp32
  inputs), scales each column by its inverse norm on the fly (the row's own norm does not change its argmax), keeps
  a running max / argmax with the diagonal excluded, then computes the distance and log for its rows;
- backward: one program per row k sums the row's own term and the terms of the rows whose neighbour is k (an
  inverse-neighbour list, so the result is deterministic, no atomics), then applies the normalisation's backward.
`koleo_loss_distributed` compares the local rows with the all-gathered global batch (DINOv3 KoLeoLossDistributed
with topk=1): the loss is the mean over the local rows and, as through DINOv3's differentiable all_gather, the
gradient of every rank's loss reaches the rank that owns each neighbour row (summed over ranks).

Decisions (see docs/kernels.md): a batch with fewer than 2 rows is a ValueError (it has no neighbour; the
reference returns inf/NaN). Duplicate rows give a finite loss and gradient (d = sqrt(D) eps, as the fp32 reference),
also for fp16/bf16 inputs because the kernel never computes in half precision; the result is an fp32 scalar. The
diagonal is excluded outright (-inf), where the reference fills -1: they differ only when every other row has a
dot product of exactly -1 (e.g. two antipodal rows), where the reference picks the row itself.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._dispatch import autotune_configs, launch_autotuned, use_triton

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU-only installs still get the torch reference
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # others (e.g. float64) take the torch reference

def _check(x, global_rows=None):
    if x.dim() != 2:
        raise ValueError(f"KoLeo needs a [B, D] batch, got shape {tuple(x.shape)}")
    rows = x.shape[0] if global_rows is None else global_rows
    if rows < 2:
        raise ValueError(f"KoLeo needs a batch of B >= 2 rows (a single row has no neighbour), got {rows} "
                         f"(shape {tuple(x.shape)})")
    if x.shape[1] < 1:
        raise ValueError(f"KoLeo needs D >= 1 features, got shape {tuple(x.shape)}")


def _group_info(group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def koleo_loss_reference(x, eps=1e-8):
    """The reference torch code (dinov2/loss/koleo_loss.py), in x's own dtype with autocast off."""
    _check(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        nn_index = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


def _gather_sizes(rows, group, device):
    world, _ = _group_info(group)
    size = torch.tensor([rows], device=device, dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x, sizes, group):
    """Concatenate every rank's rows (local batch sizes may differ: pad to the largest, then trim)."""
    world, _ = _group_info(group)
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRowsFn(torch.autograd.Function):
    """Differentiable all_gather: the backward sums every rank's gradient of the gathered rows and keeps the slice
    of this rank (what torch.distributed.nn.all_gather does, without needing all_to_all on gloo)."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = _group_info(group)
        sizes = _gather_sizes(x.shape[0], group, x.device)
        ctx.group, ctx.offset, ctx.rows = group, sum(sizes[:rank]), x.shape[0]
        return _all_gather_rows(x.detach(), sizes, group), torch.tensor(ctx.offset)

    @staticmethod
    def backward(ctx, grad_all, _grad_offset):
        grad_all = grad_all.contiguous()
        dist.all_reduce(grad_all, group=ctx.group)
        return grad_all[ctx.offset: ctx.offset + ctx.rows], None


def koleo_loss_distributed_reference(x, eps=1e-8, group=None):
    """DINOv3 KoLeoLossDistributed (topk=1) in torch: local rows against the all-gathered global batch."""
    world, _ = _group_info(group)
    if world == 1:
        return koleo_loss_reference(x, eps)
    if x.dim() != 2:
        _check(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        n = F.normalize(x, p=2, dim=-1, eps=eps)
        n_all, offset = _GatherRowsFn.apply(n, group)
        _check(x, global_rows=n_all.shape[0])
        with torch.no_grad():
            dots = n @ n_all.t()
            rows = torch.arange(n.shape[0], device=x.device)
            dots[rows, rows + int(offset)] = -1
            nn_index = dots.argmax(dim=1)
        distances = F.pairwise_distance(n, n_all[nn_index], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.autotune(
        configs=autotune_configs([({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, w, s)
                                  for m, n, d, w, s in [(16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 32, 4, 3),
                                                        (64, 128, 32, 8, 3), (128, 64, 32, 8, 3)]],
                                 {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}),
        key=["BQ", "BK", "D", "IS_FP32"],
    )
    @triton.jit
    def _koleo_fwd_kernel(q_ptr, k_ptr, stride_q, stride_k, nn_ptr, dist_ptr, loss_ptr, BQ, BK, D, q_offset, eps,
                          IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < BQ
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q
        d_offsets = tl.arange(0, BLOCK_D)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_M], tl.int32)
        for n0 in range(0, BK, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < BK
            k_rows = k_ptr + cols.to(tl.int64)[:, None] * stride_k
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            sumsq = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + d_offsets
                dmask = dd < D
                a = tl.load(q_rows + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
                b = tl.load(k_rows + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
                bf = b.to(tl.float32)
                sumsq += tl.sum(bf * bf, axis=1)
                if IS_FP32:
                    acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")  # exact fp32 products, no tf32
                else:
                    acc = tl.dot(a, tl.trans(b), acc)  # fp16/bf16 products are exact in fp32
            inv_norm = 1.0 / tl.maximum(tl.sqrt(sumsq), eps)
            scores = acc * inv_norm[None, :]
            excluded = (cols[None, :] == (rows[:, None] + q_offset)) | (cols[None, :] >= BK)
            scores = tl.where(excluded, float("-inf"), scores)
            tile_best = tl.max(scores, axis=1)
            tile_idx = tl.argmax(scores, axis=1).to(tl.int32) + n0
            better = tile_best > best  # strict: on a tie the earlier (smaller) index wins, like torch.argmax
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.maximum(best, tile_best)
        # distance to the chosen neighbour: norms first, then ||n_i - n_j + eps|| without cancellation
        j_rows = k_ptr + best_idx.to(tl.int64)[:, None] * stride_k
        sq_i = tl.zeros([BLOCK_M], tl.float32)
        sq_j = tl.zeros([BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + d_offsets
            mask = rmask[:, None] & (dd < D)[None, :]
            xi = tl.load(q_rows + dd[None, :], mask=mask, other=0.0).to(tl.float32)
            xj = tl.load(j_rows + dd[None, :], mask=mask, other=0.0).to(tl.float32)
            sq_i += tl.sum(xi * xi, axis=1)
            sq_j += tl.sum(xj * xj, axis=1)
        inv_i = 1.0 / tl.maximum(tl.sqrt(sq_i), eps)
        inv_j = 1.0 / tl.maximum(tl.sqrt(sq_j), eps)
        dist2 = tl.zeros([BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + d_offsets
            mask = rmask[:, None] & (dd < D)[None, :]
            xi = tl.load(q_rows + dd[None, :], mask=mask, other=0.0).to(tl.float32)
            xj = tl.load(j_rows + dd[None, :], mask=mask, other=0.0).to(tl.float32)
            diff = tl.where(mask, xi * inv_i[:, None] - xj * inv_j[:, None] + eps, 0.0)
            dist2 += tl.sum(diff * diff, axis=1)
        distance = tl.sqrt(dist2)
        tl.store(nn_ptr + rows, best_idx, mask=rmask)
        tl.store(dist_ptr + rows, distance, mask=rmask)
        tl.store(loss_ptr + rows, -tl.log(distance + eps), mask=rmask)

    @triton.jit
    def _normalized_row(ptr, dd, dmask, eps):
        x = tl.load(ptr + dd, mask=dmask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        inv = 1.0 / tl.maximum(norm, eps)
        return x * inv, norm, inv

    @triton.jit
    def _koleo_bwd_kernel(q_ptr, k_ptr, stride_q, stride_k, nn_ptr, dist_ptr, order_ptr, starts_ptr, gout_ptr,
                          out_ptr, stride_o, BQ, D, q_offset, eps, inv_bq,
                          NORM_BWD: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per key row k: G = dL/dn_k = own term (if k is a local query row) - the terms of the local
        # query rows whose neighbour is k, with dL/d(diff_i) = -diff_i * gout / (BQ d_i (d_i + eps)).
        k = tl.program_id(0)
        dd = tl.arange(0, BLOCK_D)
        dmask = dd < D
        gout = tl.load(gout_ptr).to(tl.float32) * inv_bq
        n_k, norm_k, inv_k = _normalized_row(k_ptr + k.to(tl.int64) * stride_k, dd, dmask, eps)
        grad = tl.zeros([BLOCK_D], tl.float32)
        i = k - q_offset
        if (i >= 0) & (i < BQ):
            j = tl.load(nn_ptr + i)
            d = tl.load(dist_ptr + i)
            n_j, _, _ = _normalized_row(k_ptr + j.to(tl.int64) * stride_k, dd, dmask, eps)
            coef = tl.where(d > 0, gout / ((d + eps) * d), 0.0)  # torch's norm backward is 0 at d = 0
            grad -= coef * tl.where(dmask, n_k - n_j + eps, 0.0)
        start = tl.load(starts_ptr + k)
        end = tl.load(starts_ptr + k + 1)
        for s in range(start, end):
            m = tl.load(order_ptr + s)
            d = tl.load(dist_ptr + m)
            n_m, _, _ = _normalized_row(q_ptr + m.to(tl.int64) * stride_q, dd, dmask, eps)
            coef = tl.where(d > 0, gout / ((d + eps) * d), 0.0)
            grad += coef * tl.where(dmask, n_m - n_k + eps, 0.0)
        if NORM_BWD:
            # n = x / max(||x||, eps): project out the radial part where the norm is not clamped
            radial = tl.where(norm_k >= eps, tl.sum(n_k * grad, axis=0), 0.0)
            grad = (grad - n_k * radial) * inv_k
        tl.store(out_ptr + k.to(tl.int64) * stride_o + dd, grad.to(out_ptr.dtype.element_ty), mask=dmask)


def _rows_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _koleo_forward(xq, xk, q_offset, eps):
    BQ, D = xq.shape
    BK = xk.shape[0]
    f32 = dict(device=xq.device, dtype=torch.float32)
    nn_index = torch.empty(BQ, device=xq.device, dtype=torch.int32)
    distances = torch.empty(BQ, **f32)
    row_loss = torch.empty(BQ, **f32)
    grid = lambda meta: (triton.cdiv(BQ, meta["BLOCK_M"]),)  # noqa: E731
    launch_autotuned(_koleo_fwd_kernel, grid, xq, xk, xq.stride(0), xk.stride(0), nn_index, distances, row_loss, BQ, BK,
                     D, q_offset, eps, IS_FP32=xq.dtype == torch.float32)
    return nn_index, distances, row_loss


def _koleo_backward(xq, xk, q_offset, nn_index, distances, grad_out, eps, norm_bwd):
    """Per key row: dL/dx (norm_bwd) or dL/dn in fp32 (for the distributed sum over ranks)."""
    BQ, D = xq.shape
    BK = xk.shape[0]
    nn_long = nn_index.long()
    order = torch.argsort(nn_long, stable=True).to(torch.int32)  # query rows grouped by neighbour
    starts = torch.zeros(BK + 1, device=xq.device, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.bincount(nn_long, minlength=BK), 0)
    out = torch.empty((BK, D), device=xq.device, dtype=xk.dtype if norm_bwd else torch.float32)
    block_d = triton.next_power_of_2(D)
    _koleo_bwd_kernel[(BK,)](xq, xk, xq.stride(0), xk.stride(0), nn_index, distances, order, starts,
                             grad_out.float().contiguous(), out, out.stride(0), BQ, D, q_offset, eps, 1.0 / BQ,
                             NORM_BWD=norm_bwd, BLOCK_D=block_d, num_warps=4 if block_d <= 512 else 8)
    return out


class _KoLeoFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        x = _rows_contiguous(x.detach())
        nn_index, distances, row_loss = _koleo_forward(x, x, 0, eps)
        ctx.save_for_backward(x, nn_index, distances)
        ctx.eps = eps
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_out):
        x, nn_index, distances = ctx.saved_tensors
        return _koleo_backward(x, x, 0, nn_index, distances, grad_out, ctx.eps, norm_bwd=True), None


def _normalize_backward(x, grad_n, eps):
    """Backward of n = x / max(||x||, eps) (F.normalize), in fp32."""
    xf = x.float()
    norm = xf.norm(dim=1, keepdim=True)
    inv = 1.0 / norm.clamp_min(eps)
    n = xf * inv
    radial = torch.where(norm >= eps, (n * grad_n).sum(1, keepdim=True), torch.zeros_like(norm))
    return ((grad_n - n * radial) * inv).to(x.dtype)


class _KoLeoDistributedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, group):
        x = _rows_contiguous(x.detach())
        _, rank = _group_info(group)
        sizes = _gather_sizes(x.shape[0], group, x.device)
        _check(x, global_rows=sum(sizes))
        x_all = _all_gather_rows(x, sizes, group)
        offset = sum(sizes[:rank])
        nn_index, distances, row_loss = _koleo_forward(x, x_all, offset, eps)
        ctx.save_for_backward(x, x_all, nn_index, distances)
        ctx.eps, ctx.group, ctx.offset = eps, group, offset
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_out):
        x, x_all, nn_index, distances = ctx.saved_tensors
        grad_n_all = _koleo_backward(x, x_all, ctx.offset, nn_index, distances, grad_out, ctx.eps, norm_bwd=False)
        dist.all_reduce(grad_n_all, group=ctx.group)  # each neighbour's gradient goes back to the rank owning it
        grad_n = grad_n_all[ctx.offset: ctx.offset + x.shape[0]]
        return _normalize_backward(x, grad_n, ctx.eps), None, None


def koleo_loss_triton(x, eps=1e-8):
    if triton is None:
        raise RuntimeError("koleo_loss_triton needs triton")
    _check(x)
    return _KoLeoFn.apply(x, eps)


def koleo_loss_distributed_triton(x, eps=1e-8, group=None):
    if triton is None:
        raise RuntimeError("koleo_loss_distributed_triton needs triton")
    if x.dim() != 2:
        _check(x)
    if _group_info(group)[0] == 1:
        return koleo_loss_triton(x, eps)
    return _KoLeoDistributedFn.apply(x, eps, group)


# fp32 inputs from this many compared rows on go to the reference: the kernel's exact fp32 products lose to cuBLAS
# there (fwd+bwd 0.18-0.42x at B = 4096 on an H200, 1.2-2.2x at the training batch B = 16; docs/kernels.md)
FP32_REFERENCE_ROWS = 2048
WIDE_REFERENCE_DIM = 2048  # bf16 / fp16 batches that large AND this wide also go to the reference (0.64x measured)


def _kernel_wins(x, compared_rows):
    if x.dtype not in _KERNEL_DTYPES or compared_rows < FP32_REFERENCE_ROWS:
        return x.dtype in _KERNEL_DTYPES
    return x.dtype != torch.float32 and x.shape[-1] < WIDE_REFERENCE_DIM


def koleo_loss(x, eps=1e-8):
    """KoLeo loss of a [B, D] batch (B >= 2): fp32 scalar on the Triton path, x's dtype on the reference."""
    _check(x)
    if _kernel_wins(x, x.shape[0]) and use_triton(x):
        return koleo_loss_triton(x, eps)
    return koleo_loss_reference(x, eps)


def koleo_loss_distributed(x, eps=1e-8, group=None):
    """KoLeo of this rank's rows against the all-gathered batch of `group` (the plain loss when not distributed).
    Every rank of the group must call it (and its backward): both contain collectives, so with several ranks the
    path depends on the dtype only (the same on every rank, whatever each rank's row count)."""
    if _group_info(group)[0] == 1:
        return koleo_loss(x, eps)
    if x.dtype in _KERNEL_DTYPES and use_triton(x):
        return koleo_loss_distributed_triton(x, eps, group)
    return koleo_loss_distributed_reference(x, eps, group)
