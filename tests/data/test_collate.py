"""collate_data_and_cast: crop-major order, shapes and dtypes, and the whole output dict equal to an independent
re-derivation of the reference collate (spec section 3.3) on the same random stream."""

import random

import numpy as np
import pytest
import torch

from celldino.data.collate import collate_data_and_cast
from celldino.data.masking import MaskingGenerator


def _samples(b, c=3, g=8, l=4, n_local=3):
    """Crop j of sample i is filled with 100 * i + j so the stacking order can be read back."""
    out = []
    for i in range(b):
        glob = [torch.full((c, g, g), 100.0 * i + j) for j in range(2)]
        loc = [torch.full((c, l, l), 100.0 * i + 10 + j) for j in range(n_local)]
        out.append(({"global_crops": glob, "global_crops_teacher": glob, "local_crops": loc, "offsets": ()}, ()))
    return out


class FirstN:
    """Deterministic mask generator: the first n patches of a side x side grid."""

    def __init__(self, side):
        self.side = side
        self.num_patches = side * side

    def __call__(self, n=0):
        m = np.zeros(self.num_patches, bool)
        m[:n] = True
        return m.reshape(self.side, self.side)


def reference_collate(samples_list, mask_ratio_tuple, mask_probability, dtype, n_tokens, mask_generator, rnd):
    """Spec 3.3, written independently: crop-major stacking, float32 linspace edges, random.uniform ratios,
    shuffle, flat indices, 1 / count weights."""
    n_g, n_l = len(samples_list[0][0]["global_crops"]), len(samples_list[0][0]["local_crops"])
    glob = torch.stack([s[0]["global_crops"][i] for i in range(n_g) for s in samples_list])
    loc = torch.stack([s[0]["local_crops"][i] for i in range(n_l) for s in samples_list])
    B, N = len(glob), n_tokens
    n_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_masked + 1)
    upper, masks = 0, []
    for i in range(n_masked):
        masks.append(torch.BoolTensor(mask_generator(int(N * rnd.uniform(probs[i], probs[i + 1])))))
        upper += int(N * probs[i + 1])
    for _ in range(n_masked, B):
        masks.append(torch.BoolTensor(mask_generator(0)))
    rnd.shuffle(masks)
    cm = torch.stack(masks).flatten(1)
    idx = cm.flatten().nonzero().flatten()
    weights = (1 / cm.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(cm)[cm]
    return {"collated_global_crops": glob.to(dtype), "collated_local_crops": loc.to(dtype), "collated_masks": cm,
            "mask_indices_list": idx, "masks_weight": weights, "upperbound": upper,
            "n_masked_patches": torch.full((1,), fill_value=idx.shape[0], dtype=torch.long)}


def test_crop_major_order_shapes_dtypes():
    b = 4
    out = collate_data_and_cast(_samples(b), (0.1, 0.5), 0.5, torch.float16, n_tokens=4,
                                mask_generator=MaskingGenerator(2, max_num_patches=2))
    g, l = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (2 * b, 3, 8, 8) and g.dtype == torch.float16
    assert l.shape == (3 * b, 3, 4, 4) and l.dtype == torch.float16
    assert [int(x[0, 0, 0]) for x in g] == [0, 100, 200, 300, 1, 101, 201, 301]
    assert [int(x[0, 0, 0]) for x in l] == [10, 110, 210, 310, 11, 111, 211, 311, 12, 112, 212, 312]
    assert out["collated_masks"].shape == (2 * b, 4) and out["collated_masks"].dtype == torch.bool
    assert out["n_masked_patches"].dtype == torch.long and out["n_masked_patches"].shape == (1,)


@pytest.mark.parametrize("b,prob,ratio", [(4, 0.5, (0.1, 0.5)), (5, 0.3, (0.2, 0.6)), (3, 1.0, (0.1, 0.5))])
def test_equals_reference_collate(b, prob, ratio):
    samples = _samples(b)
    ours = collate_data_and_cast(samples, ratio, prob, torch.bfloat16, n_tokens=196, mask_generator=FirstN(14),
                                 random_module=random.Random(42))
    ref = reference_collate(samples, ratio, prob, torch.bfloat16, 196, FirstN(14), random.Random(42))
    assert set(ours) == set(ref)
    for k in ref:
        if isinstance(ref[k], torch.Tensor):
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
        else:
            assert ours[k] == ref[k], k


def test_upperbound_edges_and_weights_with_real_masks():
    b, N = 4, 196
    random.seed(0)
    out = collate_data_and_cast(_samples(b), (0.1, 0.5), 0.5, torch.float32, n_tokens=N,
                                mask_generator=MaskingGenerator(14, max_num_patches=0.5 * N))
    # 2B = 8 global crops, int(8 * 0.5) = 4 masked, edges 0.1 .. 0.5 in 4 steps (hand computed, float32)
    assert out["upperbound"] == 39 + 58 + 78 + 98
    counts = out["collated_masks"].sum(1)
    masked = counts[counts > 0].sort().values
    assert len(masked) == 4 and (counts == 0).sum() == 4
    edges = [0.1, 0.2, 0.3, 0.4, 0.5]
    for i, cnt in enumerate(masked.tolist()):  # the k-th smallest mask lies within its own ratio bin
        assert cnt <= int(N * edges[i + 1]) + 1 and cnt >= int(N * edges[i]) - 1
    w = out["masks_weight"]
    assert w.shape[0] == out["mask_indices_list"].shape[0] == int(out["n_masked_patches"]) == int(counts.sum())
    per_crop = torch.zeros(2 * b).index_add_(0, out["mask_indices_list"] // N, w)
    torch.testing.assert_close(per_crop[counts > 0], torch.ones(4))
    assert float(w.sum()) == pytest.approx(4.0)
    flat = out["collated_masks"].flatten()
    assert torch.equal(flat.nonzero().flatten(), out["mask_indices_list"])


def test_masked_crops_are_shuffled_across_positions():
    seen = set()
    for seed in range(30):
        out = collate_data_and_cast(_samples(4), (0.1, 0.5), 0.5, torch.float32, n_tokens=196,
                                    mask_generator=FirstN(14), random_module=random.Random(seed))
        seen |= set(torch.nonzero(out["collated_masks"].any(1)).flatten().tolist())
    assert seen == set(range(8))


def test_no_local_crops_and_errors():
    samples = _samples(2, n_local=0)
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, "fp16", n_tokens=196, mask_generator=FirstN(14))
    assert out["collated_local_crops"].shape[0] == 0
    with pytest.raises(ValueError, match="empty batch"):
        collate_data_and_cast([], (0.1, 0.5), 0.5, torch.float16, mask_generator=FirstN(14))
    with pytest.raises(ValueError, match="n_tokens is 100"):
        collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, n_tokens=100, mask_generator=FirstN(14))
