"""Multi-crop (block-diagonal) attention over one packed token stream.

q, k, v: [total_tokens, heads, head_dim]; cu_seqlens: int32 [n_crops + 1] cumulative crop offsets.
Each crop attends only to its own tokens. The reference runs one SDPA call per group of equal-length crops
(the DINOv3 approach); the Triton kernel (to come) packs short crops into shared tiles.
"""
import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def _seqlens(cu_seqlens):
    offsets = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    return [b - a for a, b in zip(offsets[:-1], offsets[1:])], offsets


def multicrop_attention_reference(q, k, v, cu_seqlens, scale=None):
    """SDPA once per crop-length group; crops of one length need not be contiguous."""
    lengths, offsets = _seqlens(cu_seqlens)
    if offsets[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {offsets[-1]} but q has {q.shape[0]} tokens")
    out = torch.empty_like(q)
    groups = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(offsets[i])
    for n, starts in groups.items():
        if n == 0:
            continue
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
        # [crops, heads, n, head_dim]
        sel = [t.index_select(0, idx).view(len(starts), n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*sel, scale=scale)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(len(starts) * n, *q.shape[1:]))
    return out


def multicrop_attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Block-diagonal attention: each crop of the packed stream attends only to itself."""
    if use_triton(q, k, v):
        from . import attention_triton  # noqa: F401  (provided by the kernels work)
        return attention_triton.multicrop_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale)
    return multicrop_attention_reference(q, k, v, cu_seqlens, scale)
