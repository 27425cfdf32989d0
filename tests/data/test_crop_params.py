"""crop_params: structure of CropParams and the sampled laws against independent references (torchvision's own
RandomResizedCrop.get_params, the reference probabilities and distributions). Each statistical check is also
run against a deliberately wrong law to show that it fails."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from celldino.data.crop_params import sample_crop_params

P_MIN = 1e-4  # a correct law passes at this level; wrong laws below give p-values many orders smaller


def _tv_boxes(h, w, scale, n, seed=0):
    torch.manual_seed(seed)
    img = torch.empty(1, h, w)
    return np.array([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


def _box_features(boxes, h, w):
    top, left, bh, bw = boxes.T.astype(np.float64)
    return {
        "area": bh * bw / (h * w),
        "log_aspect": np.log(bw / bh),
        "top": (top + 0.5) / (h - bh + 1),
        "left": (left + 0.5) / (w - bw + 1),
    }


def test_structure_crop_major_and_dtypes():
    shapes = [(4, 50, 60), (2, 30, 30), (5, 64, 48)]
    p = sample_crop_params(shapes, n_global=2, n_local=3, global_size=32, local_size=16, seed_or_generator=0)
    b = len(shapes)
    assert len(p) == 5 * b and p.n_images == b
    np.testing.assert_array_equal(p.image_index, np.tile(np.arange(b), 5))
    np.testing.assert_array_equal(p.out_size, [32] * 2 * b + [16] * 3 * b)
    assert [p.is_global(i) for i in range(len(p))] == [True] * 6 + [False] * 9
    for name, dtype, shape in [("image_index", np.int32, (15,)), ("box", np.int32, (15, 4)),
                               ("out_size", np.int32, (15,)), ("flip", np.uint8, (15, 2)),
                               ("drop_channel", np.int32, (15,)), ("protein_factor", np.float32, (15,)),
                               ("brightness", np.float32, (15, 5)), ("contrast", np.float32, (15, 5))]:
        arr = getattr(p, name)
        assert arr.dtype == dtype and arr.shape == shape and arr.flags.c_contiguous, name
    # boxes inside their own image
    for i in range(len(p)):
        c, h, w = shapes[p.image_index[i]]
        top, left, bh, bw = p.box[i]
        assert 0 <= top and 0 <= left and bh >= 1 and bw >= 1 and top + bh <= h and left + bw <= w
    # channels an image does not have get neutral factors; the 2-channel image is never channel-dropped
    assert (p.brightness[p.image_index == 1, 2:] == 1).all() and (p.contrast[p.image_index == 0, 4] == 1).all()
    assert (p.drop_channel[p.image_index == 1] == -1).all()


def test_seeded_and_generator_advances():
    a = sample_crop_params([(4, 40, 40)] * 3, seed_or_generator=7)
    b = sample_crop_params([(4, 40, 40)] * 3, seed_or_generator=7)
    for f in ("box", "flip", "drop_channel", "protein_factor", "brightness", "contrast"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    g = np.random.default_rng(7)
    c = sample_crop_params([(4, 40, 40)] * 3, seed_or_generator=g)
    d = sample_crop_params([(4, 40, 40)] * 3, seed_or_generator=g)
    np.testing.assert_array_equal(c.box, a.box)
    assert not np.array_equal(c.box, d.box)


@pytest.mark.parametrize("h,w,scale", [(300, 200, (0.4, 1.0)), (96, 160, (0.005, 0.4)), (64, 64, (0.32, 1.0))])
def test_box_law_matches_torchvision_get_params(h, w, scale):
    n = 6000
    ours = sample_crop_params([(1, h, w)] * n, n_global=1, n_local=0, global_scale=scale, seed_or_generator=1).box
    ref = _tv_boxes(h, w, scale, n)
    fo, fr = _box_features(ours, h, w), _box_features(ref, h, w)
    for key in fo:
        assert stats.ks_2samp(fo[key], fr[key]).pvalue > P_MIN, key
    # a wrong scale law is detected by the same test
    wrong = sample_crop_params([(1, h, w)] * n, n_global=1, n_local=0,
                               global_scale=(scale[0] * 1.5, scale[1] * 0.8), seed_or_generator=2).box
    assert stats.ks_2samp(_box_features(wrong, h, w)["area"], fr["area"]).pvalue < 1e-6


@pytest.mark.parametrize("h,w", [(10, 1000), (1000, 10), (3, 4)])
def test_box_fallback_is_torchvision_central_crop(h, w):
    ours = sample_crop_params([(1, h, w)] * 50, n_global=1, n_local=0, global_scale=(0.9, 1.0),
                              seed_or_generator=0).box
    ref = _tv_boxes(h, w, (0.9, 1.0), 50)
    if (h, w) == (3, 4):  # some tries fit, so only compare the set of possible outcomes
        assert {tuple(b) for b in ours} <= {tuple(b) for b in _tv_boxes(h, w, (0.9, 1.0), 3000)}
    else:  # no try can fit: the deterministic central fallback
        assert len({tuple(b) for b in ref}) == 1
        np.testing.assert_array_equal(ours, ref)


def _binom_ok(k, n, p, z=5.0):
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_channel_drop_law():
    n = 40000
    p = sample_crop_params([(4, 32, 32)], n_global=1, n_local=n - 1, seed_or_generator=3)
    dropped = p.drop_channel >= 0
    assert _binom_ok(dropped.sum(), n, 0.2)
    counts = np.bincount(p.drop_channel[dropped], minlength=4)
    assert counts[1] == 0  # never the protein channel
    assert stats.chisquare(counts[[0, 2, 3]]).pvalue > P_MIN
    assert not _binom_ok(dropped.sum(), n, 0.25)  # the bound is tight enough to notice p = 0.25
    assert (sample_crop_params([(3, 32, 32)], n_local=500, seed_or_generator=0).drop_channel == -1).all()
    other = sample_crop_params([(6, 32, 32)], n_local=3000, protein_channel=0, seed_or_generator=0).drop_channel
    assert set(np.unique(other[other >= 0]).tolist()) == {1, 2, 3}


def test_protein_factor_law():
    n = 40000
    p = sample_crop_params([(4, 32, 32)], n_global=1, n_local=n - 1, seed_or_generator=4)
    applied = p.protein_factor >= 0
    assert _binom_ok(applied.sum(), n, 0.2)
    vals = p.protein_factor[applied]
    assert stats.kstest(vals, stats.uniform(0, 2).cdf).pvalue > P_MIN
    assert stats.kstest(vals, stats.uniform(0, 2.1).cdf).pvalue < 1e-6
    assert (p.protein_factor[~applied] == -1).all()
    assert (sample_crop_params([(1, 32, 32)], n_local=500, seed_or_generator=0).protein_factor == -1).all()
    assert (sample_crop_params([(2, 32, 32)], n_local=2000, seed_or_generator=0).protein_factor >= 0).any()


def test_flip_law():
    n = 40000
    f = sample_crop_params([(2, 16, 16)], n_global=1, n_local=n - 1, seed_or_generator=5).flip
    combos = np.bincount(f[:, 0] * 2 + f[:, 1], minlength=4)
    assert stats.chisquare(combos).pvalue > P_MIN  # independent fair coins


@pytest.mark.parametrize("field", ["brightness", "contrast"])
def test_jitter_factor_law(field):
    n = 20000
    p = sample_crop_params([(3, 16, 16)], n_global=1, n_local=n - 1, seed_or_generator=6)
    v = getattr(p, field).ravel().astype(np.float64)
    m = v.size
    clipped = v == 0.5
    assert _binom_ok(clipped.sum(), m, stats.norm.cdf(-2.5))  # P(N(1, 0.2) <= 0.5)
    assert v.min() == 0.5
    tail = stats.truncnorm((0.5 - 1) / 0.2, np.inf, loc=1, scale=0.2)
    assert stats.kstest(v[~clipped], tail.cdf).pvalue > P_MIN
    wrong = stats.truncnorm((0.5 - 1) / 0.25, np.inf, loc=1, scale=0.25)
    assert stats.kstest(v[~clipped], wrong.cdf).pvalue < 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_shapes"):
        sample_crop_params([], seed_or_generator=0)
    with pytest.raises(ValueError, match="global_scale"):
        sample_crop_params([(1, 8, 8)], global_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="image_shapes\\[0\\]"):
        sample_crop_params([(1, 0, 8)])
