"""Sinkhorn-Knopp teacher targets (DINOv2 `sinkhorn_knopp_teacher` semantics), optionally distributed."""
import torch
import torch.distributed as dist

from ._dispatch import use_triton


def _world(group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _all_reduce(t, group, op=None):
    if _world(group) > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def sinkhorn_knopp_reference(logits, temperature, n_iterations=3, n_rows=None, group=None):
    """The reference algorithm in fp32, with the global max subtracted first (an exact no-op mathematically:
    a global scalar factor cancels in the first normalisation) so temperature 0.04 cannot overflow.

    logits: [rows_local, K]. n_rows: the global row count B (default rows_local x world size).
    Returns [rows_local, K] targets whose rows sum to 1.
    """
    logits = logits.float()
    gmax = _all_reduce(logits.max().clone(), group, dist.ReduceOp.MAX if _world(group) > 1 else None)
    Q = torch.exp((logits - gmax) / temperature).t()  # K x rows_local
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


def sinkhorn_knopp(logits, temperature, n_iterations=3, n_rows=None, group=None):
    if use_triton(logits):
        from . import sinkhorn_triton  # noqa: F401  (provided by the kernels work)
        return sinkhorn_triton.sinkhorn_knopp_triton(logits, temperature, n_iterations, n_rows, group)
    return sinkhorn_knopp_reference(logits, temperature, n_iterations, n_rows, group)
