"""DinoVisionTransformer: the DINOv2 / Cell-DINO ViT with the reference's constructor, state-dict keys and outputs.

Reference behaviour kept exactly (dinov2 @ 7b187bd): patchify -> mask_token where masked -> prepend CLS -> add the
(interpolated) position embedding -> insert registers after CLS -> blocks -> final LayerNorm; the same pos-embed
interpolation (bicubic in fp32, offset 0.1 => scale_factor, offset 0 => size, antialias flag) so released weights
give the same embeddings at every resolution; bag-of-channels `get_intermediate_layers` for channel_adaptive.

What differs (speed, same math): `forward_features_list` runs all crops as ONE packed token stream (every Linear /
LayerNorm / MLP once on [sum_tokens, D]; attention through `celldino.kernels.multicrop_attention`), where the
reference concatenates per block with xFormers.
"""
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from .layers import Block, BlockChunk, Mlp, PatchEmbed, SwiGLUFFNFused
from .layers.packing import get_packed_layout, pack, unpack

logger = logging.getLogger("celldino")

FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


def _identity_ffn(*args, **kwargs):
    return nn.Identity()


def _ffn_class(ffn_layer):
    if ffn_layer == "mlp":
        return Mlp
    if ffn_layer in ("swiglu", "swiglufused"):  # the reference builds the fused-width SwiGLU for both names
        return SwiGLUFFNFused
    if ffn_layer == "identity":
        return _identity_ffn
    raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")


def block_prefix(index, chunk_of):
    """State-dict prefix of block `index` under the chunk layout `chunk_of` (None: unchunked)."""
    return f"blocks.{index}" if chunk_of is None else f"blocks.{chunk_of[index]}.{index}"


def chunk_layout(depth, block_chunks):
    """Chunk index of every block for `block_chunks` (reference rule: chunks of depth // block_chunks blocks, so a
    depth that is not a multiple gives extra chunks); None when unchunked (block_chunks <= 0)."""
    if block_chunks <= 0:
        return None
    chunk_size = max(depth // block_chunks, 1)
    return [i // chunk_size for i in range(depth)]


class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0,
                 drop_path_uniform=False, init_values=None, embed_layer=PatchEmbed, act_layer=nn.GELU,
                 block_fn=Block, ffn_layer="mlp", block_chunks=1, num_register_tokens=0,
                 interpolate_antialias=False, interpolate_offset=0.1, channel_adaptive=False):
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        norm_layer = _layer_norm
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.bag_of_channels = self.channel_adaptive = channel_adaptive
        # the arguments, for export metadata and checkpoint round trips
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           ffn_bias=ffn_bias, proj_bias=proj_bias, init_values=init_values, ffn_layer=ffn_layer,
                           block_chunks=block_chunks, num_register_tokens=num_register_tokens,
                           interpolate_antialias=interpolate_antialias, interpolate_offset=interpolate_offset,
                           channel_adaptive=channel_adaptive)

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)

        if drop_path_uniform is True:
            dpr = [drop_path_rate] * depth
        else:
            dpr = np.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        ffn_class = _ffn_class(ffn_layer)
        blocks = [block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           proj_bias=proj_bias, ffn_bias=ffn_bias, drop_path=dpr[i], norm_layer=norm_layer,
                           act_layer=act_layer, ffn_layer=ffn_class, init_values=init_values)
                  for i in range(depth)]
        self._chunk_of = chunk_layout(depth, block_chunks)
        if self._chunk_of is not None:
            self.chunked_blocks = True
            chunk_size = max(depth // block_chunks, 1)
            # Identity placeholders keep the global block index in the keys: blocks.<chunk>.<global index>
            self.blocks = nn.ModuleList([BlockChunk([nn.Identity()] * start + blocks[start:start + chunk_size])
                                         for start in range(0, depth, chunk_size)])
        else:
            self.chunked_blocks = False
            self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ---- parameters ------------------------------------------------------------------------------------------------

    def init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():  # timm ViT init: every Linear trunc-normal(0.02), zero bias
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def iter_blocks(self):
        """The transformer blocks in order (placeholders skipped)."""
        for module in self.blocks:
            if isinstance(module, BlockChunk):
                yield from (b for b in module if not isinstance(b, nn.Identity))
            else:
                yield module

    def block_prefix(self, index):
        """State-dict prefix of block `index`: 'blocks.<chunk>.<index>' when chunked, else 'blocks.<index>'."""
        return block_prefix(index, self._chunk_of)

    # ---- tokens --------------------------------------------------------------------------------------------------

    def interpolate_pos_encoding(self, x, h, w):
        """Position embeddings for an h x w image (x: the CLS + patch tokens, used for its token count and dtype)."""
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        M = int(math.sqrt(N))
        if M * M != N:
            raise ValueError(f"pos_embed holds {N} patch positions, not a square grid")
        if self.interpolate_offset:
            # the reference's historical offset: passes scale factors (used by the bicubic kernel as given) and
            # not an output size; kept because released weights were evaluated this way
            kwargs = {"scale_factor": ((h0 + self.interpolate_offset) / M, (w0 + self.interpolate_offset) / M)}
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                        antialias=self.interpolate_antialias, **kwargs)
        if tuple(patch_pos_embed.shape[-2:]) != (h0, w0):
            raise RuntimeError(f"pos_embed interpolation gave {tuple(patch_pos_embed.shape[-2:])}, expected {(h0, w0)}")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        """(B, C, H, W) [+ (B, N) bool masks] -> (B, 1 + registers + N, D) tokens entering the first block."""
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        # no casts: under autocast the residual stream is promoted to the parameters' dtype, as in the reference
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x_norm, x_prenorm, masks):
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:self.num_register_tokens + 1],
            "x_norm_patchtokens": x_norm[:, self.num_register_tokens + 1:],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    # ---- forward -------------------------------------------------------------------------------------------------

    def _drop_ratios(self):
        """Stochastic-depth ratios whose subset layouts the packed path needs (training only)."""
        if not self.training:
            return ()
        return tuple({b.sample_drop_ratio for b in self.iter_blocks() if b.sample_drop_ratio > 0})

    def forward_features_list(self, x_list, masks_list):
        """Several batches of crops (e.g. [global crops, local crops]) through one packed token stream.

        Returns one reference output dict per input tensor. All crops' tokens are concatenated once; the blocks run
        on [sum_tokens, D] with block-diagonal attention; the final norm runs once; outputs are views.
        """
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"forward_features_list: {len(x_list)} inputs but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, masks) for x, masks in zip(x_list, masks_list)]
        x, shapes = pack(tokens)
        layout = get_packed_layout(shapes, self._drop_ratios())
        for blk in self.blocks:
            x = blk(x, layout)
        x_norm = self.norm(x)
        return [self._output_dict(n, p, m)
                for n, p, m in zip(unpack(x_norm, layout), unpack(x, layout), masks_list)]

    def forward_features(self, x, masks=None):
        if isinstance(x, list):
            return self.forward_features_list(x, masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._output_dict(self.norm(x), x, masks)

    def forward(self, *args, is_training=False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    # ---- intermediate layers -------------------------------------------------------------------------------------

    def _intermediate_layers(self, x, n):
        """Outputs of the last n blocks (n an int) or of the blocks listed in n, in block order."""
        x = self.prepare_tokens_with_masks(x)
        take = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else n
        wanted = {i for i in take if 0 <= i < self.n_blocks}
        outputs = []
        if self.chunked_blocks:
            for chunk in self.blocks:
                x = chunk(x, collect=(wanted, outputs))
        else:
            for i, blk in enumerate(self.blocks):
                x = blk(x)
                if i in wanted:
                    outputs.append(x)
        if len(outputs) != len(take):
            raise ValueError(f"get_intermediate_layers: only {len(outputs)} / {len(take)} requested blocks found "
                             f"(n={n!r}, depth {self.n_blocks})")
        return outputs

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Patch tokens (and CLS tokens) of the last n blocks, or of the blocks listed in n.

        Bag of channels (channel_adaptive=True): (B, C, H, W) is encoded as B*C one-channel images and every block
        returns (patch tokens (B, C, N, D), CLS tokens (B, C*D)) pairs, whatever return_class_token says (reference
        behaviour); with reshape=True the patch tokens are (B, C, D, h, w) (the reference crashes there).
        """
        batch, channels, height, width = x.shape
        if self.bag_of_channels:
            x = x.reshape(batch * channels, 1, height, width)
        outputs = self._intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens:] for out in outputs]
        if reshape:
            h, w = height // self.patch_size, width // self.patch_size
            outputs = [out.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if self.bag_of_channels:
            patches = [out.reshape(batch, channels, *out.shape[1:]) for out in outputs]
            cls = [c.reshape(batch, -1) for c in class_tokens]
            return tuple(zip(patches, cls))
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)


def _layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


ARCHS = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),  # head dim 64
}


def arch_of(embed_dim, depth, num_heads=None):
    """The ARCHS name of a width and depth (and head count, when given), or None for a custom size."""
    for name, dims in ARCHS.items():
        if dims["embed_dim"] == embed_dim and dims["depth"] == depth and num_heads in (None, dims["num_heads"]):
            return name
    return None


def _build(arch, patch_size, num_register_tokens, in_chans, channel_adaptive, kwargs):
    params = dict(ARCHS[arch], mlp_ratio=4)
    params.update(kwargs)  # celldino: embed_dim / depth / num_heads may be overridden (small demo models)
    return DinoVisionTransformer(patch_size=patch_size, num_register_tokens=num_register_tokens, in_chans=in_chans,
                                 channel_adaptive=channel_adaptive, **params)


def vit_small(patch_size=16, num_register_tokens=0, in_chans=3, channel_adaptive=False, **kwargs):
    return _build("vit_small", patch_size, num_register_tokens, in_chans, channel_adaptive, kwargs)


def vit_base(patch_size=16, num_register_tokens=0, in_chans=3, channel_adaptive=False, **kwargs):
    return _build("vit_base", patch_size, num_register_tokens, in_chans, channel_adaptive, kwargs)


def vit_large(patch_size=16, num_register_tokens=0, in_chans=3, channel_adaptive=False, **kwargs):
    return _build("vit_large", patch_size, num_register_tokens, in_chans, channel_adaptive, kwargs)


def vit_giant2(patch_size=16, num_register_tokens=0, in_chans=3, channel_adaptive=False, **kwargs):
    """Close to ViT-giant, with embed dim 1536 and 24 heads (head dim 64)."""
    return _build("vit_giant2", patch_size, num_register_tokens, in_chans, channel_adaptive, kwargs)
