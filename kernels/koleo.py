"""KoLeo loss (DINOv2 semantics): -mean log distance of each L2-normalised row to its nearest other row."""
import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def koleo_loss_reference(x, eps=1e-8):
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs a [B, D] batch with B >= 2 rows, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        nn_index = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


def koleo_loss(x, eps=1e-8):
    if use_triton(x):
        from . import koleo_triton  # noqa: F401  (provided by the kernels work)
        return koleo_triton.koleo_loss_triton(x, eps)
    return koleo_loss_reference(x, eps)
