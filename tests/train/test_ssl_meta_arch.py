"""SSLMetaArch against a hand-assembled float64 computation of the reference objective (reference_spec.md §5):
teacher on the swapped global crops, student crops run one by one (not packed), heads per input, DINO local /
global terms over 2 + 2 x n_local = 18-style normalisation, KoLeo per global view, iBOT per-image masked mean,
EMA centering (zero center at step 1, lagged update) and Sinkhorn-Knopp, EMA teacher update, param groups,
per-submodule clipping."""
import math

import pytest
import torch
import torch.nn.functional as F

from celldino.data.collate import collate_data_and_cast
from celldino.data.masking import MaskingGenerator
from celldino.train.ssl_meta_arch import SSLMetaArch

from train_helpers import tiny_cfg


def _batch(cfg, B=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C, G, L = cfg.student.in_chans, cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_local = cfg.crops.local_crops_number
    samples = [({"global_crops": [torch.randn(C, G, G, generator=g) for _ in range(2)],
                 "local_crops": [torch.randn(C, L, L, generator=g) for _ in range(n_local)]}, 0) for _ in range(B)]
    side = G // cfg.student.patch_size
    import random

    import numpy as np
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, dtype, n_tokens=side * side,
                                 mask_generator=MaskingGenerator((side, side), max_num_patches=0.5 * side * side),
                                 random_module=random.Random(seed), mask_rng=np.random.default_rng(seed))


def _model(cfg):
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).double()
    model.train()
    return model


def _koleo(x, eps=1e-8):
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=eps)
    dots = x @ x.T
    dots.fill_diagonal_(-1)
    nn_index = dots.argmax(dim=1)
    distances = (x - x[nn_index] + eps).norm(dim=-1)
    return -torch.log(distances + eps).mean()


def _sinkhorn(logits, temp, n_iter=3):
    q = torch.exp(logits.double() / temp).T
    K, B = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True) / K
        q = q / q.sum(dim=0, keepdim=True) / B
    return (q * B).T


def _hand_losses(model, cfg, batch, temp, centering="centering"):
    """The reference objective, written out with each crop batch run separately."""
    s, t = model.student, model.teacher
    g, loc, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
    B = g.shape[0] // 2
    n_local = cfg.crops.local_crops_number
    with torch.no_grad():
        t_out = t.backbone.forward_features(g)
        t_cls = t_out["x_norm_clstoken"]
        t_logits = t.dino_head(torch.cat([t_cls[B:], t_cls[:B]]))  # crop A's student matched with crop B's teacher
        t_patch_logits = t.dino_head(t_out["x_norm_patchtokens"][masks])
        if centering == "centering":  # first step: the center is still zero
            t_probs, t_patch_probs = F.softmax(t_logits / temp, -1), F.softmax(t_patch_logits / temp, -1)
        else:
            t_probs, t_patch_probs = _sinkhorn(t_logits, temp), _sinkhorn(t_patch_logits, temp)
    s_g = s.backbone.forward_features(g, masks=masks)
    s_l = s.backbone.forward_features(loc)
    s_g_logits = s.dino_head(s_g["x_norm_clstoken"])
    s_l_logits = s.dino_head(s_l["x_norm_clstoken"])
    s_patch_logits = s.dino_head(s_g["x_norm_patchtokens"][masks])
    n_terms = 2 + 2 * n_local
    local = 0
    for j in range(n_local):
        log_p = F.log_softmax(s_l_logits[j * B:(j + 1) * B] / 0.1, -1)
        for teacher in (t_probs[:B], t_probs[B:]):
            local = local - (teacher * log_p).sum(-1).mean()
    local = local / n_terms
    glob = -(t_probs * F.log_softmax(s_g_logits / 0.1, -1)).sum(-1).mean() * 2 / n_terms
    cls = s_g["x_norm_clstoken"]
    koleo = 0.1 * (_koleo(cls[:B]) + _koleo(cls[B:]))
    per_patch = (t_patch_probs * F.log_softmax(s_patch_logits / 0.1, -1)).sum(-1)
    crop_of_row = masks.nonzero()[:, 0]
    ibot = 0
    for i in range(2 * B):
        rows = crop_of_row == i
        if rows.any():
            ibot = ibot + per_patch[rows].sum() / masks[i].sum()
    ibot = -ibot / (2 * B)
    terms = {"dino_local_crops_loss": local, "dino_global_crops_loss": glob, "koleo_loss": koleo, "ibot_loss": ibot}
    return terms, t_logits, t_patch_logits


def test_losses_and_gradients_match_hand_computation():
    cfg = tiny_cfg()
    model = _model(cfg)
    batch = _batch(cfg)
    assert batch["collated_masks"].any()
    temp = 0.05
    total, terms = model.compute_losses(batch, temp)
    grads = torch.autograd.grad(total, list(model.student.parameters()), allow_unused=True)

    ref_model = _model(cfg)
    ref_terms, t_logits, t_patch_logits = _hand_losses(ref_model, cfg, batch, temp)
    ref_total = sum(ref_terms.values())
    ref_grads = torch.autograd.grad(ref_total, list(ref_model.student.parameters()), allow_unused=True)

    assert set(terms) == set(ref_terms)
    # the losses take log_softmax in fp32 by design (celldino.losses), hence fp32-level agreement
    for key, value in ref_terms.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-6), key
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    for (name, _), grad, ref in zip(model.student.named_parameters(), grads, ref_grads):
        if ref is None:
            assert grad is None or grad.abs().max() == 0, name
            continue
        # fp32 softmax inside the losses: compare gradients as whole tensors
        assert ((grad - ref).norm() / ref.norm().clamp(min=1e-30)).item() < 1e-5, name
    # the teacher gets no gradient and is an exact copy of the initial student
    assert not any(p.requires_grad for p in model.teacher.parameters())

    # lagged centering: nothing applied yet; the pending update is 0.1 x the batch mean of the teacher outputs
    assert model.dino_loss.center.abs().max() == 0
    model.dino_loss.apply_center_update()
    model.ibot_patch_loss.apply_center_update()
    torch.testing.assert_close(model.dino_loss.center.double(), 0.1 * t_logits.mean(0, keepdim=True),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(model.ibot_patch_loss.center.double().view(1, -1),
                               0.1 * t_patch_logits.mean(0, keepdim=True), rtol=1e-6, atol=1e-9)


def test_second_step_uses_the_lagged_center():
    cfg = tiny_cfg()
    model = _model(cfg)
    b1, b2 = _batch(cfg, seed=1), _batch(cfg, seed=2)
    with torch.no_grad():
        model.compute_losses(b1, 0.05)
        _, terms = model.compute_losses(b2, 0.05)
        # by hand: center after step 1, then the teacher targets of step 2
        ref = _model(cfg)
        _, t1, p1 = _hand_losses(ref, cfg, b1, 0.05)
        center, patch_center = 0.1 * t1.mean(0, keepdim=True), 0.1 * p1.mean(0, keepdim=True)
        g = b2["collated_global_crops"]
        B = g.shape[0] // 2
        out = ref.teacher.backbone.forward_features(g)
        cls = out["x_norm_clstoken"]
        t2 = ref.teacher.dino_head(torch.cat([cls[B:], cls[:B]]))
        probs = F.softmax((t2 - center) / 0.05, -1)
        s_g = ref.student.backbone.forward_features(g, masks=b2["collated_masks"])
        glob = -(probs * F.log_softmax(ref.student.dino_head(s_g["x_norm_clstoken"]) / 0.1, -1)).sum(-1).mean()
        n_terms = 2 + 2 * cfg.crops.local_crops_number
        assert terms["dino_global_crops_loss"].item() == pytest.approx((glob * 2 / n_terms).item(), rel=1e-6)
        assert patch_center.abs().max() > 0  # (used by the iBOT term; its wiring is covered above)


def test_sinkhorn_knopp_centering_matches_hand_computation():
    cfg = tiny_cfg("train.centering=sinkhorn_knopp")
    model = _model(cfg)
    batch = _batch(cfg, seed=3)
    with torch.no_grad():
        _, terms = model.compute_losses(batch, 0.05)
        ref_terms, _, _ = _hand_losses(_model(cfg), cfg, batch, 0.05, centering="sinkhorn_knopp")
    for key, value in ref_terms.items():  # Sinkhorn targets are fp32 (the kernel contract)
        assert terms[key].item() == pytest.approx(value.item(), rel=2e-6), key


def test_separate_ibot_head_and_no_local_crops():
    cfg = tiny_cfg("ibot.separate_head=true", "crops.local_crops_number=0", "ibot.head_n_prototypes=48")
    model = _model(cfg)
    assert model.student.ibot_head.last_layer.weight_v.shape[0] == 48
    batch = _batch(cfg, seed=4)
    total, terms = model.compute_losses(batch, 0.04)
    assert "dino_local_crops_loss" not in terms
    assert set(terms) == {"dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    total.backward()
    assert model.student.ibot_head.last_layer.weight_v.grad.abs().sum() > 0
    # no local crops: n_local_terms = max(0, 1) = 1, so the global term is scaled by 2 / 3
    ref = _model(cfg)
    with torch.no_grad():
        out_t = ref.teacher.backbone.forward_features(batch["collated_global_crops"])["x_norm_clstoken"]
        B = out_t.shape[0] // 2
        probs = F.softmax(ref.teacher.dino_head(torch.cat([out_t[B:], out_t[:B]])) / 0.04, -1)
        s = ref.student.backbone.forward_features(batch["collated_global_crops"], masks=batch["collated_masks"])
        glob = -(probs * F.log_softmax(ref.student.dino_head(s["x_norm_clstoken"]) / 0.1, -1)).sum(-1).mean()
    assert terms["dino_global_crops_loss"].item() == pytest.approx((glob * 2 / 3).item(), rel=1e-6)


def test_teacher_starts_as_the_student_and_ema_update():
    cfg = tiny_cfg()
    model = _model(cfg)
    for (name, s), (_, t) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert torch.equal(s, t), name
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = [p.detach().clone() for p in model.teacher.parameters()]
    before_s = [p.detach().clone() for p in model.student.parameters()]
    model.update_teacher(0.9)
    for t0, s0, t1 in zip(before_t, before_s, model.teacher.parameters()):
        # error vs float64 at most 2x that of the reference's fp32 mul_ + add_ (the kernel rule), plus a floor
        want = 0.9 * t0.double() + 0.1 * s0.double()
        reference_error = ((0.9 * t0 + 0.1 * s0).double() - want).abs().max()
        assert (t1.double() - want).abs().max() <= 2 * reference_error + 1e-7 * want.abs().max()
    # the student is untouched
    for s0, s1 in zip(before_s, model.student.parameters()):
        assert torch.equal(s0, s1)


def test_param_groups_and_per_submodule_clipping():
    cfg = tiny_cfg()
    model = _model(cfg)
    groups = model.get_params_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.student.parameters())  # each once
    head_ids = {id(p) for p in model.student.dino_head.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= head_ids or not ids & head_ids  # groups are fused per submodule
        if ids <= head_ids:
            assert g["lr_multiplier"] == 1.0
            assert g["is_last_layer"] == any(p is model.student.dino_head.last_layer.weight_g
                                             or p is model.student.dino_head.last_layer.weight_v
                                             for p in g["params"])
    # patch embedding weight: 0.9^(depth + 1) x 0.2
    patch_w = model.student.backbone.patch_embed.proj.weight
    g = next(g for g in groups if any(p is patch_w for p in g["params"]))
    assert g["lr_multiplier"] == pytest.approx(0.9 ** 3 * 0.2) and g["wd_multiplier"] == 1.0

    torch.manual_seed(1)
    for p in model.student.parameters():
        p.grad = torch.randn_like(p) * 10
    expected = {}
    for name, module in model.student.items():
        grads = [p.grad.clone() for p in module.parameters()]
        norm = torch.sqrt(sum((x ** 2).sum() for x in grads))
        expected[name] = (norm, [x * min(1.0, 3.0 / (norm.item() + 1e-6)) for x in grads])
    norms = model.clip_gradients(3.0)
    for name, module in model.student.items():
        assert norms[name].item() == pytest.approx(expected[name][0].item(), rel=1e-12)
        for p, ref in zip(module.parameters(), expected[name][1]):
            torch.testing.assert_close(p.grad, ref, rtol=1e-12, atol=1e-12)
        clipped = math.sqrt(sum((p.grad ** 2).sum().item() for p in module.parameters()))
        assert clipped == pytest.approx(3.0, rel=1e-5)
