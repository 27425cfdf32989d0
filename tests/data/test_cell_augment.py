"""CellAugmentationDINO against an independent, step-by-step composition written like the reference's
transforms (Div255, RandomRemoveChannelExceptProtein, RandomContrastProteinChannel, RandomResizedCrop,
flips, RandomBrightness, RandomContrast, SelfNormalizeNoDiv) fed with the same random draws; the eval transform
and the RGB augmentation."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from celldino.data.augment import CellAugmentationDINO, DataAugmentationDINO, GaussianBlur
from celldino.data.crop_params import apply_crop_params_torch, sample_crop_params, self_normalize
from celldino.data.transforms import NormalizationType, make_classification_eval_cell_transform


def reference_crop(image_float, row, size):
    """One crop, reference style: whole-image in-place steps on a float C x H x W tensor in [0, 1]."""
    img = image_float.clone()
    # RandomRemoveChannelExceptProtein
    if img.shape[0] >= 4 and row["drop_channel"] >= 0:
        img[row["drop_channel"]] = torch.zeros(1, *img.shape[1:])
    # RandomContrastProteinChannel
    if not (img.max() == 0 or len(img) == 1) and row["protein_factor"] >= 0:
        random_factor = row["protein_factor"] / img.max()
        img[1] = img[1] * random_factor
    # RandomResizedCrop (bilinear; torchvision 0.15 did not antialias tensors)
    top, left, h, w = row["box"]
    img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=False)
    # RandomHorizontalFlip, RandomVerticalFlip
    if row["flip"][0]:
        img = TF.hflip(img)
    if row["flip"][1]:
        img = TF.vflip(img)
    # RandomBrightness / RandomContrast: per channel, torchvision's functional ops
    if img.max() != 0:
        for c in range(img.shape[0]):
            img[c] = TF.adjust_brightness(img[c], row["brightness"][c])
    if img.max() != 0:
        for c in range(img.shape[0]):
            img[c] = TF.adjust_contrast(img[c][None, ...], row["contrast"][c])
    # SelfNormalizeNoDiv
    m = img.mean((-2, -1), keepdim=True)
    s = img.std((-2, -1), unbiased=False, keepdim=True)
    img -= m
    img /= s + 1e-7
    return img


def _image(c, h, w, dtype, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + k)) * np.cos(yy / (4 + k)) for k in range(c)]) * 0.4 + 0.5
    base = base + 0.1 * rng.random((c, h, w))
    maxval = np.iinfo(dtype).max
    return torch.from_numpy((np.clip(base, 0, 1) * maxval * 0.9).astype(dtype))


@pytest.mark.parametrize("c,dtype", [(4, np.uint8), (4, np.uint16), (5, np.uint16), (2, np.uint8), (1, np.uint16)])
def test_matches_reference_composition_with_same_draws(c, dtype):
    img = _image(c, 70, 90, dtype, seed=c)
    aug = CellAugmentationDINO((0.32, 1.0), (0.05, 0.32), 6, global_crops_size=40, local_crops_size=24,
                               p_drop=0.5, p_protein=0.5)
    out = aug(img, generator=np.random.default_rng(11))
    params = aug.sample_params([tuple(img.shape)], generator=np.random.default_rng(11))
    assert (params.drop_channel >= 0).any() or c < 4
    divisor = 255.0 if dtype == np.uint8 else 65535.0
    scaled = torch.Tensor(img.numpy().astype(np.float32)) / divisor  # Div255 for uint8, / 65535 for uint16
    crops = out["global_crops"] + out["local_crops"]
    assert len(crops) == 8
    for i, crop in enumerate(crops):
        size = 40 if i < 2 else 24
        ref = reference_crop(scaled, params.row(i), size)
        assert crop.shape == (c, size, size) and crop.dtype == torch.float32
        torch.testing.assert_close(crop, ref, rtol=1e-4, atol=2e-4)


def test_output_dict_contract():
    aug = CellAugmentationDINO((0.4, 1.0), (0.005, 0.4), 8, seed=0)
    out = aug(_image(4, 256, 256, np.uint16))
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8 and out["offsets"] == ()
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"]))
    assert out["global_crops"][0].shape == (4, 224, 224) and out["local_crops"][0].shape == (4, 96, 96)
    for crop in out["global_crops"] + out["local_crops"]:  # self-normalised per channel
        torch.testing.assert_close(crop.mean((1, 2)), torch.zeros(4), atol=1e-4, rtol=0)
        nonconst = crop.std((1, 2)) > 0
        torch.testing.assert_close(crop.std((1, 2), unbiased=False)[nonconst], torch.ones(int(nonconst.sum())),
                                   atol=1e-3, rtol=0)


def test_seeded_reproducible_and_crops_independent():
    img = _image(3, 80, 80, np.uint8)
    a = CellAugmentationDINO((0.3, 1.0), (0.05, 0.3), 2, 32, 16, seed=5)(img)
    b = CellAugmentationDINO((0.3, 1.0), (0.05, 0.3), 2, 32, 16, seed=5)(img)
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], a["global_crops"][1])


def test_constant_and_zero_channels_never_nan():
    img = torch.zeros(4, 50, 50, dtype=torch.uint16)
    img[1] = 1000  # constant channel
    img[2, 10:20, 10:20] = 60000
    out = CellAugmentationDINO((0.4, 1.0), (0.05, 0.4), 4, 32, 16, seed=0, p_protein=1.0)(img)
    for crop in out["global_crops"] + out["local_crops"]:
        assert torch.isfinite(crop).all()
        assert (crop[0] == 0).all() and (crop[1] == 0).all()  # all-zero and constant channels -> exactly 0
    all_zero = CellAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 32, 16, seed=0)(torch.zeros(4, 40, 40, dtype=torch.uint8))
    assert all((c == 0).all() for c in all_zero["global_crops"] + all_zero["local_crops"])


def test_self_normalize_constant_channel_exactly_zero():
    x = torch.full((2, 7, 9), 0.3)
    x[1] = torch.rand(7, 9)
    y = self_normalize(x)
    assert (y[0] == 0).all() and torch.isfinite(y).all()
    ref = (x[1] - x[1].mean()) / (x[1].std(unbiased=False) + 1e-7)
    torch.testing.assert_close(y[1], ref)


def test_apply_on_box_equals_whole_image_protein_step():
    """The applier crops before the elementwise steps; with the whole-image max that is the same as the
    reference order, including when the dropped channel held the maximum."""
    img = torch.rand(4, 30, 40) * 0.5
    img[0, 5, 5] = 1.0  # the maximum sits in channel 0 ...
    p = sample_crop_params([(4, 30, 40)], n_global=2, n_local=30, global_size=16, local_size=8, p_drop=1.0,
                           p_protein=1.0, seed_or_generator=3)
    assert (p.drop_channel == 0).any()  # ... and is dropped in some crops: then the max is < 1
    for i in range(len(p)):
        torch.testing.assert_close(apply_crop_params_torch(img, p, i), reference_crop(img, p.row(i), int(p.out_size[i])),
                                   rtol=1e-4, atol=2e-4)


# ---------------------------------------------------------------------------------------------- eval transform


@pytest.mark.parametrize("resize", [0, 48])
def test_eval_center_crop_transform(resize):
    img = _image(4, 64, 80, np.uint16)
    t = make_classification_eval_cell_transform(resize_size=resize, crop_size=40)
    out = t(img)
    x = img.to(torch.float32) / 65535
    if resize:
        x = TF.resize(x, resize, interpolation=InterpolationMode.BICUBIC, antialias=False)
    x = TF.center_crop(x, [40, 40])
    m, s = x.mean((-2, -1), keepdim=True), x.std((-2, -1), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (x - m) / (s + 1e-7))
    if resize:  # the antialias choice matters when downscaling: it is explicit, not torchvision's default
        aa = make_classification_eval_cell_transform(resize_size=resize, crop_size=40, resize_antialias=True)(img)
        assert (aa - out).abs().max() > 1e-3


@pytest.mark.parametrize("antialias", [False, True])
def test_eval_resize_keeps_blank_channels_blank(antialias):
    """A constant channel stays exactly 0 through the bicubic resize and self-normalisation (the resize's rounding
    spread, a few ulps, used to come out as values of order 1), while the other channels are untouched."""
    img = _image(3, 300, 300, np.uint16)
    img[0] = 1234
    img[2] = 0
    t = make_classification_eval_cell_transform(resize_size=224, crop_size=200, resize_antialias=antialias)
    out = t(img)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    x = TF.resize(img[1:2].to(torch.float32) / 65535, 224, interpolation=InterpolationMode.BICUBIC,
                  antialias=antialias)
    x = TF.center_crop(x, [200, 200])
    m, s = x.mean((-2, -1), keepdim=True), x.std((-2, -1), unbiased=False, keepdim=True)
    torch.testing.assert_close(out[1:2], (x - m) / (s + 1e-7))


def test_eval_aug_decoder_transform_pads_and_flips():
    img = _image(2, 20, 30, np.uint8)
    t = make_classification_eval_cell_transform(crop_size=32, normalization_type="SELF_NORM_AUG_DECODER")
    out = t(img)
    assert out.shape == (2, 32, 32) and torch.isfinite(out).all()
    t2 = make_classification_eval_cell_transform(crop_size=16, normalization_type=NormalizationType.SELF_NORM_AUG_DECODER)
    assert t2(img).shape == (2, 16, 16)
    with pytest.raises(ValueError):
        make_classification_eval_cell_transform(normalization_type="bogus")


# ---------------------------------------------------------------------------------------------- RGB DINO


def test_rgb_data_augmentation_dino():
    pil = Image.fromarray((np.random.default_rng(0).random((120, 140, 3)) * 255).astype(np.uint8))
    torch.manual_seed(0)
    out = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, 64, 32)(pil)
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 64, 64)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 32, 32)] * 3
    assert out["global_crops_teacher"][0] is out["global_crops"][0] and out["offsets"] == ()
    # reference quirk kept: GaussianBlur(p) is applied with probability 1 - p
    assert GaussianBlur(p=1.0).p == 0.0 and GaussianBlur(p=0.1).p == pytest.approx(0.9)
    assert GaussianBlur(p=0.1, invert_p=False).p == pytest.approx(0.1)
