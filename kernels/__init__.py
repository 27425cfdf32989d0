"""Fused ops for Cell-DINO / DINOv2 training (installed as `celldino.kernels`).

Each op has a Triton kernel, a torch.autograd.Function, a plain-torch reference with identical semantics and a
dispatcher (see `_dispatch`): Triton on CUDA tensors, the reference elsewhere, overridable with
`CELLDINO_KERNELS=triton|torch|auto`. This package imports nothing from the rest of celldino.
"""
from ._dispatch import backend, set_backend
from .attention import multicrop_attention
from .koleo import koleo_loss, koleo_loss_distributed
from .sinkhorn import sinkhorn_knopp

__all__ = ["multicrop_attention", "sinkhorn_knopp", "koleo_loss", "koleo_loss_distributed", "backend", "set_backend"]
