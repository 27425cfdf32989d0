"""Losses against float64 re-computations of the reference formulas (reference_spec.md §5)."""

import pytest
import torch
import torch.nn.functional as F

from celldino.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from gloo_ranks import run_on_gloo_ranks


def _ce64(teacher_probs, student_logits, temp=0.1):
    return -(teacher_probs.double() * torch.log_softmax(student_logits.double() / temp, -1)).sum(-1)


def _sinkhorn64(logits, temp, n_iter=3, n_rows=None):
    """The reference algorithm in float64 (no max subtraction: fine for moderate logits in float64)."""
    Q = torch.exp(logits.double() / temp).t()
    K, B = Q.shape
    B = n_rows or B
    Q = Q / Q.sum()
    for _ in range(n_iter):
        Q = Q / Q.sum(1, keepdim=True) / K
        Q = Q / Q.sum(0, keepdim=True) / B
    return (Q * B).t()


def test_dino_forward_sums_every_student_teacher_pair():
    torch.manual_seed(1)
    K, B = 33, 5
    students = [torch.randn(B, K) for _ in range(3)]
    teachers = [F.softmax(torch.randn(B, K), -1) for _ in range(2)]
    expected = sum(_ce64(t, s).mean() for s in students for t in teachers)
    got = DINOLoss(K)(students, teachers)
    assert torch.allclose(got.double(), expected, rtol=1e-5)


@pytest.mark.slow
def test_compiled_cross_entropies_equal_eager_in_value_and_gradient():
    """compile_cross_entropy (what the trainer does with train.compile): same losses and student gradients as the
    eager formulas, to fp32 rounding, for bf16 and fp32 logits and for row counts that change between calls
    (dynamic shapes: the iBOT row count is the batch's masked-patch count)."""
    torch.manual_seed(3)
    dino_eager, dino_compiled = DINOLoss(101), DINOLoss(101)
    ibot_eager, ibot_compiled = iBOTPatchLoss(101), iBOTPatchLoss(101)
    dino_compiled.compile_cross_entropy()
    ibot_compiled.compile_cross_entropy()
    for rows, dtype in ((7, torch.float32), (12, torch.bfloat16), (5, torch.bfloat16)):
        logits = (3 * torch.randn(4 * rows, 101)).to(dtype)
        teacher = torch.softmax(torch.randn(2, rows, 101), -1)
        masks = torch.rand(2, 9) < 0.6
        masks[0, 0] = True
        n_masked = int(masks.sum())
        patch_logits = (3 * torch.randn(n_masked, 101)).to(dtype)
        patch_teacher = torch.softmax(torch.randn(n_masked, 101), -1)
        results = []
        for dino, ibot in ((dino_eager, ibot_eager), (dino_compiled, ibot_compiled)):
            s, p = logits.clone().requires_grad_(), patch_logits.clone().requires_grad_()
            loss_dino = dino(s.chunk(4), teacher)
            loss_ibot = ibot.forward_masked(p, patch_teacher, masks, n_masked_patches=n_masked)
            (loss_dino + loss_ibot).backward()
            results.append((loss_dino.detach(), loss_ibot.detach(), s.grad, p.grad))
        for got, want in zip(results[1], results[0]):
            tol = 1e-5 if got.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_dino_centering_is_lagged_one_step():
    torch.manual_seed(2)
    K, T = 17, 0.04
    loss = DINOLoss(K, center_momentum=0.9)
    outs = [torch.randn(6, K) for _ in range(3)]
    center = torch.zeros(1, K, dtype=torch.float64)
    for out in outs:
        got = loss.softmax_center_teacher(out, T)
        expected = torch.softmax((out.double() - center) / T, -1)  # uses the center from the previous steps only
        assert torch.allclose(got.double(), expected, atol=1e-6)
        loss.update_center(out)
        center = 0.9 * center + 0.1 * out.double().mean(0, keepdim=True)
    loss.apply_center_update()
    assert torch.allclose(loss.center.double(), center, atol=1e-6)
    # a second apply without a new update changes nothing
    loss.apply_center_update()
    assert torch.allclose(loss.center.double(), center, atol=1e-6)


@pytest.mark.parametrize("rows,K", [(6, 40), (1, 7), (13, 101)])
def test_dino_sinkhorn_matches_reference_algorithm(rows, K):
    torch.manual_seed(3)
    logits = torch.randn(rows, K) * 0.5  # realistic head-logit spread: no fp32 underflow at T=0.07
    got = DINOLoss(K).sinkhorn_knopp_teacher(logits, 0.07)
    expected = _sinkhorn64(logits, 0.07)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(rows), atol=1e-5)  # every row is a distribution


def test_sinkhorn_marginals_converge_to_uniform_prototypes():
    torch.manual_seed(4)
    rows, K = 64, 16
    targets = DINOLoss(K).sinkhorn_knopp_teacher(torch.randn(rows, K), 0.1, n_iterations=200)
    assert torch.allclose(targets.sum(-1), torch.ones(rows), atol=1e-5)
    assert torch.allclose(targets.sum(0), torch.full((K,), rows / K), rtol=1e-3)


def test_sinkhorn_is_safe_at_low_temperature():
    """exp(t / 0.04) overflows fp32 for t > ~3.5 without the global max subtraction; ours stays exact."""
    torch.manual_seed(5)
    logits = torch.randn(8, 50) * 0.5 + 20
    assert not torch.isfinite(torch.exp(logits / 0.04)).all()  # the reference's first step overflows
    got = DINOLoss(50).sinkhorn_knopp_teacher(logits, 0.04)
    expected = _sinkhorn64(logits - logits.max(), 0.04)  # a global shift is an exact no-op
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-7)


def test_ibot_forward_masked_weights_and_normalisation():
    torch.manual_seed(6)
    K, n_crops, n_tokens = 11, 4, 9
    masks = torch.zeros(n_crops, n_tokens, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[2, [0]] = True
    masks[3, [3, 4, 7, 8]] = True
    n = int(masks.sum())
    student = torch.randn(n + 3, K)  # padded to an upper bound, as the trainer does
    teacher = F.softmax(torch.randn(n, K), -1)
    loss = iBOTPatchLoss(K).forward_masked(student[:n], teacher, masks, n_masked_patches=n)
    per_image_count = masks.sum(-1).clamp(min=1).double()
    weights = (1 / per_image_count).unsqueeze(-1).expand_as(masks)[masks]
    expected = (_ce64(teacher, student[:n]) * weights).sum() / n_crops
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    # explicit masks_weight gives the same value
    again = iBOTPatchLoss(K).forward_masked(student[:n], teacher, masks, n_masked_patches=n,
                                            masks_weight=weights.float())
    assert torch.allclose(again, loss)


def test_ibot_dense_forward_is_per_image_masked_mean():
    torch.manual_seed(7)
    K, B, N = 6, 3, 5
    s, t = torch.randn(B, N, K), F.softmax(torch.randn(B, N, K), -1)
    masks = torch.rand(B, N) > 0.5
    masks[1] = False
    per_token = -_ce64(t, s)
    expected = -torch.stack([(per_token[i] * masks[i]).sum() / max(int(masks[i].sum()), 1) for i in range(B)]).mean()
    assert torch.allclose(iBOTPatchLoss(K)(s, t, masks).double(), expected, rtol=1e-5)


def test_ibot_center_is_mean_of_masked_patches_and_accepts_reference_shape():
    torch.manual_seed(8)
    K = 9
    tokens = torch.randn(7, K)
    for shaped in (tokens, tokens.unsqueeze(0)):
        loss = iBOTPatchLoss(K)
        loss.update_center(shaped)
        loss.apply_center_update()
        assert loss.center.shape == (1, 1, K)
        assert torch.allclose(loss.center[0], 0.1 * tokens.mean(0, keepdim=True), atol=1e-6)


def test_ibot_sinkhorn_uses_given_row_count_and_leaves_it_untouched():
    torch.manual_seed(9)
    logits = torch.randn(10, 30)
    count = torch.tensor([10])
    got = iBOTPatchLoss(30).sinkhorn_knopp_teacher(logits, 0.07, count)
    assert torch.allclose(got.double(), _sinkhorn64(logits, 0.07), rtol=1e-4, atol=1e-7)
    assert count.item() == 10


def test_koleo_matches_reference_formula():
    torch.manual_seed(10)
    x = torch.randn(12, 20)
    xn = F.normalize(x.double(), dim=-1, eps=1e-8)
    dots = xn @ xn.t()
    dots.fill_diagonal_(-1)
    nn_idx = dots.argmax(1)
    d = (xn - xn[nn_idx] + 1e-8).norm(dim=-1)  # PairwiseDistance(p=2, eps=1e-8) adds eps to the difference
    expected = -torch.log(d + 1e-8).mean()
    assert torch.allclose(KoLeoLoss()(x).double(), expected, rtol=1e-5)


def test_koleo_rejects_a_single_row():
    with pytest.raises(ValueError, match="KoLeo"):  # documented choice: B=1 is an error, not inf/NaN
        KoLeoLoss()(torch.randn(1, 8))


# ---- distributed: 2 gloo processes equal one process on the concatenated batch -------------------------------

def _rank_center_and_targets(rank, world, outs, n_masked):
    dino = DINOLoss(outs.shape[-1])
    local = outs.chunk(world)[rank]
    dino.update_center(local)
    dino.apply_center_update()
    rows = torch.split(outs, n_masked)[rank]
    ibot_targets = iBOTPatchLoss(outs.shape[-1]).sinkhorn_knopp_teacher(rows, 0.07, torch.tensor([len(rows)]))
    dino_targets = dino.sinkhorn_knopp_teacher(local, 0.07)
    return dino.center.clone(), ibot_targets, dino_targets


@pytest.mark.distributed
def test_distributed_centering_and_sinkhorn_equal_single_process(tmp_path):
    torch.manual_seed(11)
    outs = torch.randn(8, 13)
    n_masked = [3, 5]  # uneven masked-patch counts per rank
    results = run_on_gloo_ranks(_rank_center_and_targets, (outs, n_masked), tmp_path / "gloo_store")
    expected_center = 0.1 * outs.mean(0, keepdim=True)
    expected_sk = _sinkhorn64(outs, 0.07)
    for rank in range(2):
        center, ibot_targets, dino_targets = results[rank]
        assert torch.allclose(center, expected_center, atol=1e-6)
        assert torch.allclose(ibot_targets.double(), torch.split(expected_sk, n_masked)[rank], rtol=1e-4, atol=1e-7)
        assert torch.allclose(dino_targets.double(), expected_sk.chunk(2)[rank], rtol=1e-4, atol=1e-7)
