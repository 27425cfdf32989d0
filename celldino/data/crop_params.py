"""Per-crop augmentation parameters for Cell-DINO multi-crop training: one sampler, one plain-torch applier.

This module is the contract between the Python augmentation (`celldino.data.augment.CellAugmentationDINO`)
and the fused C++/CUDA kernel (`celldino._C`, wrapped by `celldino.data.fused_augment`): both consume the
same `CropParams`, so a kernel can be tested crop by crop against `apply_crop_params_torch`.

Row order is crop-major, as the reference collate stacks crops: for a batch of B images, rows
[0, B) are global crop 0 of images 0..B-1, rows [B, 2B) global crop 1, then local crop 0 of every image, ...
Row r therefore belongs to image r % B and crop slot r // B (slots < n_global are global crops).

Laws (reference `dinov2/data/cell_dino/{augmentations,transforms}.py`, applied to every crop independently):
  drop_channel    with prob. p_drop, and only when C >= 4: one of the first four channels except the protein
                  channel, uniformly ({0, 2, 3} for protein_channel=1); -1 = no drop.
  protein_factor  with prob. p_protein, and only when C > protein_channel (C >= 2 for the reference):
                  a U(0, 2) draw; the protein channel is multiplied by factor / max(whole image after the drop),
                  skipped at apply time when that max is 0. -1 = not applied.
  box             torchvision RandomResizedCrop.get_params: up to 10 tries of area fraction U(scale) and
                  log-uniform aspect ratio in `ratio`; w = round(sqrt(A*r)), h = round(sqrt(A/r)) (half to even,
                  like Python's round); first try with 0 < w <= W and 0 < h <= H wins, top ~ U{0..H-h},
                  left ~ U{0..W-w}; if no try fits, the central crop clipped to the ratio range.
  flip            (h, v) each Bernoulli(0.5); horizontal applied first (they commute anyway).
  brightness      per channel max(N(1, jitter_std), 0.5): x *= f, clamp to [0, 1].
  contrast        per channel max(N(1, jitter_std), 0.5): x = f*x + (1-f)*mean(x), clamp to [0, 1].
  Then per-channel self-normalisation (population std, eps 1e-7); a constant channel (range <= 4 ulps of its
  magnitude, i.e. constant up to resize rounding) becomes exactly 0.
Channels beyond an image's own channel count (C < Cmax in a mixed batch) get brightness = contrast = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .intensity import IntensityScale, parse_intensity_scale
from .rng import ProcessLocalRNG

__all__ = [
    "CropParams",
    "sample_crop_params",
    "concat_crop_params",
    "CellCropSampler",
    "apply_crop_params_torch",
    "apply_all_crop_params_torch",
    "self_normalize",
    "SELF_NORM_EPS",
]

SELF_NORM_EPS = 1e-7
_RRC_TRIES = 10  # torchvision RandomResizedCrop.get_params tries this many boxes before the central fallback


@dataclass
class CropParams:
    """Parameters of N = (n_global + n_local) * n_images crops, crop-major. All arrays are numpy, C-contiguous."""

    image_index: np.ndarray  # [N] int32: which image of the batch the crop is cut from
    box: np.ndarray  # [N, 4] int32: top, left, height, width in source pixels
    out_size: np.ndarray  # [N] int32: output side S (square crops)
    flip: np.ndarray  # [N, 2] uint8: horizontal, vertical
    drop_channel: np.ndarray  # [N] int32: channel zeroed before everything else, -1 = none
    protein_factor: np.ndarray  # [N] float32: U(0,2) draw, -1 = protein contrast not applied
    brightness: np.ndarray  # [N, Cmax] float32
    contrast: np.ndarray  # [N, Cmax] float32
    n_images: int = 0
    n_global: int = 2
    n_local: int = 0
    protein_channel: int = 1

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    @property
    def n_crops(self) -> int:
        return len(self)

    def is_global(self, i: int) -> bool:
        return i < self.n_global * self.n_images

    def row(self, i: int) -> dict:
        """Row i as plain Python values (handy in tests and error messages)."""
        return {
            "image_index": int(self.image_index[i]),
            "box": tuple(int(v) for v in self.box[i]),
            "out_size": int(self.out_size[i]),
            "flip": tuple(bool(v) for v in self.flip[i]),
            "drop_channel": int(self.drop_channel[i]),
            "protein_factor": float(self.protein_factor[i]),
            "brightness": self.brightness[i].tolist(),
            "contrast": self.contrast[i].tolist(),
        }


def _as_generator(seed_or_generator) -> np.random.Generator:
    if isinstance(seed_or_generator, np.random.Generator):
        return seed_or_generator
    return np.random.default_rng(seed_or_generator)


def _normalise_shapes(image_shapes) -> np.ndarray:
    shapes = []
    for k, s in enumerate(image_shapes):
        s = tuple(int(v) for v in s)
        if len(s) == 2:
            s = (1,) + s
        if len(s) != 3 or min(s) < 1:
            raise ValueError(f"image_shapes[{k}] = {s}: expected (C, H, W) with positive sizes")
        shapes.append(s)
    if not shapes:
        raise ValueError("image_shapes is empty: need at least one image")
    return np.asarray(shapes, dtype=np.int64)


def _sample_boxes(rng, heights, widths, scale_lo, scale_hi, ratio):
    """Vectorised torchvision RandomResizedCrop.get_params for rows with per-row sizes and scale ranges."""
    n = heights.shape[0]
    area = (heights * widths).astype(np.float64)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    u_scale = rng.random((n, _RRC_TRIES))
    u_ratio = rng.random((n, _RRC_TRIES))
    target_area = area[:, None] * (scale_lo[:, None] + (scale_hi - scale_lo)[:, None] * u_scale)
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)  # rint = round half to even, like round()
    h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    found = ok.any(axis=1)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    bh = np.where(found, h[rows, first], 0)
    bw = np.where(found, w[rows, first], 0)

    # Central fallback (no try fitted): clip the full image to the allowed aspect-ratio range.
    in_ratio = widths / heights
    fb_w = np.where(in_ratio < min(ratio), widths, np.where(in_ratio > max(ratio), np.rint(heights * max(ratio)), widths))
    fb_h = np.where(in_ratio < min(ratio), np.rint(widths / min(ratio)), heights)
    fb_w, fb_h = fb_w.astype(np.int64), fb_h.astype(np.int64)
    bh = np.where(found, bh, fb_h)
    bw = np.where(found, bw, fb_w)
    # Offsets: uniform integers for sampled boxes, centred for the fallback. Always drawn so the number of
    # draws does not depend on the outcome (keeps streams aligned across rows).
    top_draw = rng.integers(0, np.maximum(heights - bh + 1, 1))
    left_draw = rng.integers(0, np.maximum(widths - bw + 1, 1))
    top = np.where(found, top_draw, (heights - bh) // 2)
    left = np.where(found, left_draw, (widths - bw) // 2)
    return np.stack([top, left, bh, bw], axis=1).astype(np.int32)


def sample_crop_params(
    image_shapes: Sequence[Sequence[int]],
    n_global: int = 2,
    n_local: int = 8,
    global_size: int = 224,
    local_size: int = 96,
    global_scale: Sequence[float] = (0.4, 1.0),
    local_scale: Sequence[float] = (0.005, 0.4),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    protein_channel: int = 1,
    p_drop: float = 0.2,
    p_protein: float = 0.2,
    jitter_std: float = 0.2,
    seed_or_generator=None,
) -> CropParams:
    """Sample the parameters of every crop of a batch (crop-major rows; laws in the module docstring).

    image_shapes: one (C, H, W) per image (a 2-tuple means C = 1). seed_or_generator: int seed, a
    numpy Generator (advanced in place), or None for fresh entropy.
    """
    shapes = _normalise_shapes(image_shapes)
    if n_global < 0 or n_local < 0 or n_global + n_local == 0:
        raise ValueError(f"need at least one crop: n_global={n_global}, n_local={n_local}")
    for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale), ("ratio", ratio)):
        if not (0 < lo <= hi):
            raise ValueError(f"{name}={lo, hi}: expected 0 < low <= high")
    rng = _as_generator(seed_or_generator)
    b = shapes.shape[0]
    n_slots = n_global + n_local
    n = n_slots * b
    c_max = int(shapes[:, 0].max())

    image_index = np.tile(np.arange(b, dtype=np.int32), n_slots)
    is_global = np.repeat(np.arange(n_slots) < n_global, b)
    chans, heights, widths = (shapes[image_index, k] for k in range(3))

    out_size = np.where(is_global, global_size, local_size).astype(np.int32)
    scale_lo = np.where(is_global, global_scale[0], local_scale[0]).astype(np.float64)
    scale_hi = np.where(is_global, global_scale[1], local_scale[1]).astype(np.float64)

    # Channel drop: the reference picks among {0, 2, 3} (first four channels minus the protein channel).
    candidates = np.array([c for c in range(4) if c != protein_channel], dtype=np.int32)
    do_drop = (rng.random(n) < p_drop) & (chans >= 4)
    which = candidates[rng.integers(0, candidates.size, n)]
    drop_channel = np.where(do_drop, which, -1).astype(np.int32)

    # Protein contrast: decided here, the data-dependent "image max == 0" skip happens at apply time.
    do_protein = (rng.random(n) < p_protein) & (chans > protein_channel) & (chans > 1)
    factor = rng.random(n) * 2.0
    protein_factor = np.where(do_protein, factor, -1.0).astype(np.float32)

    box = _sample_boxes(rng, heights, widths, scale_lo, scale_hi, tuple(float(r) for r in ratio))
    flip = (rng.random((n, 2)) < 0.5).astype(np.uint8)

    has_channel = np.arange(c_max)[None, :] < chans[:, None]
    brightness = np.maximum(rng.normal(1.0, jitter_std, (n, c_max)), 0.5)
    contrast = np.maximum(rng.normal(1.0, jitter_std, (n, c_max)), 0.5)
    brightness = np.where(has_channel, brightness, 1.0).astype(np.float32)
    contrast = np.where(has_channel, contrast, 1.0).astype(np.float32)

    return CropParams(
        image_index=np.ascontiguousarray(image_index),
        box=np.ascontiguousarray(box),
        out_size=out_size,
        flip=np.ascontiguousarray(flip),
        drop_channel=drop_channel,
        protein_factor=protein_factor,
        brightness=np.ascontiguousarray(brightness),
        contrast=np.ascontiguousarray(contrast),
        n_images=b,
        n_global=n_global,
        n_local=n_local,
        protein_channel=protein_channel,
    )


def concat_crop_params(per_image: Sequence[CropParams]) -> CropParams:
    """One batch's CropParams from single-image ones (each sampled for one image, e.g. with that sample's own
    seeded generator): image b of the batch is per_image[b], rows crop-major; the per-channel factors of images
    with fewer channels than the widest are padded with 1 (no change), as sample_crop_params does."""
    if not per_image:
        raise ValueError("concat_crop_params: no parameters")
    first = per_image[0]
    layout = (first.n_global, first.n_local, first.protein_channel)
    for k, p in enumerate(per_image):
        if p.n_images != 1:
            raise ValueError(f"concat_crop_params: entry {k} holds {p.n_images} images, expected 1")
        if (p.n_global, p.n_local, p.protein_channel) != layout:
            raise ValueError(f"concat_crop_params: entry {k} has (n_global, n_local, protein_channel) "
                             f"{(p.n_global, p.n_local, p.protein_channel)}, entry 0 {layout}")
    b = len(per_image)
    c_max = max(p.brightness.shape[1] for p in per_image)

    def rows(name, pad_channels=False):
        arrays = [getattr(p, name) for p in per_image]
        if pad_channels:
            arrays = [np.pad(a, ((0, 0), (0, c_max - a.shape[1])), constant_values=1.0) for a in arrays]
        stacked = np.stack(arrays, axis=1)  # [slots, b, ...]: slot-major = crop-major
        return np.ascontiguousarray(stacked.reshape(stacked.shape[0] * b, *stacked.shape[2:]))

    n_slots = len(first)
    return CropParams(
        image_index=np.tile(np.arange(b, dtype=np.int32), n_slots),
        box=rows("box"),
        out_size=rows("out_size"),
        flip=rows("flip"),
        drop_channel=rows("drop_channel"),
        protein_factor=rows("protein_factor"),
        brightness=rows("brightness", pad_channels=True),
        contrast=rows("contrast", pad_channels=True),
        n_images=b,
        n_global=first.n_global,
        n_local=first.n_local,
        protein_channel=first.protein_channel,
    )


class CellCropSampler:
    """Crop settings and per-process seeded `sample_params` of the Cell-DINO multi-crop augmentation.

    Shared base of `celldino.data.augment.CellAugmentationDINO` (per sample, torch) and
    `celldino.data.fused_augment.FusedCellAugmentation` (per batch, C++/CUDA): the two must draw their crops from
    the same laws with the same settings, so they parse the constructor arguments and call `sample_crop_params`
    in one place. `n_global_crops` is 2 (the reference) unless a subclass sets it.
    """

    n_global_crops = 2

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        intensity_scale=None,
        protein_channel: int = 1,
        p_drop: float = 0.2,
        p_protein: float = 0.2,
        jitter_std: float = 0.2,
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        seed: Optional[int] = None,
    ):
        self.global_crops_scale = tuple(float(v) for v in global_crops_scale)
        self.local_crops_scale = tuple(float(v) for v in local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.intensity_scale: IntensityScale = parse_intensity_scale(intensity_scale)
        self.protein_channel = int(protein_channel)
        self.p_drop, self.p_protein, self.jitter_std = float(p_drop), float(p_protein), float(jitter_std)
        self.ratio = tuple(float(r) for r in ratio)
        self.rng = ProcessLocalRNG(seed)
        self._log_settings()

    def _log_settings(self) -> None:
        """Hook at the end of __init__ (CellAugmentationDINO logs its settings; the fused batch op does not)."""

    def sample_params(self, image_shapes, generator: Optional[np.random.Generator] = None) -> CropParams:
        """Every crop's parameters for images of `image_shapes`, from `generator` or this process's stream."""
        return sample_crop_params(
            image_shapes,
            n_global=self.n_global_crops,
            n_local=self.local_crops_number,
            global_size=self.global_crops_size,
            local_size=self.local_crops_size,
            global_scale=self.global_crops_scale,
            local_scale=self.local_crops_scale,
            ratio=self.ratio,
            protein_channel=self.protein_channel,
            p_drop=self.p_drop,
            p_protein=self.p_protein,
            jitter_std=self.jitter_std,
            seed_or_generator=self.rng.get() if generator is None else generator,
        )


def self_normalize(x: torch.Tensor, eps: float = SELF_NORM_EPS) -> torch.Tensor:
    """Per-channel (x - mean) / (population std + eps) over the last two dims; constant channels -> exactly 0.

    "Constant" means a range of at most 4 float32 ulps of the channel's magnitude: a constant input channel
    comes out of bilinear resizing with rounding noise, which the reference's SelfNormalizeNoDiv (in place)
    amplifies by 1 / eps into values of ~1e-2; we return a new tensor with such channels set to 0.
    """
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), unbiased=False, keepdim=True)
    out = (x - mean) / (std + eps)
    hi, lo = x.amax(dim=(-2, -1), keepdim=True), x.amin(dim=(-2, -1), keepdim=True)
    constant = (hi - lo) <= 4 * torch.finfo(torch.float32).eps * torch.maximum(hi.abs(), lo.abs())
    return out.masked_fill(constant, 0.0)


def apply_crop_params_torch(
    image: torch.Tensor,
    params: CropParams,
    i: int,
    normalize: bool = True,
    channel_max: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Row i of `params` applied to `image` (the row's source image, float, already intensity-scaled, C x H x W)
    with plain torch / torchvision, in the reference order. Returns a new float32 [C, S, S] tensor.

    channel_max: optional per-channel maxima of `image` (shared by all crops of one image). The channel drop
    and protein scaling are elementwise, so they are applied to the crop box only (same values as applying
    them to the whole image first); only the protein step's "max of the whole image" needs the full image.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a C x H x W image, got shape {tuple(image.shape)}")
    c = image.shape[0]
    top, left, h, w = (int(v) for v in params.box[i])
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > image.shape[1] or left + w > image.shape[2]:
        raise ValueError(f"crop {i}: box {(top, left, h, w)} outside the image of shape {tuple(image.shape)}")
    x = image[:, top : top + h, left : left + w].to(torch.float32, copy=True)
    drop = int(params.drop_channel[i])
    if drop >= c:
        raise ValueError(f"crop {i}: drop_channel {drop} but the image has {c} channels")
    if drop >= 0:
        x[drop] = 0.0
    factor = float(params.protein_factor[i])
    pc = params.protein_channel
    if factor >= 0 and c > 1 and pc < c:
        cmax = image.to(torch.float32).amax(dim=(1, 2)) if channel_max is None else channel_max.to(torch.float32)
        if drop >= 0:
            cmax = cmax.clone()
            cmax[drop] = 0.0
        peak = cmax.max()
        if peak != 0:
            # reference: img[1] = img[1] * (U(0,2) / img.max()), the quotient a float32 0-d tensor
            x[pc] = x[pc] * (torch.tensor(factor, dtype=torch.float32) / peak)
    s = int(params.out_size[i])
    # antialias=False: the reference's torchvision 0.15 never antialiases tensors in RandomResizedCrop.
    x = TF.resize(x, [s, s], interpolation=InterpolationMode.BILINEAR, antialias=False)
    if params.flip[i, 0]:
        x = x.flip(-1)
    if params.flip[i, 1]:
        x = x.flip(-2)
    bright = torch.from_numpy(params.brightness[i, :c].copy()).view(c, 1, 1)
    contr = torch.from_numpy(params.contrast[i, :c].copy()).view(c, 1, 1)
    # (1 - f) rounded from float64 to float32, as torch does for a Python-float scalar
    one_minus = torch.from_numpy((1.0 - params.contrast[i, :c].astype(np.float64)).astype(np.float32)).view(c, 1, 1)
    x = (x * bright).clamp_(0.0, 1.0)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    x = (contr * x + one_minus * mean).clamp_(0.0, 1.0)
    return self_normalize(x) if normalize else x


def apply_all_crop_params_torch(images: Sequence[torch.Tensor], params: CropParams) -> list[torch.Tensor]:
    """Every row of `params` applied to images[params.image_index[row]]: a list of N crops, crop-major."""
    if len(images) != params.n_images:
        raise ValueError(f"params were sampled for {params.n_images} images, got {len(images)}")
    images = [img.to(torch.float32) for img in images]
    maxima = [img.amax(dim=(1, 2)) for img in images]
    return [
        apply_crop_params_torch(images[j], params, i, channel_max=maxima[j])
        for i, j in enumerate(params.image_index.tolist())
    ]
