"""Stochastic depth, both reference modes: per-sample DropPath (single tensor, 0 < p <= 0.1) and sample-subset
(single tensor p > 0.1; packed / list path any p > 0: exactly max(int(b(1-p)), 1) crops of each input tensor get
each residual, scaled by b / kept). Each sample's output is matched against the 4 possible (attention residual
on/off) x (MLP residual on/off) outcomes computed with the block's own deterministic branches."""
import pytest
import torch

from celldino.models import vit_small
from celldino.models.layers import Block, get_packed_layout, unpack
from celldino.models.layers.drop_path import drop_path


def make_block(ratio):
    block = Block(16, 2, qkv_bias=True, init_values=1.0, drop_path=ratio)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


@torch.no_grad()
def outcomes(block, x, y, scale):
    """[(attn applied, mlp applied)] per sample of x (B, N, D) given the train-mode output y."""
    combos, close = [], []
    attn = block.attn_residual(x)  # attention is per sample: its value on a subset equals its value here
    for m1 in (0, 1):
        x1 = x + m1 * scale * attn
        mlp = block.ffn_residual(x1)
        for m2 in (0, 1):
            combos.append((m1, m2))
            close.append(((x1 + m2 * scale * mlp - y).abs().amax(dim=(1, 2)) <= 1e-5 * (1 + y.abs().amax(dim=(1, 2)))))
    close = torch.stack(close)  # [4, B]
    assert torch.all(close.sum(0) == 1), f"samples matching 0 or several outcomes: {close.sum(0).tolist()}"
    return [combos[i] for i in close.int().argmax(0).tolist()]


def test_drop_path_function_statistics():
    x = torch.ones(20000, 3)
    y = drop_path(x, 0.25, training=True)
    kept = y[:, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert drop_path(x, 0.25, training=False) is x


def test_per_sample_mode_at_and_below_one_tenth():
    block = make_block(0.1).train()
    x = torch.randn(400, 3, 16)
    found = outcomes(block, x, block(x), scale=1 / 0.9)
    attn_on = sum(m1 for m1, _ in found)
    mlp_on = sum(m2 for _, m2 in found)
    # Binomial(400, 0.9): mean 360, sd 6
    assert abs(attn_on - 360) < 24 and abs(mlp_on - 360) < 24
    assert attn_on != 400 and mlp_on != 400


def test_subset_mode_above_one_tenth():
    block = make_block(0.3).train()
    x = torch.randn(40, 3, 16)
    kept = int(40 * 0.7)
    subsets = set()
    for _ in range(3):
        found = outcomes(block, x, block(x), scale=40 / kept)
        assert sum(m1 for m1, _ in found) == kept and sum(m2 for _, m2 in found) == kept
        subsets.add(tuple(m1 for m1, _ in found))
    assert len(subsets) > 1  # a new random subset every call


def test_subset_mode_keeps_at_least_one_sample():
    block = make_block(0.9).train()
    x = torch.randn(3, 2, 16)  # int(3 * 0.1) = 0 -> max(..., 1) = 1
    found = outcomes(block, x, block(x), scale=3.0)
    assert sum(m1 for m1, _ in found) == 1 and sum(m2 for _, m2 in found) == 1


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_packed_subset_mode_per_input_tensor(ratio):
    """The packed path uses the subset mode for any ratio > 0, drawing crops per input tensor."""
    block = make_block(ratio).train()
    xs = [torch.randn(20, 5, 16), torch.randn(30, 3, 16)]
    layout = get_packed_layout(((20, 5), (30, 3)), (ratio,))
    drops = [torch.zeros(20), torch.zeros(30)]
    draws = 40
    for _ in range(draws):
        packed = torch.cat([x.reshape(-1, 16) for x in xs])
        ys = unpack(block(packed, layout), layout)
        for i, (x, y) in enumerate(zip(xs, ys)):
            b = x.shape[0]
            kept = max(int(b * (1 - ratio)), 1)
            found = outcomes(block, x, y, scale=b / kept)
            assert sum(m1 for m1, _ in found) == kept and sum(m2 for _, m2 in found) == kept
            drops[i] += torch.tensor([1 - m1 for m1, _ in found], dtype=torch.float)
    # every crop is dropped with probability (b - kept) / b per draw: uniform over crops
    for d, b in zip(drops, (20, 30)):
        kept = max(int(b * (1 - ratio)), 1)
        expected = draws * (b - kept) / b
        assert d.sum().item() == draws * (b - kept)
        assert d.max().item() <= expected + 4 * (expected ** 0.5) + 2


def test_list_path_backward_through_subsets():
    block = make_block(0.2).train()
    xs = [torch.randn(6, 5, 16, requires_grad=True), torch.randn(4, 3, 16, requires_grad=True)]
    sum(y.square().sum() for y in block(xs)).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
    assert block.attn.qkv.weight.grad is not None and block.ls2.gamma.grad is not None


def test_eval_mode_is_identity_of_drop_path():
    kwargs = dict(patch_size=16, img_size=64, embed_dim=32, depth=3, num_heads=2, in_chans=2, init_values=1.0)
    with_dp = vit_small(drop_path_rate=0.5, drop_path_uniform=True, **kwargs).eval()
    without = vit_small(**kwargs).eval()
    without.load_state_dict(with_dp.state_dict())
    xs = [torch.randn(4, 2, 64, 64), torch.randn(6, 2, 32, 32)]
    torch.testing.assert_close(with_dp(xs[0]), without(xs[0]))
    for a, b in zip(with_dp.forward_features_list(xs, [None, None]), without.forward_features_list(xs, [None, None])):
        torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"])
    with_dp.train()
    train_out = with_dp.forward_features_list(xs, [None, None])
    assert (train_out[0]["x_prenorm"] - without.forward_features(xs[0])["x_prenorm"]).abs().max() > 1e-4
    # no drop path: train mode computes exactly the eval function
    without.train()
    torch.testing.assert_close(without.forward_features_list(xs, [None, None])[1]["x_prenorm"],
                               without.eval().forward_features(xs[1])["x_prenorm"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_row_gather_and_add_back_match_index_ops_in_float64(compiled):
    """gather_rows / add_rows (no atomics) == index_select / index_add, values and every gradient, float64."""
    from celldino.models.layers.drop_path import add_rows, gather_rows

    def ours(x, index, w):
        return add_rows(x, index, torch.tanh(gather_rows(x, index)) * w * 1.25)

    def reference(x, index, w):
        return torch.index_add(x, 0, index, torch.tanh(x.index_select(0, index)) * w, alpha=1.25)

    fn = torch.compile(ours, fullgraph=True, backend="aot_eager") if compiled else ours
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, dtype=torch.float64, generator=g)
    w = torch.randn(23, 5, dtype=torch.float64, generator=g)
    index = torch.randperm(37, generator=g)[:23]
    upstream = torch.randn(37, 5, dtype=torch.float64, generator=g)
    results = []
    for f in (fn, reference):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = f(xr, index, wr)
        (out * upstream).sum().backward()
        results.append((out.detach(), xr.grad, wr.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_random_subset_is_a_uniform_draw_without_replacement():
    from celldino.models.layers.drop_path import random_subset

    torch.manual_seed(0)
    batch, kept, draws = 10, 4, 5000
    counts = torch.zeros(batch)
    first = torch.zeros(batch)
    for _ in range(draws):
        subset = random_subset(batch, kept)
        assert subset.shape == (kept,) and subset.unique().numel() == kept
        assert int(subset.min()) >= 0 and int(subset.max()) < batch
        counts[subset] += 1
        first[subset[0]] += 1
    # each index is kept with probability kept / batch and comes first with probability 1 / batch (random order)
    expected = draws * kept / batch
    assert (counts - expected).abs().max() < 5 * (expected * (1 - kept / batch)) ** 0.5
    assert (first - draws / batch).abs().max() < 5 * (draws / batch) ** 0.5
