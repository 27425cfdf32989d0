"""BEiT block masking: numba == pure Python bit for bit, and the same statistics as an independent
implementation of the reference algorithm (written from the spec with Python's `random`)."""

import math
import random

import numpy as np
import pytest
from scipy import stats

from celldino.data.masking import NUMBA_AVAILABLE, MaskingGenerator


def reference_mask(shape, n, rnd, min_num_patches=4, max_num_patches=None, min_aspect=0.3):
    """The reference MaskingGenerator, re-derived from spec section 3.3 (Python random, numpy mask)."""
    height, width = shape
    max_num_patches = n if max_num_patches is None else max_num_patches
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    mask = np.zeros(shape, dtype=bool)
    count = 0
    while count < n:
        budget = min(n - count, max_num_patches)
        added = 0
        for _ in range(10):
            area = rnd.uniform(min_num_patches, budget)
            r = math.exp(rnd.uniform(lo, hi))
            h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if w < width and h < height:
                top, left = rnd.randint(0, height - h), rnd.randint(0, width - w)
                new = h * w - mask[top : top + h, left : left + w].sum()
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


@pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("size,max_patches,min_patches", [(14, 98.0, 4), ((6, 9), 20, 4), (14, 30, 16), (7, None, 4)])
def test_numba_equals_python_twin(size, max_patches, min_patches):
    fast = MaskingGenerator(size, max_num_patches=max_patches, min_num_patches=min_patches, backend="numba")
    slow = MaskingGenerator(size, max_num_patches=max_patches, min_num_patches=min_patches, backend="python")
    n_max = fast.num_patches
    for seed in range(300):
        n = seed % (n_max + 1)
        a = fast(n, rng=np.random.default_rng(seed))
        b = slow(n, rng=np.random.default_rng(seed))
        assert a.dtype == np.bool_ and a.shape == fast.get_shape()
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba not installed")
def test_constructing_a_generator_compiles_before_workers_fork():
    """The placement loop is compiled (or loaded from numba's cache) when the generator is built, so DataLoader
    workers forked afterwards inherit it instead of importing numba/scipy modules after fork (that hung)."""
    import subprocess
    import sys

    code = ("import celldino.data.masking as m\n"
            "assert not m._place_blocks_numba.signatures\n"
            "g = m.MaskingGenerator(14, max_num_patches=98.0)\n"
            "assert g.backend == 'numba' and m._place_blocks_numba.signatures, g\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _bbox_shape(mask):
    rows, cols = np.where(mask)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_counts_never_exceed_request_and_usually_hit_it():
    gen = MaskingGenerator(14, max_num_patches=98.0)
    rng = np.random.default_rng(0)
    for n in (0, 1, 4, 19, 50, 98):
        counts = np.array([gen(n, rng=rng).sum() for _ in range(200)])
        assert (counts <= n).all()
        if n >= 4:
            assert (counts == n).mean() > 0.8, n
    assert gen(0).sum() == 0


@pytest.mark.parametrize("n,max_patches", [(19, 98.0), (60, 98.0), (98, 98.0), (30, 10)])
def test_count_and_block_statistics_match_reference(n, max_patches):
    trials = 800
    gen = MaskingGenerator(14, max_num_patches=max_patches)
    rng = np.random.default_rng(1)
    rnd = random.Random(1)
    ours = [gen(n, rng=rng) for _ in range(trials)]
    ref = [reference_mask((14, 14), n, rnd, max_num_patches=max_patches) for _ in range(trials)]
    for feature in (lambda m: m.sum(), lambda m: _bbox_shape(m)[0], lambda m: _bbox_shape(m)[1],
                    lambda m: np.abs(np.diff(m.astype(int), axis=0)).sum() + np.abs(np.diff(m.astype(int), axis=1)).sum()):
        a = np.array([feature(m) for m in ours], float)
        b = np.array([feature(m) for m in ref], float)
        # rank test, and the means within 5 standard errors
        assert stats.mannwhitneyu(a, b).pvalue > 1e-4
        assert abs(a.mean() - b.mean()) <= 5 * max(b.std(), 0.5) * math.sqrt(2 / trials)


def test_single_block_aspect_law():
    """With min_num_patches == request, the first block has area == request: its (h, w) distribution is fixed
    by the log-uniform aspect law; compare the frequency table with the reference's."""
    n, trials = 16, 3000
    gen = MaskingGenerator(14, min_num_patches=n, max_num_patches=n)
    rng = np.random.default_rng(2)
    rnd = random.Random(2)
    ours = [_bbox_shape(gen(n, rng=rng)) for _ in range(trials)]
    ref = [_bbox_shape(reference_mask((14, 14), n, rnd, min_num_patches=n, max_num_patches=n)) for _ in range(trials)]
    keys = sorted(set(ours) | set(ref))
    table = np.array([[ours.count(k) for k in keys], [ref.count(k) for k in keys]])
    assert stats.chi2_contingency(table).pvalue > 1e-4
    # a wrong aspect law (min_aspect 0.5) is distinguishable
    wrong = MaskingGenerator(14, min_num_patches=n, max_num_patches=n, min_aspect=0.5)
    w_shapes = [_bbox_shape(wrong(n, rng=rng)) for _ in range(trials)]
    table_w = np.array([[w_shapes.count(k) for k in keys], [ref.count(k) for k in keys]])
    table_w = table_w[:, table_w.sum(0) > 0]
    assert stats.chi2_contingency(table_w).pvalue < 1e-6


def test_reference_defaults_and_repr():
    gen = MaskingGenerator((14, 14), num_masking_patches=50)
    assert gen.max_num_patches == 50 and gen.get_shape() == (14, 14) and gen.num_patches == 196
    assert gen.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    assert "14x14" in repr(gen)
    seeded_a = MaskingGenerator(14, max_num_patches=98, seed=3)
    seeded_b = MaskingGenerator(14, max_num_patches=98, seed=3)
    np.testing.assert_array_equal(seeded_a(40), seeded_b(40))


def test_training_max_num_patches_is_the_reference_expression():
    """The reference trainer's `0.5 * img_size // patch_size * img_size // patch_size` (left to right), computed by
    hand: half the grid when img_size / 2 is a multiple of the patch, less on other grids."""
    from celldino.data.masking import training_max_num_patches
    assert training_max_num_patches(224, 16) == 98       # 112 // 16 = 7; 7 * 224 = 1568; 1568 // 16 = 98
    assert training_max_num_patches(64, 8) == 32          # the demo recipe
    assert training_max_num_patches(112, 16) == 21        # 56 // 16 = 3; 3 * 112 = 336; 336 // 16 = 21 (not 24.5)
    assert training_max_num_patches(80, 16) == 10         # 40 // 16 = 2; 160 // 16 = 10
