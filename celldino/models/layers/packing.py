"""Layout of a packed token stream: several batches of crops flattened into one [total_tokens, D] tensor.

The student's multi-crop forward concatenates the tokens of every crop (e.g. 2B global crops of 197 tokens, then
8B local crops of 37) so that every Linear / LayerNorm / MLP runs once; attention stays block-diagonal per crop
through `cu_seqlens`. A layout depends only on the crop shapes, so it is built once per shape signature and
cached (as the reference caches its xFormers attention bias): no host work and no host<->device sync per step.

`cu_seqlens` is a CPU int32 tensor: the attention kernel reads crop lengths on the host to build its tile table,
and caches it per tensor object, so a cached CPU tensor costs no device->host copy.
"""
import itertools
from collections import OrderedDict

import torch


def subset_size(batch, sample_drop_ratio):
    """Crops kept by the reference's sample-subset stochastic depth: max(int(b * (1 - ratio)), 1)."""
    return max(int(batch * (1 - sample_drop_ratio)), 1)


class SubsetLayout:
    """The kept crops of a sample-subset stochastic-depth step: `keeps[i]` crops of input tensor i, whose
    residuals are scaled by `scales[i] = b_i / keeps[i]`; `layout` is the packed layout of the kept tokens."""

    def __init__(self, shapes, sample_drop_ratio):
        self.keeps = tuple(subset_size(b, sample_drop_ratio) if b > 0 else 0 for b, _ in shapes)
        self.scales = tuple(b / k if k else 1.0 for (b, _), k in zip(shapes, self.keeps))
        self.layout = get_packed_layout(tuple((k, n) for k, (_, n) in zip(self.keeps, shapes)))


class PackedLayout:
    """Crop layout of a packed stream made of input tensors of shapes (b_i, n_i, D), flattened in order.

    shapes         ((b_i, n_i), ...)
    token_counts   b_i * n_i per input tensor; token_offsets: where each starts in the stream
    cu_seqlens     CPU int32 [n_crops + 1], cumulative crop lengths (what `multicrop_attention` takes);
                   cu_seqlens_list: the same as a tuple of ints (a compile-time constant under torch.compile)
    max_seqlen     longest crop
    subsets        {sample_drop_ratio: SubsetLayout} prepared for the stochastic-depth ratios in use
    """

    def __init__(self, shapes, drop_ratios=()):
        self.shapes = tuple((int(b), int(n)) for b, n in shapes)
        lengths = [n for b, n in self.shapes for _ in range(b)]
        self.cu_seqlens_list = (0,) + tuple(itertools.accumulate(lengths))
        self.cu_seqlens = torch.tensor(self.cu_seqlens_list, dtype=torch.int32)
        self.max_seqlen = max(lengths, default=0)
        self.token_counts = tuple(b * n for b, n in self.shapes)
        self.token_offsets = tuple(itertools.accumulate((0,) + self.token_counts[:-1]))
        self.total_tokens = sum(self.token_counts)
        self.subsets = {float(r): SubsetLayout(self.shapes, float(r)) for r in sorted(set(drop_ratios))}

    def subset(self, sample_drop_ratio):
        """The SubsetLayout for this ratio (prepared up front when the caller listed it in drop_ratios)."""
        ratio = float(sample_drop_ratio)
        plan = self.subsets.get(ratio)
        if plan is None:
            plan = SubsetLayout(self.shapes, ratio)
            self.subsets[ratio] = plan
        return plan

    def __repr__(self):
        return f"PackedLayout(shapes={self.shapes}, total_tokens={self.total_tokens})"


_LAYOUTS = OrderedDict()
_LAYOUT_CACHE_SIZE = 64


def get_packed_layout(shapes, drop_ratios=()):
    """Cached PackedLayout for `shapes` ((b_i, n_i), ...), with subset layouts for every ratio in drop_ratios."""
    key = (tuple((int(b), int(n)) for b, n in shapes), tuple(sorted({float(r) for r in drop_ratios})))
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = PackedLayout(key[0], key[1])
        _LAYOUTS[key] = layout
        while len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
            _LAYOUTS.popitem(last=False)
    else:
        _LAYOUTS.move_to_end(key)
    return layout


def pack(x_list):
    """[(b_i, n_i, D), ...] -> ([sum b_i n_i, D], shapes)."""
    shapes = tuple((x.shape[0], x.shape[1]) for x in x_list)
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in x_list]), shapes


def unpack(x, layout):
    """[total_tokens, D] -> [(b_i, n_i, D), ...] views, the inverse of `pack`."""
    return [part.view(b, n, x.shape[-1]) for part, (b, n) in zip(x.split(layout.token_counts), layout.shapes)]
