"""Evaluation transform for cell images (reference `dinov2/data/cell_dino/transforms.py`) and its pieces."""

from __future__ import annotations

from enum import Enum
from typing import Union

import torch
from torchvision import transforms

from .crop_params import SELF_NORM_EPS, self_normalize
from .intensity import parse_intensity_scale, scale_intensity

__all__ = [
    "NormalizationType",
    "ScaleIntensity",
    "SelfNormalizeNoDiv",
    "make_classification_eval_cell_transform",
]


class NormalizationType(Enum):
    SELF_NORM_AUG_DECODER = "self_norm_aug_decoder"
    SELF_NORM_CENTER_CROP = "self_norm_center_crop"


class ScaleIntensity(torch.nn.Module):
    """Decoded values -> float32 in [0, 1] (uint8 / 255 like the reference's Div255, uint16 / 65535, ...)."""

    def __init__(self, intensity_scale=None):
        super().__init__()
        self.scale = parse_intensity_scale(intensity_scale)

    def forward(self, x):
        return scale_intensity(x, self.scale)

    def extra_repr(self) -> str:
        return str(self.scale)


class SelfNormalizeNoDiv(torch.nn.Module):
    """Per-channel (x - mean) / (population std + 1e-7); a constant channel becomes 0. Not in place."""

    def __init__(self, eps: float = SELF_NORM_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return self_normalize(x, self.eps)


class ResizeKeepingConstantChannels(transforms.Resize):
    """torchvision Resize, except that a channel constant in the input stays exactly that constant: bicubic weights
    sum to 1 only up to rounding, leaving a few ulps of spread that self-normalisation would blow up into values of
    order 1 on a blank channel (bilinear stays within the 4-ulp rule of `self_normalize`, bicubic does not)."""

    def forward(self, img):
        out = super().forward(img)
        if not torch.is_tensor(img) or img.ndim < 3 or img.shape[-1] * img.shape[-2] == 0:
            return out
        flat = img.flatten(-2)
        low = flat.amin(-1)
        constant = flat.amax(-1) == low
        if constant.any():
            out = torch.where(constant[..., None, None], low[..., None, None].to(out.dtype), out)
        return out


def _normalization_type(value) -> NormalizationType:
    if isinstance(value, NormalizationType):
        return value
    s = str(value)
    for t in NormalizationType:
        if s in (t.name, t.value):
            return t
    raise ValueError(f"normalization_type={value!r}: expected one of {[t.name for t in NormalizationType]}")


def make_classification_eval_cell_transform(
    *,
    resize_size: int = 0,
    interpolation=transforms.InterpolationMode.BICUBIC,
    crop_size: int = 384,
    normalization_type: Union[NormalizationType, str] = NormalizationType.SELF_NORM_CENTER_CROP,
    intensity_scale=None,
    resize_antialias: bool = False,
) -> transforms.Compose:
    """Scale intensities, optionally Resize(resize_size) (shorter side, bicubic), then
    SELF_NORM_AUG_DECODER: RandomCrop(crop_size, pad_if_needed) + horizontal and vertical flips (linear-probe
    training), or SELF_NORM_CENTER_CROP: CenterCrop(crop_size) (val / test / kNN); then self-normalisation.

    resize_antialias defaults to False: the reference ran torchvision 0.15, whose tensor Resize does not
    antialias, and the released weights were evaluated that way (newer torchvision antialiases by default,
    which changes the inputs noticeably when downscaling).
    """
    kind = _normalization_type(normalization_type)
    steps = [ScaleIntensity(intensity_scale)]
    if resize_size > 0:
        steps.append(ResizeKeepingConstantChannels(resize_size, interpolation=interpolation,
                                                   antialias=resize_antialias))
    if kind == NormalizationType.SELF_NORM_AUG_DECODER:
        steps += [
            transforms.RandomCrop(size=crop_size, pad_if_needed=True),
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
        ]
    else:
        steps.append(transforms.CenterCrop(size=crop_size))
    steps.append(SelfNormalizeNoDiv())
    return transforms.Compose(steps)
