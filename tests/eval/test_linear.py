"""Linear probes (reference_spec.md §6.1): the head grid + GridAdamW equal torch.optim.AdamW on separate heads
with CosineAnnealingLR, a planted linear signal is recovered (CE and BCE, and by scikit-learn), resume after a
crash gives the same heads, reference names and the val = test note in results_eval_linear.json."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from celldino.eval.linear import (GridAdamW, LinearHeadGrid, cosine_lr_factor, evaluate_linear, head_name,
                                  linear_leave_one_out, linear_probe_on_features, logistic_regression_probe,
                                  read_leave_one_out_groups, scale_lr, train_linear_heads)

from eval_helpers import TensorItems


def test_grid_adamw_equals_torch_adamw_with_cosine_schedule():
    torch.manual_seed(0)
    lrs, wds = [0.01, 0.1], [0.0, 0.05]
    grid = LinearHeadGrid(6, 3, lrs, wds).double()
    refs = []
    for h in range(grid.num_heads):
        lin = nn.Linear(6, 3).double()
        with torch.no_grad():
            lin.weight.copy_(grid.weight[h])
            lin.bias.copy_(grid.bias[h])
        refs.append(lin)
    opt_ref = torch.optim.AdamW([{"params": lin.parameters(), "lr": float(grid.lrs[h]), "weight_decay": float(grid.wds[h])}
                                 for h, lin in enumerate(refs)], weight_decay=0)
    max_iter = 7
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_ref, max_iter, eta_min=0)
    opt = GridAdamW([grid.weight, grid.bias], grid.lrs, grid.wds)
    for it in range(max_iter):
        x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
        assert opt_ref.param_groups[0]["lr"] == pytest.approx(grid.lrs[0].item() * cosine_lr_factor(it, max_iter))
        loss_ref = sum(nn.functional.cross_entropy(lin(x), y) for lin in refs)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        sched.step()
        logits = grid(x)
        loss = sum(nn.functional.cross_entropy(logits[h], y) for h in range(grid.num_heads))
        opt.zero_grad()
        loss.backward()
        opt.step(cosine_lr_factor(it, max_iter))
    for h, lin in enumerate(refs):
        torch.testing.assert_close(grid.weight[h], lin.weight, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(grid.bias[h], lin.bias, atol=1e-12, rtol=1e-10)


def test_reference_names_and_lr_scaling():
    assert scale_lr(1e-3, 64, 8) == pytest.approx(2e-3)
    assert head_name(4, True, scale_lr(1e-4, 64), 1e-4) == "classifier_4_blocks_avgpool_True_lr_0_00003_wd_1_00E-04"
    grid = LinearHeadGrid(4, 2, [0.1, 0.2], [0.0, 1e-4])
    assert grid.names[1] == head_name(1, False, 0.1, 1e-4) and grid.num_heads == 4  # lr-major order
    assert abs(grid.weight.std().item() - 0.01) < 0.005 and grid.bias.abs().sum() == 0


def _planted(n, dim=16, classes=4, seed=0, multilabel=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, dim, generator=g)
    logits = x @ w
    y = (logits > 0).long() if multilabel else logits.argmax(1)
    return x, y


@pytest.mark.parametrize("multilabel", [False, True])
def test_linear_probe_recovers_a_planted_signal(multilabel):
    xtr, ytr = _planted(800, multilabel=multilabel)
    xva, yva = _planted(300, seed=1, multilabel=multilabel)
    xte, yte = _planted(300, seed=2, multilabel=multilabel)
    out = linear_probe_on_features(xtr, ytr, xva, yva, test_sets={"test": (xte, yte)},
                                   learning_rates=[1e-4, 0.05, 1.0], weight_decays=[0.0, 1e-4], batch_size=64,
                                   epochs=4, epoch_length=50, progress=False)
    assert out["loss_type"] == ("binary_cross_entropy" if multilabel else "cross_entropy")
    assert len(out["val_metrics"]) == 6
    assert out["val"] > 0.9 and out["test"]["test"] > 0.88
    assert out["val"] == max(out["val_metrics"].values())
    assert "lr_0_00006" not in out["best_classifier"]  # the tiny lr cannot learn this in 200 steps
    lr = logistic_regression_probe(xtr, ytr, xva, yva, test_sets={"test": (xte, yte)}, Cs=(0.1, 10.0))
    assert lr["val"] > 0.9 and lr["test"]["test"] > 0.88


def test_resume_after_a_crash_gives_the_same_heads(tmp_path):
    x, y = _planted(200)

    def make():
        return LinearHeadGrid(16, 4, [0.01, 0.1], [0.0], generator=torch.Generator().manual_seed(0))

    def batches(start, crash_at=None):
        for it in range(start, 10 ** 6):
            if it == crash_at:
                raise KeyboardInterrupt
            idx = torch.Generator().manual_seed(it)
            sel = torch.randint(0, 200, (32,), generator=idx)
            yield x[sel], y[sel]

    straight = train_linear_heads(make(), batches, max_iter=30, progress=False)
    ckpt = str(tmp_path / "heads.pth")
    with pytest.raises(KeyboardInterrupt):
        train_linear_heads(make(), lambda s: batches(s, crash_at=25), max_iter=30, checkpoint_path=ckpt,
                           checkpoint_period=10, progress=False)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 20
    resumed = train_linear_heads(make(), batches, max_iter=30, checkpoint_path=ckpt, checkpoint_period=10,
                                 progress=False)
    torch.testing.assert_close(resumed.weight, straight.weight)
    torch.testing.assert_close(resumed.bias, straight.bias)
    with pytest.raises(ValueError, match="do not match"):
        train_linear_heads(LinearHeadGrid(16, 4, [0.5], [0.0]), batches, max_iter=30, checkpoint_path=ckpt)


def test_leave_one_out(tmp_path):
    xtr, ytr = _planted(300, classes=7)
    xte, yte = _planted(90, seed=3, classes=7)
    groups = np.array(["p1", "p2", "p3"] * 30)
    out = linear_leave_one_out(xtr, ytr, xte, yte, groups, score_labels=None, learning_rates=[0.05, 1.0],
                               weight_decays=[0.0], batch_size=64, epochs=2, epoch_length=40, progress=False)
    assert set(out["head_f1"]) == {head_name(1, False, scale_lr(lr, 64), 0.0) for lr in (0.05, 1.0)}
    assert out["f1"] == max(out["head_f1"].values()) and out["f1"] > 0.6
    meta = tmp_path / "enriched_meta_CP.csv"
    meta.write_text("Plate,Task_four,x\nA,True,1\nB,False,2\nB,True,3\n")
    assert read_leave_one_out_groups(str(meta), 2).tolist() == ["A", "B"]
    with pytest.raises(ValueError, match="test set has 5"):
        read_leave_one_out_groups(str(meta), 5)


@pytest.mark.parametrize("mode", ["features", "augment"])
def test_evaluate_linear_end_to_end(tmp_path, tiny_model, mode):
    # two classes that differ in the mean of channel 0: linearly separable in the features
    def items(n, seed):
        gen = torch.Generator().manual_seed(seed)
        labels = [i % 2 for i in range(n)]
        imgs = [torch.randn(2, 32, 32, generator=gen) + 3.0 * lab * torch.tensor([1.0, 0.0])[:, None, None]
                for lab in labels]
        return TensorItems(imgs, labels)
    out = evaluate_linear(tiny_model, items(24, 1), items(16, 2), mode=mode, learning_rates=[0.1, 1.0],
                          weight_decays=[0.0], batch_size=8, epochs=2, epoch_length=5, n_last_blocks=2, avgpool=True,
                          output_dir=str(tmp_path), eval_period_iterations=4, save_checkpoint_frequency=4,
                          dataset_names={"val": "VAL"}, sklearn_probe=mode == "features", progress=False)
    assert out["best_classifier"].startswith("classifier_2_blocks_avgpool_True_lr_")
    assert "VAL_accuracy" in out and "validation set" in out["note"]
    assert out["VAL_accuracy"] == pytest.approx(100 * max(out["val_metrics"].values()))
    lines = [json.loads(line) for line in (tmp_path / "results_eval_linear.json").read_text().splitlines()]
    assert {"iter": 3, "best_classifier": lines[0]["best_classifier"]} == lines[0]  # periodic eval at it 4
    assert {"VAL_accuracy": out["VAL_accuracy"]} in lines and {"iter": 10} in lines
    assert (tmp_path / "linear_heads_checkpoint.pth").exists()
    if mode == "features":
        assert "VAL_logistic_regression" in out


def test_progress_bar_says_the_loss_is_summed_over_the_heads(capsys):
    torch.manual_seed(0)
    heads = LinearHeadGrid(4, 3, [0.01, 0.1], [0.0])
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def batches(start):
        while True:
            yield x, y
    train_linear_heads(heads, batches, max_iter=3, progress=True)
    err = capsys.readouterr().err
    assert "loss(sum of 2 heads)=" in err
    from celldino.eval.linear import _loss
    with torch.no_grad():  # the number shown: each head's mean CE, summed
        per_head = [nn.functional.cross_entropy(heads(x)[h], y) for h in range(2)]
        assert _loss(heads(x), y, "cross_entropy").item() == pytest.approx(sum(per_head).item(), rel=1e-6)


def test_one_class_train_labels_are_refused():
    f = torch.randn(10, 4)
    with pytest.raises(ValueError, match="single class"):
        linear_probe_on_features(f, torch.zeros(10, dtype=torch.long), f, torch.arange(10) % 2, epochs=1,
                                 epoch_length=1, progress=False)
    with pytest.raises(ValueError, match="no image has any of its 3 multi-hot labels"):
        linear_probe_on_features(f, torch.zeros(10, 3, dtype=torch.long), f, torch.zeros(10, 3, dtype=torch.long),
                                 epochs=1, epoch_length=1, progress=False)


def test_console_summary_names_the_metric():
    from celldino.eval.linear_cli import format_results
    text = format_results({"val_set_accuracy": 71.25, "best_classifier": "classifier_x", "test_set_accuracy": 60.0,
                           "val_set_logistic_regression": 65.0, "metric": "mean_per_class_multilabel_f1",
                           "val_metrics": {"classifier_x": 0.7125}})
    lines = text.splitlines()
    assert lines[0] == "linear probe (best head chosen on val by mean_per_class_multilabel_f1):"
    assert "  val_set_accuracy: 71.25  (mean_per_class_multilabel_f1 x 100)" in lines
    assert "  test_set_accuracy: 60.00  (mean_per_class_multilabel_f1 x 100)" in lines
    assert "  val_set_logistic_regression: 65.00  (mean_per_class_multilabel_f1 x 100)" in lines
    assert "  best_classifier: classifier_x" in lines and "val_metrics" not in text
