"""celldino._C fused multi-crop augmentation (CPU op; CUDA == CPU under @pytest.mark.gpu).

The reference is written here independently of celldino.data.crop_params, with torchvision.transforms.v2.functional
exactly as the reference Cell-DINO augmentation applies it to the whole image (reference_spec 3.1): scale ->
zero the dropped channel -> protein channel x factor / max of the whole image -> resized_crop (bilinear,
antialias=False) -> flips -> per-channel adjust_brightness / adjust_contrast -> self-normalisation (population std,
eps 1e-7; channels constant within 4 float32 ulps -> 0, the celldino rule). It runs in float32 and in float64 on the
same parameters; the op must satisfy the project's kernel rule per crop:
    max |op - ref64| <= 2 * max |ref32 - ref64| + floor.
"""

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from celldino.data import fused_augment as fa
from celldino.data.crop_params import CropParams, sample_crop_params

pytestmark = pytest.mark.skipif(not fa.extension_available(), reason="celldino._C not built "
                                "(test_fused_augment_build.py fails in that case)")

EPS = 1e-7
FLOOR = 2e-6  # absolute floor of the 2x rule (errors are ~1e-6 on normalised outputs of O(1..10))
DIVISORS = {torch.uint8: 255.0, torch.uint16: 65535.0, torch.float32: None}


# ------------------------------------------------------------------------------------------------ reference


def reference_crop(image, row, protein_channel, divisor, dtype):
    """One crop, reference order, on the whole image, in `dtype` (float32 or float64)."""
    x = image.to(dtype)
    if divisor is not None:
        x = x / divisor
    x = x.clone()
    c = x.shape[0]
    if row["drop_channel"] >= 0:
        x[row["drop_channel"]] = 0
    factor = row["protein_factor"]
    if factor >= 0 and c > 1 and protein_channel < c:
        peak = x.max()
        if peak != 0:
            x[protein_channel] = x[protein_channel] * (torch.tensor(factor, dtype=dtype) / peak)
    top, left, h, w = row["box"]
    s = row["out_size"]
    x = TF.resized_crop(x, top, left, h, w, [s, s], interpolation=InterpolationMode.BILINEAR, antialias=False)
    if row["flip"][0]:
        x = TF.horizontal_flip(x)
    if row["flip"][1]:
        x = TF.vertical_flip(x)
    x = torch.cat([TF.adjust_brightness(x[k:k + 1], row["brightness"][k]) for k in range(c)])
    x = torch.cat([TF.adjust_contrast(x[k:k + 1], row["contrast"][k]) for k in range(c)])
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), unbiased=False, keepdim=True)
    out = (x - mean) / (std + EPS)
    hi, lo = x.amax(dim=(-2, -1), keepdim=True), x.amin(dim=(-2, -1), keepdim=True)
    constant = (hi - lo) <= 4 * torch.finfo(torch.float32).eps * torch.maximum(hi.abs(), lo.abs())
    return out.masked_fill(constant, 0.0)


def check_against_reference(images, params, out, divisor, what=""):
    """The 2x rule per crop; returns the worst (op error, ref32 error) for diagnostics."""
    worst = (0.0, 0.0)
    for i in range(len(params)):
        row = params.row(i)
        img = images[row["image_index"]]
        r64 = reference_crop(img, row, params.protein_channel, divisor, torch.float64)
        r32 = reference_crop(img, row, params.protein_channel, divisor, torch.float32)
        assert torch.isfinite(out[i]).all(), f"{what} crop {i}: non-finite output"
        err = (out[i].double() - r64).abs().max().item()
        err32 = (r32.double() - r64).abs().max().item()
        assert err <= 2 * err32 + FLOOR, f"{what} crop {i} {row}: |op - ref64| = {err:.3g} > 2 x {err32:.3g} + floor"
        worst = max(worst, (err, err32))
    return worst


def run_op(images, params, **kw):
    g, l = fa.fused_multicrop(images, params, **kw)
    return list(g.float()) + list(l.float())


def make_image(rng, dtype, c, h, w):
    if dtype == torch.uint8:
        return torch.from_numpy(rng.integers(0, 256, (c, h, w), dtype=np.uint8))
    if dtype == torch.uint16:
        # 12-bit-ish smooth structure + noise, like a fluorescence field
        base = rng.gamma(2.0, 400.0, (c, h // 5 + 2, w // 5 + 2))
        img = np.kron(base, np.ones((5, 5)))[:, :h, :w] + rng.poisson(50.0, (c, h, w))
        return torch.from_numpy(np.clip(img, 0, 65535).astype(np.uint16))
    return torch.from_numpy(rng.random((c, h, w), dtype=np.float32))


def params_for(shapes, seed, n_global=2, n_local=3, g=23, l=9, **kw):
    kw.setdefault("p_drop", 0.5)
    kw.setdefault("p_protein", 0.6)
    return sample_crop_params(shapes, n_global=n_global, n_local=n_local, global_size=g, local_size=l,
                              seed_or_generator=seed, **kw)


# ------------------------------------------------------------------------------------------------ semantics


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_matches_reference_composition(dtype, channels):
    rng = np.random.default_rng([channels, int(DIVISORS[dtype] or 0)])
    images = [make_image(rng, dtype, channels, h, w) for h, w in [(37, 53), (61, 29), (45, 45)]]
    params = params_for([tuple(im.shape) for im in images], seed=channels)
    out = run_op(images, params)
    check_against_reference(images, params, out, DIVISORS[dtype], f"{dtype} C={channels}")


def test_real_crop_sizes_and_large_field():
    """224 / 96 crops out of a 330 x 301 uint16 field (down- and up-sampling, lambda rounding at large
    coordinates), fp32 output."""
    rng = np.random.default_rng(7)
    images = [make_image(rng, torch.uint16, 4, 330, 301)]
    params = sample_crop_params([tuple(images[0].shape)], n_global=2, n_local=2, seed_or_generator=3,
                                p_drop=0.5, p_protein=1.0)
    out = run_op(images, params)
    check_against_reference(images, params, out, 65535.0, "224/96")


def _edit(params, i, **fields):
    for k, v in fields.items():
        getattr(params, k)[i] = v


def test_borders_flips_drops_and_protein_cases():
    """Every flip pair, every droppable channel, protein on/off, boxes touching each border, the full image,
    a 1 x 1 box (pure upsampling), a box the size of the output (identity resize) and a box larger than the
    image is never produced (validation covers that)."""
    rng = np.random.default_rng(11)
    c, h, w = 4, 33, 47
    images = [make_image(rng, torch.uint16, c, h, w), make_image(rng, torch.float32, c, h, w).mul(65535).to(torch.uint16)]
    params = params_for([(c, h, w)] * 2, seed=5, n_global=2, n_local=10, g=17, l=8)
    boxes = [(0, 0, h, w), (0, 0, 5, 7), (h - 6, w - 9, 6, 9), (0, w - 12, 10, 12), (h - 11, 0, 11, 20),
             (16, 23, 1, 1), (3, 4, 8, 8), (0, 0, 2, 3), (h - 1, w - 1, 1, 1), (1, 2, 17, 17)]
    for i in range(len(params)):
        top, left, bh, bw = boxes[i % len(boxes)]
        _edit(params, i, box=(top, left, bh, bw), flip=((i >> 1) & 1, i & 1),
              drop_channel=[-1, 0, 2, 3][i % 4], protein_factor=[-1.0, 0.7, 1.9, 0.0][(i // 4) % 4])
    out = run_op(images, params)
    check_against_reference(images, params, out, 65535.0, "edits")


def test_protein_uses_whole_image_max_after_drop():
    """The max sits outside every crop, in the channel that is dropped for some crops: the op must use the
    whole image's max after the drop (not the crop's)."""
    c, h, w = 4, 40, 40
    img = (1000 + torch.arange(h * w, dtype=torch.int32).reshape(h, w).remainder(97)).expand(c, h, w)
    img = img.to(torch.uint16).contiguous()
    img[0, 39, 39] = 60000  # channel 0 holds the global max, far from the boxes below
    img[2, 0, 39] = 30000
    params = params_for([(c, h, w)], seed=1, n_global=2, n_local=2, g=12, l=6)
    for i, drop in enumerate([-1, 0, 2, 3]):
        _edit(params, i, box=(5, 5, 20, 20), drop_channel=drop, protein_factor=1.5)
    out = run_op([img], params)
    check_against_reference([img], params, out, 65535.0, "protein max")
    # with / without channel 0 dropped the protein channel is scaled by a different max
    assert not torch.allclose(out[0][1], out[1][1])
    # float fields below zero: the dropped channel's zeros are the image's max (the step is skipped when the
    # others are all negative), not the largest of the remaining channels
    neg = -0.1 - torch.from_numpy(np.random.default_rng(4).random((c, h, w), dtype=np.float32))
    out = run_op([neg], params)
    check_against_reference([neg], params, out, None, "negative floats")


def test_constant_and_zero_channels_give_zeros_not_nan():
    rng = np.random.default_rng(3)
    c, h, w = 5, 29, 31
    img = make_image(rng, torch.uint16, c, h, w)
    img[0] = 0                    # all-zero channel
    img[2] = 12345                # constant channel
    img[4] = 65535                # saturated channel
    zero = torch.zeros((c, h, w), dtype=torch.uint16)  # all-zero image: protein step skipped (max 0)
    images = [img, zero]
    params = params_for([(c, h, w)] * 2, seed=9, g=19, l=7, p_protein=1.0)
    out = run_op(images, params)
    check_against_reference(images, params, out, 65535.0, "constant")
    for i in range(len(params)):
        assert torch.isfinite(out[i]).all()
        j = int(params.image_index[i])
        for ch in ([0, 2, 4] if j == 0 else range(c)):
            assert (out[i][ch] == 0).all(), f"crop {i} channel {ch} should be exactly 0"


def test_mixed_image_sizes_and_batched_tensor_input():
    rng = np.random.default_rng(5)
    images = [make_image(rng, torch.uint8, 3, h, w) for h, w in [(20, 70), (71, 19), (33, 33), (8, 9)]]
    params = params_for([tuple(im.shape) for im in images], seed=2, n_global=1, n_local=2, g=15, l=5)
    out = run_op(images, params)
    check_against_reference(images, params, out, 255.0, "mixed sizes")
    same = torch.stack([make_image(rng, torch.uint8, 3, 30, 30) for _ in range(3)])
    params = params_for([(3, 30, 30)] * 3, seed=4)
    g1, l1 = fa.fused_multicrop(same, params)
    g2, l2 = fa.fused_multicrop(list(same), params)
    assert torch.equal(g1, g2) and torch.equal(l1, l2)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs_are_the_rounded_fp32_outputs(out_dtype):
    """Accumulation is fp32 whatever the output dtype: the bf16/fp16 result is the fp32 result rounded once."""
    rng = np.random.default_rng(8)
    images = [make_image(rng, torch.uint16, 4, 41, 43) for _ in range(2)]
    params = params_for([(4, 41, 43)] * 2, seed=6)
    g32, l32 = fa.fused_multicrop(images, params, out_dtype=torch.float32)
    g, l = fa.fused_multicrop(images, params, out_dtype=out_dtype)
    assert g.dtype == out_dtype and l.dtype == out_dtype
    assert torch.equal(g, g32.to(out_dtype)) and torch.equal(l, l32.to(out_dtype))


def test_shapes_order_and_thread_count_independence():
    rng = np.random.default_rng(12)
    b, c = 3, 4
    images = [make_image(rng, torch.uint16, c, 50, 52) for _ in range(b)]
    params = params_for([(c, 50, 52)] * b, seed=8, n_global=2, n_local=4, g=21, l=10)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1, l1 = fa.fused_multicrop(images, params, out_dtype="bf16")
        torch.set_num_threads(2)
        g2, l2 = fa.fused_multicrop(images, params, out_dtype="bf16")
    finally:
        torch.set_num_threads(old)
    assert g1.shape == (2 * b, c, 21, 21) and l1.shape == (4 * b, c, 10, 10)
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    # crop-major: row r is image r % B
    assert (params.image_index == np.tile(np.arange(b), 6)).all()
    single = fa.fused_multicrop(images[1:2], _subset(params, image=1, b=b), out_dtype="bf16")
    assert torch.equal(single[0], g1[1::b]) and torch.equal(single[1], l1[1::b])


def test_no_local_crops():
    rng = np.random.default_rng(16)
    images = [make_image(rng, torch.uint16, 2, 30, 30) for _ in range(2)]
    params = params_for([(2, 30, 30)] * 2, seed=1, n_global=2, n_local=0, g=11)
    g, l = fa.fused_multicrop(images, params)
    assert g.shape == (4, 2, 11, 11) and l.shape[0] == 0
    check_against_reference(images, params, list(g), 65535.0, "no locals")


def _subset(params, image, b):
    rows = np.nonzero(params.image_index == image)[0]
    take = lambda a: np.ascontiguousarray(a[rows])  # noqa: E731
    return CropParams(np.zeros(len(rows), np.int32), take(params.box), take(params.out_size), take(params.flip),
                      take(params.drop_channel), take(params.protein_factor), take(params.brightness),
                      take(params.contrast), n_images=1, n_global=params.n_global, n_local=params.n_local,
                      protein_channel=params.protein_channel)


def test_other_dtypes_and_intensity_scales():
    """int16 / float64 go through scale_intensity to float32; an explicit divisor ("bits=12") and "none"."""
    rng = np.random.default_rng(13)
    img16 = torch.from_numpy(rng.integers(0, 4096, (3, 30, 31)).astype(np.uint16))
    params = params_for([(3, 30, 31)], seed=3)
    out = run_op([img16], params, intensity_scale="bits=12")
    check_against_reference([img16], params, out, 4095.0, "bits=12")
    f64 = torch.from_numpy(rng.random((3, 30, 31)))
    out = run_op([f64], params)
    check_against_reference([f64.float()], params, out, None, "float64")
    i16 = torch.from_numpy(rng.integers(0, 32767, (3, 30, 31)).astype(np.int16))
    out = run_op([i16], params)
    check_against_reference([i16], params, out, 32767.0, "int16")
    out = run_op([img16.float()], params, intensity_scale="none")
    check_against_reference([img16.float()], params, out, None, "none")


def test_given_channel_max_is_used():
    rng = np.random.default_rng(14)
    img = make_image(rng, torch.uint16, 4, 30, 30)
    params = params_for([(4, 30, 30)], seed=2, p_protein=1.0, p_drop=0.0)
    base = fa.fused_multicrop([img], params)
    given = img.float().amax(dim=(1, 2))[None]
    same = fa.fused_multicrop([img], params, channel_max=given)
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    other = fa.fused_multicrop([img], params, channel_max=given * 2)
    assert not torch.equal(base[0][:, 1], other[0][:, 1])  # protein channel scaled by half as much
    assert torch.equal(base[0][:, 0], other[0][:, 0])
    # dtypes scaled to float32 before the op (int16, mixed batches): the raw maxima are scaled with them
    i16 = torch.from_numpy(rng.integers(0, 30000, (4, 30, 30)).astype(np.int16))
    pair = [i16, img]
    params2 = params_for([(4, 30, 30)] * 2, seed=5, p_protein=1.0, p_drop=0.0)
    base = fa.fused_multicrop(pair, params2)
    same = fa.fused_multicrop(pair, params2, channel_max=torch.stack([im.float().amax(dim=(1, 2)) for im in pair]))
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    with pytest.raises(ValueError, match=r"channel_max has shape \(4,\); expected \[B=2, C=4\]"):
        fa.fused_multicrop(pair, params2, channel_max=given[0])


def test_matches_cell_augmentation_dino_and_collate():
    """FusedCellAugmentation == CellAugmentationDINO (same generator draws) followed by the reference collate."""
    from celldino.data.augment import CellAugmentationDINO
    from celldino.data.collate import collate_data_and_cast

    rng = np.random.default_rng(15)
    img = make_image(rng, torch.uint16, 4, 120, 110)
    kw = dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=3,
              global_crops_size=32, local_crops_size=16)
    ref = CellAugmentationDINO(**kw)(img, generator=np.random.default_rng(99))
    fused = fa.FusedCellAugmentation(**kw)([img], generator=np.random.default_rng(99))
    for got, want in zip(list(fused["collated_global_crops"]) + list(fused["collated_local_crops"]),
                         ref["global_crops"] + ref["local_crops"]):
        assert (got - want).abs().max() < 1e-3

    class FirstN:
        num_patches = 4

        def __call__(self, n=0):
            m = np.zeros(4, bool)
            m[:n] = True
            return m.reshape(2, 2)

    images = [make_image(rng, torch.uint16, 4, 64, 64) for _ in range(3)]
    aug = fa.FusedCellAugmentation(**kw, out_dtype=torch.bfloat16, seed=0)
    collate = aug.collate_fn((0.1, 0.5), 0.5, FirstN(), random_module=random.Random(4))
    batch = collate([(im, ()) for im in images])
    samples = [({"global_crops": [torch.zeros(4, 32, 32)] * 2, "local_crops": [torch.zeros(4, 16, 16)] * 3}, ())
               for _ in images]
    want = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.bfloat16, mask_generator=FirstN(),
                                 random_module=random.Random(4))
    assert set(batch) == set(want)
    assert batch["collated_global_crops"].shape == (6, 4, 32, 32)
    assert batch["collated_local_crops"].shape == (9, 4, 16, 16)
    assert batch["collated_global_crops"].dtype == torch.bfloat16
    for k in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
        assert torch.equal(batch[k], want[k]), k
    assert batch["upperbound"] == want["upperbound"]


def test_opcheck_schema_fake_and_aot():
    """torch.library registration: schema, fake (meta) implementation and AOT dispatch are consistent."""
    rng = np.random.default_rng(17)
    img = make_image(rng, torch.uint16, 3, 20, 22)
    params = params_for([(3, 20, 22)], seed=0, n_global=1, n_local=1, g=8, l=4, p_protein=1.0)
    crop_int, crop_float = fa.pack_crop_params(params, 3)
    result = torch.library.opcheck(torch.ops.celldino.fused_multicrop.default,
                                   ([img], crop_int, crop_float, None, 1, 8, 4, 1, 65535.0, torch.bfloat16))
    assert all(v == "SUCCESS" for v in result.values()), result


class _RawImages(torch.utils.data.Dataset):
    """(raw uint16 image of varying size, target), like build_dataset(spec) without a transform."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return make_image(rng, torch.uint16, 4, 40 + 3 * i, 50 - 2 * i), i


def test_collate_fn_in_dataloader_workers():
    """The CPU path of the trainer contract: raw images -> collate_fn in 2 forked workers (1 torch thread each)
    -> reference batch dict; distinct batches get distinct crops; a fixed seed reproduces the run."""
    from celldino.data.masking import MaskingGenerator

    def run(seed):
        aug = fa.FusedCellAugmentation((0.4, 1.0), (0.05, 0.4), 2, global_crops_size=32, local_crops_size=16,
                                       out_dtype=torch.bfloat16, seed=seed)
        # random_module=None: Python's `random`, which torch seeds per worker from the loader's generator
        collate = aug.collate_fn((0.1, 0.5), 0.5, MaskingGenerator(2, max_num_patches=2, seed=seed))
        loader = torch.utils.data.DataLoader(_RawImages(), batch_size=3, num_workers=2, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(seed))
        return list(loader)

    batches = run(0)
    assert len(batches) == 2
    for batch in batches:
        assert batch["collated_global_crops"].shape == (6, 4, 32, 32)
        assert batch["collated_local_crops"].shape == (6, 4, 16, 16)
        assert batch["collated_global_crops"].dtype == torch.bfloat16
        assert batch["collated_masks"].shape == (6, 4)
        assert torch.isfinite(batch["collated_global_crops"].float()).all()
    assert not torch.equal(batches[0]["collated_global_crops"], batches[1]["collated_global_crops"])
    again = run(0)
    for a, b in zip(batches, again):
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ bad input


def _good():
    img = torch.zeros((4, 20, 20), dtype=torch.uint16)
    params = params_for([(4, 20, 20)], seed=0, n_global=1, n_local=1, g=8, l=4)
    crop_int, crop_float = fa.pack_crop_params(params, 4)
    return img, crop_int, crop_float


def _call(img, crop_int, crop_float, **kw):
    args = dict(channel_max=None, n_global_rows=1, global_size=8, local_size=4, protein_channel=1, divisor=65535.0,
                out_dtype=torch.float32)
    args.update(kw)
    images = img if isinstance(img, list) else [img]
    return torch.ops.celldino.fused_multicrop(images, crop_int, crop_float, args["channel_max"],
                                              args["n_global_rows"], args["global_size"], args["local_size"],
                                              args["protein_channel"], args["divisor"], args["out_dtype"])


@pytest.mark.parametrize("case, match", [
    ("box_outside", "outside image 0 of size 20 x 20"),
    ("negative_top", "outside image"),
    ("bad_image_index", "image index 3"),
    ("bad_drop", "drop_channel 4"),
    ("bad_flip", "flips must be 0 or 1"),
    ("dtype", "supported: uint8, uint16, float32"),
    ("channels", "channels but images\\[0\\] has"),
    ("not_contiguous", "not contiguous"),
    ("out_dtype", "out_dtype"),
    ("divisor", "divisor"),
    ("rows", "n_global_rows"),
    ("crop_float_shape", "crop_float must be"),
    ("empty", "empty"),
    ("size", "global_size"),
    ("channel_max", "channel_max must be"),
])
def test_bad_input_raises_clear_errors(case, match):
    img, ci, cf = _good()
    kw = {}
    if case == "box_outside":
        ci[0, 1:5] = torch.tensor([10, 0, 11, 5])
    elif case == "negative_top":
        ci[0, 1] = -1
    elif case == "bad_image_index":
        ci[1, 0] = 3
    elif case == "bad_drop":
        ci[0, 7] = 4
    elif case == "bad_flip":
        ci[0, 5] = 2
    elif case == "dtype":
        img = img.to(torch.int16)
    elif case == "channels":
        img = [img, torch.zeros((3, 20, 20), dtype=torch.uint16)]
    elif case == "not_contiguous":
        img = torch.zeros((4, 20, 40), dtype=torch.uint16)[:, :, ::2]
    elif case == "out_dtype":
        kw["out_dtype"] = torch.float64
    elif case == "divisor":
        kw["divisor"] = 0.0
    elif case == "rows":
        kw["n_global_rows"] = 3
    elif case == "crop_float_shape":
        cf = cf[:, :5].contiguous()
    elif case == "empty":
        img = []
    elif case == "size":
        kw["global_size"] = 0
    elif case == "channel_max":
        kw["channel_max"] = torch.zeros(1, 3)
    with pytest.raises(RuntimeError, match=match):
        _call(img, ci, cf, **kw)


def test_wrapper_errors():
    img, _, _ = _good()
    params = params_for([(4, 20, 20)], seed=0, n_global=1, n_local=1, g=8, l=4)
    with pytest.raises(ValueError, match="sampled for 1 images"):
        fa.fused_multicrop([img, img], params)
    with pytest.raises(ValueError, match="out_dtype"):
        fa.fused_multicrop([img], params, out_dtype="int8")
    if not fa.cuda_extension_available():
        with pytest.raises(fa.ExtensionNotBuiltError, match="without its CUDA"):
            fa.fused_multicrop([img], params, device="cuda")


# ------------------------------------------------------------------------------------------------ CUDA kernel logic on CPU


def _emulated(images, params, threads, out_dtype=torch.float32, channel_max=None, divisor=65535.0):
    crop_int, crop_float = fa.pack_crop_params(params, images[0].shape[0])
    n_g = params.n_global * params.n_images
    sizes = params.out_size
    return torch.ops.celldino._fused_multicrop_emulated(
        images, crop_int, crop_float, channel_max, n_g, int(sizes[0]), int(sizes[-1]), params.protein_channel,
        divisor, out_dtype, threads)


@pytest.mark.parametrize("threads", [256, 96, 37])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
def test_cuda_kernel_code_emulated_on_cpu_equals_cpu_op(threads, dtype):
    """The CUDA kernel's per-plane code (csrc/multicrop_plane.h: addressing, taps in 'shared memory', the three
    phases, key-encoded channel maxima) run with serial emulated thread blocks == the CPU implementation. Only the
    summation order differs, so values agree to fp32 rounding (most bit for bit)."""
    rng = np.random.default_rng([threads, int(DIVISORS[dtype] or 1)])
    images = [make_image(rng, dtype, 4, h, w) for h, w in [(60, 47), (33, 71)]]
    if dtype == torch.float32:
        images[1] -= 0.5  # negative maxima exercise the order-preserving key encoding
    images[0][3] = 0
    params = params_for([tuple(im.shape) for im in images], seed=threads, n_global=2, n_local=3, g=31, l=12,
                        p_protein=0.7)
    divisor = DIVISORS[dtype] or 1.0
    for out_dtype in (torch.float32, torch.bfloat16):
        cpu = fa.fused_multicrop(images, params, out_dtype=out_dtype)
        emu = _emulated(images, params, threads, out_dtype=out_dtype, divisor=divisor)
        for a, b in zip(cpu, emu):
            assert a.shape == b.shape and a.dtype == b.dtype
            a, b = a.float(), b.float()
            tol = 1e-5 if out_dtype == torch.float32 else 2 ** -7
            assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()
            assert (a == b).float().mean() > 0.5  # same per-pixel arithmetic; sums differ in order
    given = torch.stack([im.float().amax(dim=(1, 2)) for im in images])
    emu_given = _emulated(images, params, threads, channel_max=given, divisor=divisor)
    emu_keys = _emulated(images, params, threads, divisor=divisor)
    assert torch.equal(emu_given[0], emu_keys[0]) and torch.equal(emu_given[1], emu_keys[1])


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu(dtype, out_dtype):
    """Same per-pixel arithmetic (csrc/augment_math.h, no FMA contraction, IEEE div/sqrt); only the reduction order
    differs. The GPU output satisfies the 2x rule against the fp64 reference by itself, and matches the CPU op to
    fp32 rounding (one bf16 ulp)."""
    assert fa.cuda_extension_available(), "celldino._C was built without CUDA on a GPU machine"
    rng = np.random.default_rng(21)
    images = [make_image(rng, dtype, 5, h, w) for h, w in [(300, 280), (97, 131), (64, 64)]]
    images[2][3] = 0
    params = sample_crop_params([tuple(im.shape) for im in images], n_global=2, n_local=8, seed_or_generator=5,
                                p_drop=0.5, p_protein=0.7)
    cpu = fa.fused_multicrop(images, params, out_dtype=out_dtype)
    gpu = fa.fused_multicrop([im.cuda() for im in images], params, out_dtype=out_dtype)
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and b.dtype == out_dtype and b.shape == a.shape
    if out_dtype == torch.float32:
        gpu_rows = [x.cpu() for x in list(gpu[0]) + list(gpu[1])]
        check_against_reference(images, params, gpu_rows, DIVISORS[dtype], f"cuda {dtype}")
    for a, b in zip(cpu, gpu):
        a, b = a.float(), b.cpu().float()
        tol = 1e-4 if out_dtype == torch.float32 else 2 ** -7
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()
        assert (a == b).float().mean() > 0.5
    # CPU images, device="cuda": uploaded by the wrapper; given channel maxima
    given = torch.stack([im.float().amax(dim=(1, 2)) for im in images])
    gpu2 = fa.fused_multicrop(images, params, out_dtype=out_dtype, device="cuda", channel_max=given)
    for a, b in zip(gpu, gpu2):
        assert torch.equal(a, b)
