"""An independent float64 re-computation of the DINOv2 ViT forward from a state dict, with plain torch ops.

Written from the spec (reference_spec.md §4), not from celldino's model code: patchify by reshaping, the
position-embedding interpolation with the spec's formula, attention as softmax(Q K^T / sqrt(d)) V per crop,
LayerNorm / GELU written out, LayerScale, final norm.
"""
import math
import re

import torch
import torch.nn.functional as F


def block_params(state_dict):
    """{global block index: {suffix: tensor}} for chunked (blocks.C.I.*) or unchunked (blocks.I.*) keys."""
    blocks = {}
    for key, value in state_dict.items():
        m = re.match(r"^blocks\.(\d+)\.(\d+)\.(.+)$", key) or re.match(r"^blocks\.(\d+)\.([a-z].*)$", key)
        if not m:
            continue
        index, suffix = (int(m.group(2)), m.group(3)) if m.re.groups == 3 else (int(m.group(1)), m.group(2))
        blocks.setdefault(index, {})[suffix] = value.double()
    return [blocks[i] for i in sorted(blocks)]


def layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def pos_embed_for(pos_embed, h0, w0, offset=0.1, antialias=False):
    """Spec: unchanged when the grid matches and is square; else bicubic in fp32 of the M x M grid, with
    scale_factor ((h0+offset)/M, (w0+offset)/M) when offset != 0, size (h0, w0) when offset == 0."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if h0 * w0 == n and h0 == w0:
        return pos_embed.double()
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        out = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
                            antialias=antialias)
    else:
        out = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
    assert out.shape[-2:] == (h0, w0)
    out = out.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
    return torch.cat([pos_embed[:, :1].float(), out], dim=1).double()


def tokens(state_dict, x, masks=None, offset=0.1, antialias=False):
    """(B, C, H, W) -> (B, 1 + R + N, D) float64 tokens entering block 0."""
    w = state_dict["patch_embed.proj.weight"].double()
    d, c, p, _ = w.shape
    b, _, hh, ww = x.shape
    h0, w0 = hh // p, ww // p
    patches = x.double().reshape(b, c, h0, p, w0, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h0 * w0, c * p * p)
    t = patches @ w.reshape(d, -1).T + state_dict["patch_embed.proj.bias"].double()
    if masks is not None:
        t = torch.where(masks[..., None], state_dict["mask_token"].double()[None], t)
    t = torch.cat([state_dict["cls_token"].double().expand(b, 1, d), t], dim=1)
    t = t + pos_embed_for(state_dict["pos_embed"], h0, w0, offset, antialias)
    if "register_tokens" in state_dict:
        reg = state_dict["register_tokens"].double()
        t = torch.cat([t[:, :1], reg.expand(b, -1, -1), t[:, 1:]], dim=1)
    return t


def attention(x, p, num_heads):
    b, n, d = x.shape
    qkv = x @ p["attn.qkv.weight"].T
    if "attn.qkv.bias" in p:
        qkv = qkv + p["attn.qkv.bias"]
    q, k, v = qkv.reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // num_heads), dim=-1)
    out = (att @ v).transpose(1, 2).reshape(b, n, d) @ p["attn.proj.weight"].T
    return out + p["attn.proj.bias"] if "attn.proj.bias" in p else out


def ffn(x, p):
    if "mlp.fc1.weight" in p:
        h = gelu(x @ p["mlp.fc1.weight"].T + p.get("mlp.fc1.bias", 0))
        return h @ p["mlp.fc2.weight"].T + p.get("mlp.fc2.bias", 0)
    h = x @ p["mlp.w12.weight"].T + p.get("mlp.w12.bias", 0)
    x1, x2 = h.chunk(2, dim=-1)
    return (x1 * torch.sigmoid(x1) * x2) @ p["mlp.w3.weight"].T + p.get("mlp.w3.bias", 0)


def block(x, p, num_heads):
    a = attention(layer_norm(x, p["norm1.weight"], p["norm1.bias"]), p, num_heads)
    x = x + (a * p["ls1.gamma"] if "ls1.gamma" in p else a)
    f = ffn(layer_norm(x, p["norm2.weight"], p["norm2.bias"]), p)
    return x + (f * p["ls2.gamma"] if "ls2.gamma" in p else f)


def forward(state_dict, x, num_heads, masks=None, offset=0.1, antialias=False):
    """Returns (normed output, pre-norm output, [output of every block]) in float64."""
    t = tokens(state_dict, x, masks, offset, antialias)
    per_block = []
    for p in block_params(state_dict):
        t = block(t, p, num_heads)
        per_block.append(t)
    normed = layer_norm(t, state_dict["norm.weight"].double(), state_dict["norm.bias"].double())
    return normed, t, per_block


def spec_keys(dim, depth, patch, in_chans, img, registers, chunks, layerscale=True, ffn="mlp"):
    """{key: shape} written from the spec's description of the reference state dict."""
    n = (img // patch) ** 2
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, n + 1, dim), "mask_token": (1, dim),
            "patch_embed.proj.weight": (dim, in_chans, patch, patch), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        keys["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        prefix = f"blocks.{i // (depth // chunks)}.{i}" if chunks else f"blocks.{i}"
        block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                 "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                 "norm2.weight": (dim,), "norm2.bias": (dim,)}
        if ffn == "mlp":
            block.update({"mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                          "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)})
        else:  # swiglufused: hidden = (int(4D * 2/3) + 7) // 8 * 8
            hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
            block.update({"mlp.w12.weight": (2 * hidden, dim), "mlp.w12.bias": (2 * hidden,),
                          "mlp.w3.weight": (dim, hidden), "mlp.w3.bias": (dim,)})
        if layerscale:
            block.update({"ls1.gamma": (dim,), "ls2.gamma": (dim,)})
        keys.update({f"{prefix}.{k}": v for k, v in block.items()})
    return keys
