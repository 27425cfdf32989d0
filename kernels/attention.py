"""Multi-crop (block-diagonal) attention over one packed token stream.

    multicrop_attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None) -> o

q, k, v: [total_tokens, heads, head_dim] (any strides). cu_seqlens: the [n_crops + 1] cumulative crop offsets
(0, n_0, n_0 + n_1, ..., total_tokens), either an int32 tensor (CPU avoids one device->host copy per new tensor)
or a sequence of Python ints. Both work eagerly and under torch.compile(fullgraph=True) on every path; under
compile a sequence is a constant of the graph (the torch path then traces into plain SDPA calls), a tensor goes
through one opaque custom op (its offsets are read when the op runs). Each crop attends only to its own tokens;
o is [total_tokens, heads, head_dim], contiguous, in q's dtype. Differentiable in q, k and v.

Implementations (chosen by `_dispatch`):
- `multicrop_attention_reference`: plain torch, one SDPA call per group of equal-length crops (the DINOv3
  approach); the CPU path and the ground truth of the tests.
- the Triton kernels below (FlashAttention-2 style: online softmax, fp32 accumulation, log-sum-exp saved for the
  backward, delta = rowsum(dO * O)).

Why a kernel: DINOv2 crops are short (37..257 tokens). One 128-row tile per crop (flash-attn varlen, SDPA per
group) leaves most of a tile empty for local crops. Here whole short crops are packed into one tile of TILE query
rows (block-diagonal *inside* the tile: a score is kept only where the query's crop id equals the key's crop id),
crops longer than a tile get tiles of their own, and a tile only visits the keys of the crops it holds. The tile
table (row range and key range per tile) is built on the host once per crop-length signature and cached on the
device. A call costs one launch forward and one backward (one program per crop-closed group computes dq, dk and
dv: five matmuls, nothing recomputed), with no padding copies and no atomics (deterministic). Crops longer than
FUSED_BWD_MAX_TILES tiles take a split FlashAttention-2 backward (delta, dk/dv, dq: three launches).
See docs/kernels.md.
"""
import math
import weakref
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ._dispatch import backend, interpreting, launch_autotuned, triton_available, tuning_space, use_triton

# ----------------------------------------------------------------------------------------------------------------
# plain-torch reference
# ----------------------------------------------------------------------------------------------------------------


def _integer_offsets(cu_seqlens):
    """cu_seqlens as a list of ints; a floating-point tensor and fractional values are refused (a float tensor used
    to build a tile table that missed tokens, and a list of floats was truncated silently); 16.0 counts as 16."""
    if torch.is_tensor(cu_seqlens):
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"multicrop_attention: cu_seqlens must be an int32 / int64 tensor, got {cu_seqlens.dtype}")
        return cu_seqlens.tolist()
    offsets = list(cu_seqlens)
    if any(isinstance(x, bool) or int(x) != x for x in offsets):
        raise ValueError(f"multicrop_attention: cu_seqlens must hold integers, got {offsets[:8]}...")
    return [int(x) for x in offsets]



def _check_inputs(q, k, v, offsets):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"multicrop_attention: q, k, v must all be [total_tokens, heads, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"multicrop_attention: q, k, v must share dtype and device, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}")
    if len(offsets) < 1 or offsets[0] != 0 or any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"multicrop_attention: cu_seqlens must start at 0 and be non-decreasing, got {offsets[:8]}...")
    if offsets[-1] != q.shape[0]:
        raise ValueError(f"multicrop_attention: cu_seqlens ends at {offsets[-1]} but q has {q.shape[0]} tokens")


def _length_groups(offsets, device):
    """[(n, token index [crops * n]), ...]: the crops of each non-zero length, in one SDPA batch per length (crops
    of one length need not be contiguous)."""
    starts = {}
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if hi > lo:
            starts.setdefault(hi - lo, []).append(lo)
    return [(n, (torch.tensor(s, device=device)[:, None] + torch.arange(n, device=device)).reshape(-1))
            for n, s in starts.items()]


def _gather_crops(t, idx, n):
    """[T, heads, d] -> [crops, heads, n, d] for the tokens idx of crops of length n."""
    return t.index_select(0, idx).view(-1, n, *t.shape[1:]).transpose(1, 2)


def _scatter_crops(out, idx, crops):
    out.index_copy_(0, idx, crops.transpose(1, 2).reshape(-1, *out.shape[1:]))


def _reference_forward(q, k, v, offsets, scale):
    _check_inputs(q, k, v, offsets)
    out = q.new_empty(q.shape)
    for n, idx in _length_groups(offsets, q.device):
        o = F.scaled_dot_product_attention(*(_gather_crops(t, idx, n) for t in (q, k, v)), scale=scale)
        _scatter_crops(out, idx, o)
    return out


def multicrop_attention_reference(q, k, v, cu_seqlens, scale=None):
    """SDPA once per crop-length group; cu_seqlens an int tensor or a sequence of ints (see the module doc)."""
    if torch.is_tensor(cu_seqlens) and torch.compiler.is_compiling():
        # reading a tensor's offsets on the host is data-dependent (a graph break under fullgraph): one opaque op
        return torch.ops.celldino.multicrop_attention_reference(q, k, v, cu_seqlens, scale)
    return _reference_forward(q, k, v, _integer_offsets(cu_seqlens), scale)


# The reference behind a custom op, for tensor offsets under torch.compile. Autograd does not record inside a
# custom op, so its backward is written out: P = softmax(s QK^T), dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)),
# dQ = s dS K, dK = s dS^T Q (half precision computed in fp32).
@torch.library.custom_op("celldino::multicrop_attention_reference", mutates_args=())
def _reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  scale: float | None) -> torch.Tensor:
    return _reference_forward(q, k, v, _integer_offsets(cu_seqlens), scale)


@_reference_op.register_fake
def _reference_fake(q, k, v, cu_seqlens, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("celldino::multicrop_attention_reference_bwd", mutates_args=())
def _reference_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = _integer_offsets(cu_seqlens)
    _check_inputs(q, k, v, offsets)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    work = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (q.new_zeros(q.shape) for _ in range(3))  # zero-length crops own no token; the rest is overwritten
    for n, idx in _length_groups(offsets, q.device):
        qc, kc, vc, doc = (_gather_crops(t, idx, n).to(work) for t in (q, k, v, do))
        p = torch.softmax(qc @ kc.transpose(-1, -2) * s, dim=-1)
        dp = doc @ vc.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        for grad, crops in ((dq, ds @ kc * s), (dk, ds.transpose(-1, -2) @ qc * s), (dv, p.transpose(-1, -2) @ doc)):
            _scatter_crops(grad, idx, crops.to(q.dtype))
    return dq, dk, dv


@_reference_bwd_op.register_fake
def _reference_bwd_fake(do, q, k, v, cu_seqlens, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _reference_op_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.scale = scale


def _reference_op_backward(ctx, do):
    q, k, v, cu_seqlens = ctx.saved_tensors
    return (*_reference_bwd_op(do, q, k, v, cu_seqlens, ctx.scale), None, None)


_reference_op.register_autograd(_reference_op_backward, setup_context=_reference_op_setup)


# ----------------------------------------------------------------------------------------------------------------
# tile table: which query rows and which keys each program handles
# ----------------------------------------------------------------------------------------------------------------

FUSED_BWD_MAX_TILES = 4  # crops up to this many tiles (512 tokens at tile 128) get the one-program backward

_TABLE_CACHE = OrderedDict()  # (lengths, tile, device) -> TileTable
_TABLE_CACHE_SIZE = 64
_CU_CACHE = {}  # id(cu_seqlens tensor) -> (weakref, version, lengths): skips .tolist() for a reused tensor
_OFFSETS_CACHE = {}  # (offsets tuple, tile, device, tokens) -> TileTable, for int offsets


class TileTable(NamedTuple):
    """Work lists of one crop layout (numpy on the host, int32 tensors on the device).

    tiles [n, 5]      forward: (row_lo, row_hi, key_lo, key_hi, single_crop); at most `tile` query rows whose
                      keys all lie in [key_lo, key_hi); single_crop = 1 when every row belongs to one crop (so
                      full key blocks need no mask).
    groups [g, 2]     fused backward: crop-closed row ranges (rows == keys): a packed tile, or one crop of up to
                      FUSED_BWD_MAX_TILES tiles. One program computes dq, dk and dv of the whole group.
    long_tiles [m, 5] split backward (dk/dv and dq kernels, per tile) for crops longer than that.
    crop_id [T]       crop index of every token.
    """
    tiles: object
    groups: object
    long_tiles: object
    crop_id: object
    max_group: int  # rows of the largest fused group (> the key tile: dq is accumulated in an fp32 scratch)


def build_tile_table(lengths, tile, fused_max_tiles=FUSED_BWD_MAX_TILES):
    """Host-side TileTable for crops of `lengths` laid out back to back.

    Whole crops of <= tile tokens are packed greedily into shared tiles (rows == keys == the packed crops); a
    longer crop gets its own ceil(n / tile) tiles, each reading the whole crop as keys. Work lists are ordered by
    decreasing cost so the longest programs start first (longest-processing-time scheduling).
    """
    tiles, groups, long_tiles = [], [], []
    offset = 0
    open_lo, open_crops = None, 0  # first row and crop count of the packed tile being filled

    def close(end):
        tiles.append((open_lo, end, open_lo, end, int(open_crops == 1)))
        groups.append((open_lo, end))

    for n in lengths:
        n = int(n)
        if n == 0:
            continue
        if n > tile:
            if open_lo is not None:
                close(offset)
                open_lo = None
            own = [(r, min(r + tile, offset + n), offset, offset + n, 1) for r in range(offset, offset + n, tile)]
            tiles.extend(own)
            if len(own) <= fused_max_tiles:
                groups.append((offset, offset + n))
            else:
                long_tiles.extend(own)
        else:
            if open_lo is not None and offset + n - open_lo > tile:
                close(offset)
                open_lo = None
            if open_lo is None:
                open_lo, open_crops = offset, 0
            open_crops += 1
        offset += n
    if open_lo is not None:
        close(offset)
    # stable sorts: ties keep stream order
    tiles.sort(key=lambda t: t[3] - t[2], reverse=True)
    long_tiles.sort(key=lambda t: t[3] - t[2], reverse=True)
    groups.sort(key=lambda g: -(-(g[1] - g[0]) // tile) * (g[1] - g[0]), reverse=True)
    crop_id = np.repeat(np.arange(len(lengths), dtype=np.int32), np.asarray(lengths, dtype=np.int64))
    return TileTable(np.asarray(tiles, dtype=np.int32).reshape(-1, 5),
                     np.asarray(groups, dtype=np.int32).reshape(-1, 2),
                     np.asarray(long_tiles, dtype=np.int32).reshape(-1, 5), crop_id,
                     max((hi - lo for lo, hi in groups), default=0))


def _lengths(cu_seqlens):
    """Crop lengths as a tuple; a tensor seen before (same object, unmodified) costs no device->host copy. The cache
    tracks in-place torch edits through the tensor's version counter; inference tensors have none and are re-read."""
    cacheable = torch.is_tensor(cu_seqlens) and not cu_seqlens.is_inference()
    if cacheable:
        hit = _CU_CACHE.get(id(cu_seqlens))
        if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
            return hit[2]
    offsets = _integer_offsets(cu_seqlens)
    lengths = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    if len(offsets) < 1 or offsets[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"multicrop_attention: cu_seqlens must start at 0 and be non-decreasing, got {offsets[:8]}...")
    if cacheable:
        if len(_CU_CACHE) > 256:
            for key in [key for key, val in _CU_CACHE.items() if val[0]() is None]:
                del _CU_CACHE[key]
        _CU_CACHE[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, lengths)
    return lengths


def _device_table(lengths, tile, device):
    key = (lengths, tile, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    host = build_tile_table(lengths, tile)
    # one host->device copy for all four arrays
    flat = np.concatenate([host.tiles.ravel(), host.groups.ravel(), host.long_tiles.ravel(), host.crop_id])
    dev = torch.from_numpy(flat).to(device)
    sizes = [host.tiles.size, host.groups.size, host.long_tiles.size, host.crop_id.size]
    parts = torch.split(dev, sizes)
    hit = TileTable(parts[0].view(-1, 5), parts[1].view(-1, 2), parts[2].view(-1, 5), parts[3],
                    host.max_group)
    _TABLE_CACHE[key] = hit
    while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return hit


def default_tile(dtype, head_dim):
    """Query rows per tile: 128 (the flash tile) for 16-bit inputs; 64 for fp32, whose registers fill twice as fast."""
    return 128 if (dtype in (torch.float16, torch.bfloat16) or head_dim <= 32) else 64


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _program_entry(n_heads):
        """(work-list entry, head) of this program. The grid is 1-D with heads fastest: CTAs launch in the work
        list's longest-first order across all heads, and neighbouring CTAs read the same token rows (adjacent head
        slices) while they are in L2."""
        return tl.program_id(0) // n_heads, (tl.program_id(0) % n_heads).to(tl.int64)

    @triton.jit
    def _tile_offsets(head, rows64, dims, stride_t, stride_h, stride_d):
        """Element offsets of the [rows, dims] tile of one head in a [tokens, heads, head_dim] tensor."""
        return head * stride_h + rows64[:, None] * stride_t + dims[None, :] * stride_d

    @triton.jit
    def _tile_ranges(TILES, tile_id):
        """(row_lo, row_hi, key_lo, key_hi) of one tile-table entry (TileTable.tiles)."""
        entry = TILES + tile_id * 5
        return tl.load(entry + 0), tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3)

    @triton.jit
    def _fwd_key_blocks(acc, l_i, m_i, q, crop_q, K, V, CROP, head, start_lo, start_hi, key_hi, qk_scale,
                        stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
        """Online-softmax update over key blocks [start_lo, start_hi). MASKED=False: every key is valid for
        every row (full blocks of a single-crop tile), so the score mask is skipped."""
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        for start in range(start_lo, start_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < key_hi
            cols64 = cols.to(tl.int64)
            k = tl.load(K + _tile_offsets(head, cols64, dims, stride_kt, stride_kh, stride_kd),
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            v = tl.load(V + _tile_offsets(head, cols64, dims, stride_vt, stride_vh, stride_vd),
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if MASKED:
                # block-diagonal inside the tile: a query sees only keys of its own crop (also masks padding)
                crop_k = tl.load(CROP + cols, mask=col_ok, other=-2)
                s = tl.where(crop_q[:, None] == crop_k[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no inf - inf
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = m_new
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, TILES, CROP,
                         qk_scale,  # softmax scale * log2(e): the kernel works in base 2
                         stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                         stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od, stride_lh,
                         n_tiles, n_heads,
                         HEAD_DIM: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        tile_id, head = _program_entry(n_heads)
        row_lo, row_hi, key_lo, key_hi = _tile_ranges(TILES, tile_id)
        single_crop = tl.load(TILES + tile_id * 5 + 4)

        rows = row_lo + tl.arange(0, TILE)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < row_hi
        dim_ok = dims < HEAD_DIM
        rows64 = rows.to(tl.int64)
        crop_q = tl.load(CROP + rows, mask=row_ok, other=-1)
        q = tl.load(Q + _tile_offsets(head, rows64, dims, stride_qt, stride_qh, stride_qd),
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

        m_i = tl.full([TILE], float("-inf"), tl.float32)
        l_i = tl.zeros([TILE], tl.float32)
        acc = tl.zeros([TILE, BLOCK_D], tl.float32)
        # single-crop tile: its full key blocks are unmasked (padding rows compute finite garbage, never stored)
        full_hi = key_lo + tl.where(single_crop != 0, (key_hi - key_lo) // BLOCK_N, 0) * BLOCK_N
        acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, crop_q, K, V, CROP, head, key_lo, full_hi, key_hi,
                                        qk_scale, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                                        HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION, False)
        acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, crop_q, K, V, CROP, head, full_hi, key_hi, key_hi,
                                        qk_scale, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                                        HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION, True)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows have no key at all
        out = acc / l_safe[:, None]
        tl.store(O + _tile_offsets(head, rows64, dims, stride_ot, stride_oh, stride_od),
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(LSE + head * stride_lh + rows64, m_i + tl.log2(l_safe), mask=row_ok)

    @triton.jit
    def _attn_bwd_fused_kernel(Q, K, V, O, DO, DQ, DK, DV, DQ_ACC, LSE, GROUPS, CROP,
                               sm_scale, qk_scale,
                               stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                               stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
                               stride_dot, stride_doh, stride_dod, stride_gt, stride_gh, stride_gd,
                               stride_at, stride_ah, stride_ad, stride_lh,
                               n_groups, n_heads,
                               HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One program per (group, head) computes dq, dk and dv of a crop-closed group (rows == keys): five
        matmuls per block, no recomputation, no atomics, delta = rowsum(dO * O) computed in place.

        Outer loop: key tiles of BLOCK_K rows (dk, dv accumulate in registers); inner loop: query blocks of
        BLOCK_N rows. dq of a query block gets one term per key tile: a one-tile group stores it at once, a
        longer group adds it up in DQ_ACC (fp32, written and read back only by this program)."""
        group_id, head = _program_entry(n_heads)
        lo = tl.load(GROUPS + group_id * 2 + 0)
        hi = tl.load(GROUPS + group_id * 2 + 1)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        for kt in range(lo, hi, BLOCK_K):
            keys = kt + tl.arange(0, BLOCK_K)
            key_ok = keys < hi
            keys64 = keys.to(tl.int64)
            crop_k = tl.load(CROP + keys, mask=key_ok, other=-1)
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(K + _tile_offsets(head, keys64, dims, stride_kt, stride_kh, stride_kd), mask=kv_mask, other=0.0)
            v = tl.load(V + _tile_offsets(head, keys64, dims, stride_vt, stride_vh, stride_vd), mask=kv_mask, other=0.0)
            dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
            for qs in range(lo, hi, BLOCK_N):
                qrows = qs + tl.arange(0, BLOCK_N)
                q_ok = qrows < hi
                qrows64 = qrows.to(tl.int64)
                q_mask = q_ok[:, None] & dim_ok[None, :]
                crop_q = tl.load(CROP + qrows, mask=q_ok, other=-2)
                q = tl.load(Q + _tile_offsets(head, qrows64, dims, stride_qt, stride_qh, stride_qd),
                            mask=q_mask, other=0.0)
                do = tl.load(DO + _tile_offsets(head, qrows64, dims, stride_dot, stride_doh, stride_dod),
                             mask=q_mask, other=0.0)
                o = tl.load(O + _tile_offsets(head, qrows64, dims, stride_ot, stride_oh, stride_od),
                            mask=q_mask, other=0.0)
                lse = tl.load(LSE + head * stride_lh + qrows64, mask=q_ok, other=0.0)
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [keys, queries]
                p_t = tl.exp2(tl.where(crop_k[:, None] == crop_q[None, :], s_t - lse[None, :], float("-inf")))
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
                dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
                dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)  # [queries, dims], this key tile
                acc_ptrs = DQ_ACC + _tile_offsets(head, qrows64, dims, stride_at, stride_ah, stride_ad)
                if kt != lo:
                    dq += tl.load(acc_ptrs, mask=q_mask, other=0.0)
                if kt + BLOCK_K >= hi:
                    tl.store(DQ + _tile_offsets(head, qrows64, dims, stride_gt, stride_gh, stride_gd),
                             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
                else:
                    tl.store(acc_ptrs, dq, mask=q_mask)
            tl.store(DK + _tile_offsets(head, keys64, dims, stride_gt, stride_gh, stride_gd),
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(DV + _tile_offsets(head, keys64, dims, stride_gt, stride_gh, stride_gd),
                     dv.to(DV.dtype.element_ty), mask=kv_mask)
            tl.debug_barrier()  # DQ_ACC written above is read by other threads in the next key tile

    @triton.jit
    def _attn_bwd_delta_kernel(O, DO, DELTA, total_tokens,
                               stride_ot, stride_oh, stride_od, stride_dt, stride_dh, stride_dd, stride_lh,
                               HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta[h, t] = sum_d o[t, h, d] * do[t, h, d] in fp32 (the softmax-backward row term)."""
        head = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        dims = tl.arange(0, BLOCK_D)
        rows64 = rows.to(tl.int64)
        ok = (rows < total_tokens)[:, None] & (dims < HEAD_DIM)[None, :]
        o = tl.load(O + _tile_offsets(head, rows64, dims, stride_ot, stride_oh, stride_od), mask=ok, other=0.0)
        do = tl.load(DO + _tile_offsets(head, rows64, dims, stride_dt, stride_dh, stride_dd), mask=ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + head * stride_lh + rows64, delta, mask=rows < total_tokens)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, TILES, CROP,
                              sm_scale, qk_scale,
                              stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                              stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
                              stride_gt, stride_gh, stride_gd, stride_lh,
                              n_tiles, n_heads,
                              HEAD_DIM: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Split backward, long crops: one program per (tile, head); the tile's rows act as keys, the queries are
        its crop (= the tile's key range)."""
        tile_id, head = _program_entry(n_heads)
        row_lo, row_hi, key_lo, key_hi = _tile_ranges(TILES, tile_id)

        keys = row_lo + tl.arange(0, TILE)
        dims = tl.arange(0, BLOCK_D)
        key_ok = keys < row_hi
        dim_ok = dims < HEAD_DIM
        keys64 = keys.to(tl.int64)
        crop_k = tl.load(CROP + keys, mask=key_ok, other=-1)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + _tile_offsets(head, keys64, dims, stride_kt, stride_kh, stride_kd), mask=kv_mask, other=0.0)
        v = tl.load(V + _tile_offsets(head, keys64, dims, stride_vt, stride_vh, stride_vd), mask=kv_mask, other=0.0)
        dk = tl.zeros([TILE, BLOCK_D], tl.float32)
        dv = tl.zeros([TILE, BLOCK_D], tl.float32)
        for start in range(key_lo, key_hi, BLOCK_N):
            qrows = start + tl.arange(0, BLOCK_N)
            q_ok = qrows < key_hi
            qrows64 = qrows.to(tl.int64)
            crop_q = tl.load(CROP + qrows, mask=q_ok, other=-2)
            q_mask = q_ok[:, None] & dim_ok[None, :]
            q = tl.load(Q + _tile_offsets(head, qrows64, dims, stride_qt, stride_qh, stride_qd), mask=q_mask, other=0.0)
            do = tl.load(DO + _tile_offsets(head, qrows64, dims, stride_dot, stride_doh, stride_dod),
                         mask=q_mask, other=0.0)
            lse = tl.load(LSE + head * stride_lh + qrows64, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + head * stride_lh + qrows64, mask=q_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [keys, queries]
            p_t = tl.exp2(tl.where(crop_k[:, None] == crop_q[None, :], s_t - lse[None, :], float("-inf")))
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        dk *= sm_scale
        tl.store(DK + _tile_offsets(head, keys64, dims, stride_gt, stride_gh, stride_gd),
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + _tile_offsets(head, keys64, dims, stride_gt, stride_gh, stride_gd),
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, TILES, CROP,
                            sm_scale, qk_scale,
                            stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                            stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
                            stride_gt, stride_gh, stride_gd, stride_lh,
                            n_tiles, n_heads,
                            HEAD_DIM: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Split backward, long crops: dq of a tile's query rows, accumulated over its key range."""
        tile_id, head = _program_entry(n_heads)
        row_lo, row_hi, key_lo, key_hi = _tile_ranges(TILES, tile_id)

        rows = row_lo + tl.arange(0, TILE)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < row_hi
        dim_ok = dims < HEAD_DIM
        rows64 = rows.to(tl.int64)
        crop_q = tl.load(CROP + rows, mask=row_ok, other=-1)
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + _tile_offsets(head, rows64, dims, stride_qt, stride_qh, stride_qd), mask=q_mask, other=0.0)
        do = tl.load(DO + _tile_offsets(head, rows64, dims, stride_dot, stride_doh, stride_dod), mask=q_mask, other=0.0)
        lse = tl.load(LSE + head * stride_lh + rows64, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + head * stride_lh + rows64, mask=row_ok, other=0.0)
        dq = tl.zeros([TILE, BLOCK_D], tl.float32)
        for start in range(key_lo, key_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < key_hi
            cols64 = cols.to(tl.int64)
            crop_k = tl.load(CROP + cols, mask=col_ok, other=-2)
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(K + _tile_offsets(head, cols64, dims, stride_kt, stride_kh, stride_kd), mask=kv_mask, other=0.0)
            v = tl.load(V + _tile_offsets(head, cols64, dims, stride_vt, stride_vh, stride_vd), mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.exp2(tl.where(crop_q[:, None] == crop_k[None, :], s - lse[:, None], float("-inf")))
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq *= sm_scale
        tl.store(DQ + _tile_offsets(head, rows64, dims, stride_gt, stride_gh, stride_gd),
                 dq.to(DQ.dtype.element_ty), mask=q_mask)

    def _configs(*specs):
        return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st) for bn, w, st in specs]

    # Autotune spaces, pruned with ptxas -v on sm_90 at head_dim 64 (configs that spill heavily are left out).
    # The layout key is static for a training run: tuning happens once per (layout, head_dim, dtype).
    _FWD_CONFIGS = _configs((32, 4, 2), (32, 4, 3), (32, 8, 3), (64, 4, 3), (64, 8, 2), (64, 8, 3), (64, 8, 4),
                            (128, 8, 2), (128, 8, 3))
    # fused backward: the key tile (BLOCK_K) is independent of the packing tile; 128 x 32 x 8 warps is the
    # spill-free default at head_dim 64, the others trade registers for fewer passes
    _FUSED_CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bk, bn, w, st in (
        (128, 32, 8, 2), (128, 32, 8, 3), (128, 16, 4, 2), (128, 16, 8, 2), (128, 64, 8, 2),
        (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2))]
    _SPLIT_CONFIGS = _configs((32, 8, 2), (16, 4, 2), (16, 8, 2), (32, 8, 3), (64, 8, 2))
    _attn_fwd_tuned = triton.autotune(tuning_space(_FWD_CONFIGS), key=["HEAD_DIM", "n_tiles", "n_heads"])(
        _attn_fwd_kernel)
    _attn_bwd_fused_tuned = triton.autotune(tuning_space(_FUSED_CONFIGS), key=["HEAD_DIM", "n_groups", "n_heads"])(
        _attn_bwd_fused_kernel)
    _attn_bwd_dkdv_tuned = triton.autotune(tuning_space(_SPLIT_CONFIGS), key=["HEAD_DIM", "n_tiles", "n_heads"])(
        _attn_bwd_dkdv_kernel)
    _attn_bwd_dq_tuned = triton.autotune(tuning_space(_SPLIT_CONFIGS), key=["HEAD_DIM", "n_tiles", "n_heads"])(
        _attn_bwd_dq_kernel)

_LOG2E = 1.4426950408889634
_INTERPRET_BLOCK_N = 16  # one config under TRITON_INTERPRET=1


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype):
    # fp32 inputs get true fp32 products (no TF32), like the fp32 torch reference they are compared with
    return "ieee" if dtype == torch.float32 else "tf32"


_PINNED_BLOCK_K = None  # fused-backward key tile when BLOCK_N is pinned (default: the packing tile); tests vary it


def _pinned(block_n):
    """BLOCK_N to use instead of autotuning: the caller's, or the interpreter's single config; None = autotune."""
    return block_n if block_n is not None else (_INTERPRET_BLOCK_N if interpreting() else None)


def _launch(tuned, plain, grid, args, consts, meta):
    """Autotuned on a GPU (meta None); explicit meta-parameters under the interpreter or when pinned."""
    if meta is None:
        launch_autotuned(tuned, grid, *args, **consts)
    else:
        plain[grid](*args, **consts, **meta)


def _attn_forward(q, k, v, table, scale, tile, block_n=None):
    total, heads, head_dim = q.shape
    o = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    n_tiles = table.tiles.shape[0]
    if n_tiles == 0 or heads == 0:
        return o, lse
    args = (q, k, v, o, lse, table.tiles, table.crop_id, scale * _LOG2E, *q.stride(), *k.stride(), *v.stride(),
            *o.stride(), lse.stride(0), n_tiles, heads)
    consts = dict(HEAD_DIM=head_dim, TILE=tile, BLOCK_D=_block_d(head_dim), DOT_PRECISION=_precision(q.dtype))
    pinned = _pinned(block_n)
    _launch(_attn_fwd_tuned, _attn_fwd_kernel, (n_tiles * heads,), args, consts,
            None if pinned is None else {"BLOCK_N": pinned})
    return o, lse


def _attn_backward(do, q, k, v, o, lse, table, scale, tile, block_n=None):
    total, heads, head_dim = q.shape
    dq = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if total == 0 or heads == 0:
        return dq, dk, dv
    block_d = _block_d(head_dim)
    consts = dict(HEAD_DIM=head_dim, TILE=tile, BLOCK_D=block_d, DOT_PRECISION=_precision(q.dtype))
    n_groups = table.groups.shape[0]
    if n_groups:
        pinned = _pinned(block_n)
        meta = None if pinned is None else {"BLOCK_N": pinned, "BLOCK_K": _PINNED_BLOCK_K or tile}
        # fp32 dq scratch for groups spanning several key tiles (the smallest autotuned key tile is 64 rows)
        smallest_block_k = 64 if meta is None else meta["BLOCK_K"]
        needs_acc = table.max_group > smallest_block_k
        dq_acc = torch.empty((total, heads, head_dim), dtype=torch.float32, device=q.device) if needs_acc else dq
        args = (q, k, v, o, do, dq, dk, dv, dq_acc, lse, table.groups, table.crop_id, scale, scale * _LOG2E,
                *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), *dq_acc.stride(),
                lse.stride(0), n_groups, heads)
        fused_consts = {key: val for key, val in consts.items() if key != "TILE"}
        _launch(_attn_bwd_fused_tuned, _attn_bwd_fused_kernel, (n_groups * heads,), args, fused_consts, meta)
    n_long = table.long_tiles.shape[0]
    if n_long:
        delta = torch.empty_like(lse)
        block_t = 64 if not interpreting() else 128
        _attn_bwd_delta_kernel[(triton.cdiv(total, block_t), heads)](
            o, do, delta, total, *o.stride(), *do.stride(), delta.stride(0), HEAD_DIM=head_dim, BLOCK_T=block_t,
            BLOCK_D=block_d)
        common = (scale, scale * _LOG2E, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                  lse.stride(0), n_long, heads)
        pinned = _pinned(block_n)
        meta = None if pinned is None else {"BLOCK_N": pinned}
        _launch(_attn_bwd_dkdv_tuned, _attn_bwd_dkdv_kernel, (n_long * heads,),
                (q, k, v, do, dk, dv, lse, delta, table.long_tiles, table.crop_id, *common), consts, meta)
        _launch(_attn_bwd_dq_tuned, _attn_bwd_dq_kernel, (n_long * heads,),
                (q, k, v, do, dq, lse, delta, table.long_tiles, table.crop_id, *common), consts, meta)
    return dq, dk, dv


class _MultiCropAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, scale, tile, block_n):
        o, lse = _attn_forward(q, k, v, table, scale, tile, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.table, ctx.scale, ctx.tile, ctx.block_n = table, scale, tile, block_n
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, ctx.table, ctx.scale, ctx.tile, ctx.block_n)
        return dq, dk, dv, None, None, None, None


_HAS_TRITON = triton_available()


def _check_triton_inputs(q, k, v):
    if not _HAS_TRITON:
        raise RuntimeError("multicrop_attention_triton: triton is not importable")
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"multicrop_attention: q, k, v must all be [total_tokens, heads, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"multicrop_attention (triton): q, k, v must share one of float16/bfloat16/float32, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"multicrop_attention: q, k, v on different devices {q.device}/{k.device}/{v.device}")
    if q.shape[2] > 128 or q.shape[2] < 1:
        raise ValueError(f"multicrop_attention (triton): head_dim {q.shape[2]} is not supported (1..128); use "
                         "CELLDINO_KERNELS=torch for larger heads")


def _table_for(cu_seqlens, q, tile):
    if not torch.is_tensor(cu_seqlens):
        # int offsets (what compiled blocks pass, twice per block and step): one tuple() and a dict lookup
        # instead of rebuilding and checking the lengths (~37 us per call at batch 32 x 10 crops)
        key = (tuple(cu_seqlens), tile, q.device, q.shape[0])
        hit = _OFFSETS_CACHE.get(key)
        if hit is not None:
            return hit
    lengths = _lengths(cu_seqlens)
    if sum(lengths) != q.shape[0]:
        raise ValueError(f"multicrop_attention: cu_seqlens ends at {sum(lengths)} but q has {q.shape[0]} tokens")
    table = _device_table(lengths, tile, q.device)
    if not torch.is_tensor(cu_seqlens):
        if len(_OFFSETS_CACHE) >= _TABLE_CACHE_SIZE:
            _OFFSETS_CACHE.clear()
        _OFFSETS_CACHE[key] = table
    return table


def multicrop_attention_triton(q, k, v, cu_seqlens, max_seqlen=None, scale=None, *, tile=None, block_n=None):
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    tile: query rows per tile (default `default_tile`); block_n: pin the inner block size instead of autotuning
    (tests and benchmarks). max_seqlen is accepted for flash-attn compatibility and not needed: the tile table
    knows every crop length. Under torch.compile the call is one opaque custom op (no graph break).
    """
    _check_triton_inputs(q, k, v)
    tile = int(tile or default_tile(q.dtype, q.shape[2]))
    for name, value in (("tile", tile), ("block_n", block_n)):
        if value is not None and (int(value) < 16 or int(value) & (int(value) - 1)):
            raise ValueError(f"multicrop_attention_triton: {name} must be a power of 2 >= 16, got {value}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[2])
    if torch.compiler.is_compiling():
        # offsets given as ints stay ints in the graph (no CPU tensor constant, which would keep inductor from
        # capturing the graph in a CUDA graph); a tensor is passed through as a tensor
        if torch.is_tensor(cu_seqlens):
            out, _ = torch.ops.celldino.multicrop_attention_fwd(q, k, v, cu_seqlens, [], scale, tile, block_n)
        else:
            out, _ = torch.ops.celldino.multicrop_attention_fwd(q, k, v, None, [int(x) for x in cu_seqlens], scale,
                                                                tile, block_n)
        return out
    table = _table_for(cu_seqlens, q, tile)
    return _MultiCropAttention.apply(q, k, v, table, scale, tile, block_n)


# torch.compile path: the same launchers behind two custom ops, so dynamo treats the call as one opaque node.
# (Eager calls use the autograd.Function above: a custom op costs ~15 us more per call on the host.)
# The crop offsets come either as a tensor (cu_seqlens; offsets empty) or as ints (offsets; cu_seqlens None).
def _offsets_of(cu_seqlens, offsets):
    return cu_seqlens if cu_seqlens is not None else offsets


@torch.library.custom_op("celldino::multicrop_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, offsets: list[int],
            scale: float, tile: int, block_n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _attn_forward(q, k, v, _table_for(_offsets_of(cu_seqlens, offsets), q, tile), scale, tile, block_n)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens, offsets, scale, tile, block_n):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("celldino::multicrop_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            cu_seqlens: torch.Tensor | None, offsets: list[int], scale: float, tile: int,
            block_n: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    table = _table_for(_offsets_of(cu_seqlens, offsets), q, tile)
    return _attn_backward(do, q, k, v, o, lse, table, scale, tile, block_n)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, cu_seqlens, offsets, scale, tile, block_n):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _fwd_op_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, offsets, scale, tile, block_n = inputs
    ctx.has_tensor_offsets = cu_seqlens is not None
    ctx.save_for_backward(q, k, v, output[0], output[1], *((cu_seqlens,) if ctx.has_tensor_offsets else ()))
    ctx.offsets, ctx.scale, ctx.tile, ctx.block_n = list(offsets), scale, tile, block_n


def _fwd_op_backward(ctx, do, _dlse):
    q, k, v, o, lse, *cu_seqlens = ctx.saved_tensors
    cu_seqlens = cu_seqlens[0] if ctx.has_tensor_offsets else None
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, cu_seqlens, ctx.offsets, ctx.scale, ctx.tile, ctx.block_n)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)


def triton_supported(q):
    """Whether the Triton path handles these inputs (dtype and head_dim); auto dispatch falls back otherwise."""
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.dim() == 3 and q.shape[-1] <= 128


def multicrop_attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Block-diagonal attention: each crop of the packed stream attends only to itself."""
    # auto sends what the kernels cannot do (float64, head_dim > 128) to the reference; forced triton raises instead
    if use_triton(q, k, v) and (triton_supported(q) or backend() == "triton"):
        return multicrop_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale)
    return multicrop_attention_reference(q, k, v, cu_seqlens, scale)

