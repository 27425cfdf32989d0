"""Multi-crop augmentations for DINO pretraining.

`CellAugmentationDINO` is the Cell-DINO augmentation (reference `dinov2/data/cell_dino/augmentations.py`),
built on `celldino.data.crop_params`: it samples every crop's parameters with `sample_crop_params` and applies
them with `apply_crop_params_torch`, the same functions the fused C++/CUDA kernel is tested against.

`DataAugmentationDINO` is the reference RGB augmentation (`dinov2/data/augmentations.py`), used when
`train.cell_augmentation` is false.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
from torchvision import transforms

from .crop_params import CellCropSampler, apply_crop_params_torch
from .intensity import scale_intensity
from .rng import ProcessLocalRNG

logger = logging.getLogger("celldino")

__all__ = ["CellAugmentationDINO", "DataAugmentationDINO", "ProcessLocalRNG", "GaussianBlur"]


class CellAugmentationDINO(CellCropSampler):
    """Cell-DINO multi-crop augmentation: 2 global + `local_crops_number` local crops per image.

    image: C x H x W torch tensor or numpy array of decoded values (any supported dtype). It is scaled to float
    by `intensity_scale` (default: integer dtype max, so uint8 / 255 exactly as the reference), then every crop
    independently gets channel drop, protein contrast, RandomResizedCrop (bilinear, antialias=False), flips,
    per-channel brightness and contrast and per-channel self-normalisation (laws in crop_params).
    Returns dict(global_crops=[2], global_crops_teacher=[the same 2], local_crops=[n], offsets=()).
    Constructor arguments and `sample_params`: `celldino.data.crop_params.CellCropSampler`.
    """

    def _log_settings(self) -> None:
        logger.info(
            "CellAugmentationDINO: global %s scale %s, %d local %s scale %s, intensity %s",
            self.global_crops_size, self.global_crops_scale, self.local_crops_number, self.local_crops_size,
            self.local_crops_scale, self.intensity_scale,
        )

    def __call__(self, image, generator: Optional[np.random.Generator] = None) -> dict:
        if image.ndim != 3:
            raise ValueError(f"CellAugmentationDINO expects a C x H x W image, got shape {tuple(image.shape)}")
        x = scale_intensity(image, self.intensity_scale)
        params = self.sample_params([tuple(x.shape)], generator)
        channel_max = x.amax(dim=(1, 2))  # shared by the crops' protein-contrast step
        crops = [apply_crop_params_torch(x, params, i, channel_max=channel_max) for i in range(len(params))]
        global_crops = crops[:self.n_global_crops]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": crops[self.n_global_crops:],
            "offsets": (),
        }


# ------------------------------------------------------------------------------------------------------------
# reference RGB augmentation


IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class GaussianBlur(transforms.RandomApply):
    """The reference's GaussianBlur(p): kernel 9, sigma U(0.1, 2). Its code passes 1 - p to RandomApply (a
    comment there assumes torchvision inverts the probability; it does not), so the blur is applied with
    probability 1 - p. We keep that effective behaviour by default (`invert_p=True`); see docs/data.md."""

    def __init__(self, *, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0, invert_p: bool = True):
        blur = transforms.GaussianBlur(kernel_size=9, sigma=(radius_min, radius_max))
        super().__init__(transforms=[blur], p=1 - p if invert_p else p)


class DataAugmentationDINO:
    """Reference DINOv2 RGB multi-crop augmentation on PIL images (uses torch's global RNG, like torchvision).

    Global crops: RandomResizedCrop (bicubic) + h-flip, colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale
    (p 0.2); crop 1 then blur, crop 2 blur + solarize (threshold 128, p 0.2); local crops blur. Blur
    probabilities are the reference's effective ones (crop 1: 0, crop 2: 0.9, local: 0.5) unless
    `paper_blur=True` (1.0 / 0.1 / 0.5 as in the DINO/BYOL papers). ToTensor + ImageNet normalisation.
    """

    def __init__(
        self,
        global_crops_scale,
        local_crops_scale,
        local_crops_number,
        global_crops_size=224,
        local_crops_size=96,
        paper_blur: bool = False,
    ):
        self.global_crops_scale = global_crops_scale
        self.local_crops_scale = local_crops_scale
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        bicubic = transforms.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
                transforms.RandomHorizontalFlip(p=0.5),
            ]
        )
        self.geometric_augmentation_local = transforms.Compose(
            [
                transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
                transforms.RandomHorizontalFlip(p=0.5),
            ]
        )
        color_jittering = transforms.Compose(
            [
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        inv = not paper_blur
        global_transfo1_extra = GaussianBlur(p=1.0, invert_p=inv)
        global_transfo2_extra = transforms.Compose(
            [GaussianBlur(p=0.1, invert_p=inv), transforms.RandomSolarize(threshold=128, p=0.2)]
        )
        local_transfo_extra = GaussianBlur(p=0.5, invert_p=inv)
        self.normalize = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)]
        )
        self.global_transfo1 = transforms.Compose([color_jittering, global_transfo1_extra, self.normalize])
        self.global_transfo2 = transforms.Compose([color_jittering, global_transfo2_extra, self.normalize])
        self.local_transfo = transforms.Compose([color_jittering, local_transfo_extra, self.normalize])

    def __call__(self, image) -> dict:
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local_crops = [
            self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)
        ]
        return {
            "global_crops": [global_crop_1, global_crop_2],
            "global_crops_teacher": [global_crop_1, global_crop_2],
            "local_crops": local_crops,
            "offsets": (),
        }
