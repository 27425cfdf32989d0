"""Patch embedding: a Conv2d with stride = kernel = patch size (reference keys `proj.weight`, `proj.bias`)."""
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
        x = self.proj(x)  # B, D, h, w
        h, w = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        if not self.flatten_embedding:
            x = x.reshape(-1, h, w, self.embed_dim)
        return x
