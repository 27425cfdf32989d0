"""Pre-norm transformer block (reference keys norm1, attn, ls1, norm2, mlp, ls2) and BlockChunk.

Inputs a Block accepts:
- a (B, N, D) tensor: the reference single-tensor path;
- a packed (T, D) stream plus its PackedLayout (what DinoVisionTransformer.forward_features_list passes);
- a list of (b_i, n_i, D) tensors, like the reference NestedTensorBlock (packed here, split on return).

Stochastic depth, as the reference:
- single tensor, training, drop_path > 0.1: sample-subset mode (`drop_add_residual_stochastic_depth`): the residual
  branch runs on a random subset of max(int(B * (1 - p)), 1) samples and is added back scaled by B / kept;
- single tensor, training, 0 < drop_path <= 0.1: per-sample DropPath;
- packed / list, training, drop_path > 0: sample-subset mode per input tensor (a random subset of the crops of
  each tensor, drawn independently for the attention and the MLP branch); only the kept crops' tokens are run.
In eval mode (and with drop_path 0) both residuals are always added.
"""
import torch
from torch import nn

from .attention import Attention
from .drop_path import DropPath, add_rows, gather_rows, random_subset
from .layer_scale import LayerScale
from .mlp import Mlp
from .packing import get_packed_layout, pack, unpack, subset_size


def drop_add_residual_stochastic_depth(x, residual_func, sample_drop_ratio=0.0):
    """x + (B / kept) * residual_func(x[subset]) on a random subset of the batch (the rest gets no residual)."""
    batch = x.shape[0]
    kept = subset_size(batch, sample_drop_ratio)
    subset = random_subset(batch, kept, x.device)
    residual = residual_func(gather_rows(x, subset))
    return add_rows(x.flatten(1), subset, residual.flatten(1) * (batch / kept)).view_as(x)


def drop_add_residual_packed(x, layout, residual_func, sample_drop_ratio):
    """The sample-subset stochastic depth of the reference list path, on a packed stream.

    For each input tensor i of the layout, a random subset of keeps[i] of its b_i crops is drawn; the tokens of all
    kept crops are gathered into one smaller packed stream, the residual branch runs once on it, and the result is
    added back to those rows scaled by b_i / keeps[i]. No host sync: the subset sizes depend only on the shapes.
    The gather and the add-back are gather_rows / add_rows (no index_add atomics, forward or backward).
    """
    plan = layout.subset(sample_drop_ratio)
    rows = []
    for (batch, tokens), kept, offset in zip(layout.shapes, plan.keeps, layout.token_offsets):
        crops = random_subset(batch, kept, x.device)
        rows.append((offset + crops[:, None] * tokens + torch.arange(tokens, device=x.device)).reshape(-1))
    index = torch.cat(rows)
    residual = residual_func(gather_rows(x, index), plan.layout)
    parts = residual.split(plan.layout.token_counts)
    return add_rows(x, index, torch.cat([part * scale for part, scale in zip(parts, plan.scales)]))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, proj_bias=True, ffn_bias=True, drop=0.0,
                 attn_drop=0.0, init_values=None, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 attn_class=Attention, ffn_layer=Mlp):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                               attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop,
                             bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def attn_residual(self, x, layout=None):
        return self.ls1(self.attn(self.norm1(x), layout))

    def ffn_residual(self, x, layout=None):
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x, layout=None):
        if isinstance(x, (list, tuple)):
            return self.forward_nested(list(x))
        if layout is not None:
            return self.forward_packed(x, layout)
        if self.training and self.sample_drop_ratio > 0.1:
            # the subset overhead only pays off above 0.1 (reference rule)
            x = drop_add_residual_stochastic_depth(x, self.attn_residual, self.sample_drop_ratio)
            x = drop_add_residual_stochastic_depth(x, self.ffn_residual, self.sample_drop_ratio)
        elif self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(self.attn_residual(x))
            x = x + self.drop_path2(self.ffn_residual(x))
        else:
            x = x + self.attn_residual(x)
            x = x + self.ffn_residual(x)
        return x

    def forward_packed(self, x, layout):
        """x: [layout.total_tokens, D] packed stream -> same shape."""
        if self.training and self.sample_drop_ratio > 0.0:
            x = drop_add_residual_packed(x, layout, self.attn_residual, self.sample_drop_ratio)
            x = drop_add_residual_packed(x, layout, self.ffn_residual, self.sample_drop_ratio)
        else:
            x = x + self.attn_residual(x, layout)
            x = x + self.ffn_residual(x, layout)
        return x

    def forward_nested(self, x_list):
        """Reference NestedTensorBlock list API: [(b_i, n_i, D)] -> [(b_i, n_i, D)], computed as one packed stream."""
        x, shapes = pack(x_list)
        ratios = (self.sample_drop_ratio,) if self.training and self.sample_drop_ratio > 0 else ()
        layout = get_packed_layout(shapes, ratios)
        return unpack(self.forward_packed(x, layout), layout)


# the reference's block class name (its list-of-tensors path lives in Block here)
NestedTensorBlock = Block


class BlockChunk(nn.ModuleList):
    """A group of consecutive blocks (one FSDP unit). Like the reference, chunk c starts with nn.Identity
    placeholders for the blocks of earlier chunks so that state-dict keys keep the global block index:
    `blocks.<chunk>.<global index>.*`."""

    def forward(self, x, layout=None, collect=None):
        """collect: optional (set of global block indices, list): the outputs of those blocks are appended in order."""
        for index, block in enumerate(self):
            if isinstance(block, nn.Identity):
                continue
            x = block(x, layout)
            if collect is not None and index in collect[0]:
                collect[1].append(x)
        return x
