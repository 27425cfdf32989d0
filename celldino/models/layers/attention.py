"""Multi-head self-attention with the reference keys `qkv` (one [3D, D] Linear) and `proj`.

Two paths:
- a (B, N, D) tensor: F.scaled_dot_product_attention over the batch;
- a packed (T, D) stream with a PackedLayout: ONE call to `celldino.kernels.multicrop_attention` on
  [T, heads, head_dim] q/k/v with the layout's cu_seqlens (block-diagonal: each crop attends to itself only).
"""
import torch
import torch.nn.functional as F
from torch import nn

from celldino.kernels import multicrop_attention


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, layout=None):
        if layout is not None:
            return self._forward_packed(x, layout)
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))

    def _forward_packed(self, x, layout):
        tokens, dim = x.shape
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        # under torch.compile the offsets go in as Python ints, a constant of the graph: the torch (CPU) path then
        # traces into plain SDPA calls instead of one opaque op that reads a tensor; eagerly the cached CPU tensor
        # is cheapest (the Triton path reads its lengths once per tensor object)
        cu_seqlens = layout.cu_seqlens_list if torch.compiler.is_compiling() else layout.cu_seqlens
        out = multicrop_attention(q, k, v, cu_seqlens, layout.max_seqlen, self.scale)
        return self.proj_drop(self.proj(out.reshape(tokens, dim)))


# the reference's name for the xFormers attention class; here both paths live in Attention
MemEffAttention = Attention
