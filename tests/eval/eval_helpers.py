"""Helpers for the evaluation tests: tiny real ViTs and in-memory datasets."""
import torch

from celldino.models import vit_small


def tiny_vit(in_chans=2, seed=0, **kw):
    torch.manual_seed(seed)
    params = dict(patch_size=8, img_size=32, in_chans=in_chans, embed_dim=32, depth=3, num_heads=2, block_chunks=0,
                  init_values=1.0)
    params.update(kw)
    return vit_small(**params).eval()


class TensorItems(torch.utils.data.Dataset):
    """(image, target) items from lists, like a celldino dataset after its transform."""

    def __init__(self, images, targets):
        self.images, self.targets = list(images), list(targets)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]
