"""Stochastic depth: per-sample DropPath (each sample's residual zeroed with probability p, survivors scaled by
1/(1-p)), and the row gather / add-back of the sample-subset mode (celldino.models.layers.block) without atomics."""
import torch
from torch import nn


class _GatherRows(torch.autograd.Function):
    """x.index_select(0, index) for UNIQUE indices, whose backward scatters (index_copy) instead of index_add:
    index_add accumulates with atomics, which in bf16 on a GPU cost ~12% of a ViT-L training step."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros((ctx.rows, *grad.shape[1:])).index_copy(0, index, grad), None


class _AddRows(torch.autograd.Function):
    """x with rows `index` (UNIQUE) increased by src: torch.index_add(x, 0, index, src) as a gather + add + scatter,
    no atomics; backward: x gets the gradient unchanged, src its rows."""

    @staticmethod
    def forward(ctx, x, index, src):
        ctx.save_for_backward(index)
        return x.index_copy(0, index, x.index_select(0, index) + src.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)


def random_subset(batch, kept, device=None):
    """`kept` distinct indices drawn uniformly from range(batch), in random order (the head of a random
    permutation). Drawn as torch.rand(batch).argsort() rather than torch.randperm: on a GPU randperm runs a
    multi-kernel radix sort with its own host work (~180 us per call under the profiler, 96 calls per ViT-L step),
    where under torch.compile the uniform draw is generated inside a fused kernel and the sort is one op."""
    return torch.rand(batch, device=device).argsort()[:kept]


def gather_rows(x, index):
    """x[index] along dim 0; `index` must not repeat (a subset of rows)."""
    return _GatherRows.apply(x, index)


def add_rows(x, index, src):
    """A copy of x with src added to rows `index` along dim 0; `index` must not repeat (a subset of rows)."""
    return _AddRows.apply(x, index, src)


def drop_path(x, drop_prob=0.0, training=False):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"
