"""Patch embedding: a Conv2d with stride = kernel = patch size (reference keys `proj.weight`, `proj.bias`), computed
as one GEMM over the unfolded patches.

Why not call the Conv2d: with few input channels (4-5 for fluorescence) cuDNN's implicit-GEMM convolution is slow;
on an H200 profile of the ViT-L/16 step it took 0.55-0.74 ms per call (~47 TFLOP/s) for a product the GEMM does
in a fraction of that. Same weights, same sum (in another order), same state-dict keys.
"""
import torch.nn.functional as F
from torch import nn


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) patch tokens; `norm` is Identity as in every DINOv2 model."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None,
                 flatten_embedding=True):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        _, channels, height, width = x.shape
        ph, pw = self.patch_size
        if channels != self.in_chans:
            raise ValueError(f"PatchEmbed: the model expects {self.in_chans} input channels, got {channels} "
                             f"(input shape {tuple(x.shape)})")
        if height % ph or width % pw:
            raise ValueError(f"PatchEmbed: image size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
        b, h, w = x.shape[0], height // ph, width // pw
        # B, C, h, ph, w, pw -> B, h*w, C*ph*pw: the flattening order of the Conv2d weight [D, C, ph, pw]
        patches = x.reshape(b, channels, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
        x = self.norm(F.linear(patches, self.proj.weight.reshape(self.embed_dim, -1), self.proj.bias))
        if not self.flatten_embedding:
            x = x.reshape(-1, h, w, self.embed_dim)
        return x
