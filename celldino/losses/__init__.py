"""Cell-DINO / DINOv2 losses with the reference semantics and method names.

The heavy parts dispatch to `celldino.kernels` (Sinkhorn-Knopp, KoLeo), which picks a Triton kernel on CUDA and a
plain-torch reference elsewhere.
"""
from .dino import DINOLoss
from .ibot import iBOTPatchLoss
from .koleo import KoLeoLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss"]
