"""Transformer building blocks with the reference DINOv2 module and parameter names."""
from .attention import Attention, MemEffAttention
from .block import Block, BlockChunk, NestedTensorBlock, drop_add_residual_packed, drop_add_residual_stochastic_depth
from .drop_path import DropPath, drop_path
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden_features
from .packing import PackedLayout, get_packed_layout, pack, unpack
from .patch_embed import PatchEmbed

__all__ = ["Attention", "MemEffAttention", "Block", "BlockChunk", "NestedTensorBlock", "DropPath", "drop_path",
           "LayerScale", "Mlp", "SwiGLUFFN", "SwiGLUFFNFused", "swiglu_hidden_features", "PackedLayout",
           "get_packed_layout", "pack", "unpack", "PatchEmbed", "drop_add_residual_packed",
           "drop_add_residual_stochastic_depth"]
