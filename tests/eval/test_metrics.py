"""Metrics against scikit-learn with the matching zero-division convention (reference_spec.md §6.1, §12)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from celldino.eval.metrics import (MetricType, accuracy, compute_metric, default_metric_and_loss, format_report,
                                   mean_per_class_multiclass_f1, mean_per_class_multilabel_f1, parse_metric_type,
                                   per_class_report)


def _scores_for(preds, num_classes, rng):
    """Random scores whose argmax is `preds`."""
    s = rng.random((len(preds), num_classes)).astype(np.float32)
    s[np.arange(len(preds)), preds] = 2.0
    return s


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_f1_matches_sklearn_including_absent_classes(seed):
    rng = np.random.default_rng(seed)
    C = 7
    targets = rng.integers(0, 5, size=60)  # classes 5 and 6 never occur in the targets ...
    preds = rng.integers(0, 6, size=60)    # ... and 6 is never predicted either
    scores = _scores_for(preds, C, rng)
    # torchmetrics 0.10.3 convention: every class 0..C-1 counts, an absent one as 0
    expected = f1_score(targets, preds, labels=range(C), average="macro", zero_division=0)
    assert mean_per_class_multiclass_f1(scores, targets) == pytest.approx(expected, abs=1e-12)
    assert mean_per_class_multiclass_f1(torch.from_numpy(preds), torch.from_numpy(targets), num_classes=C) \
        == pytest.approx(expected, abs=1e-12)
    # torchmetrics 1.x convention: classes in neither preds nor targets leave the mean
    expected_ignore = f1_score(targets, preds, labels=range(C), average="macro", zero_division=np.nan)
    assert mean_per_class_multiclass_f1(scores, targets, absent="ignore") == pytest.approx(expected_ignore, abs=1e-12)
    assert expected_ignore > expected  # the two conventions really differ here


def test_multiclass_argmax_ties_pick_the_lowest_class():
    scores = np.array([[0.5, 0.5, 0.0], [0.1, 0.3, 0.3]])
    assert mean_per_class_multiclass_f1(scores, [0, 1]) == pytest.approx(
        f1_score([0, 1], [0, 1], labels=range(3), average="macro", zero_division=0))


@pytest.mark.parametrize("seed", range(4))
def test_multilabel_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    N, L = 50, 6
    targets = (rng.random((N, L)) < 0.3).astype(np.int64)
    targets[:, 5] = 0  # a label nobody has
    scores = rng.random((N, L))
    scores[:, 5] = 0.2  # ... and nobody predicts
    preds = (scores > 0.5).astype(int)
    expected = f1_score(targets, preds, average="macro", zero_division=0)
    assert mean_per_class_multilabel_f1(scores, targets) == pytest.approx(expected, abs=1e-12)
    expected_ignore = f1_score(targets, preds, average="macro", zero_division=np.nan)
    assert mean_per_class_multilabel_f1(scores, targets, absent="ignore") == pytest.approx(expected_ignore, abs=1e-12)
    # logits: sigmoid then 0.5, i.e. logit > 0
    logits = rng.normal(size=(N, L))
    expected_logits = f1_score(targets, (logits > 0).astype(int), average="macro", zero_division=0)
    assert mean_per_class_multilabel_f1(logits, targets, logits=True) == pytest.approx(expected_logits, abs=1e-12)


def test_multilabel_threshold_is_strict():
    targets = np.array([[1, 0], [0, 1]])
    scores = np.array([[0.5, 0.0], [0.0, 0.51]])  # exactly 0.5 is not a positive (torchmetrics: preds > 0.5)
    assert mean_per_class_multilabel_f1(scores, targets) == pytest.approx(0.5)


def test_accuracy_and_compute_metric_dispatch():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 40)
    preds = rng.integers(0, 4, 40)
    scores = _scores_for(preds, 4, rng)
    assert accuracy(scores, targets) == pytest.approx(accuracy_score(targets, preds))
    assert compute_metric("accuracy", scores, targets) == pytest.approx(accuracy_score(targets, preds))
    assert compute_metric("mean_per_class_multiclass_f1", scores, targets, 4) == pytest.approx(
        f1_score(targets, preds, labels=range(4), average="macro", zero_division=0))
    assert parse_metric_type("multilabel_f1") is MetricType.MEAN_PER_CLASS_MULTILABEL_F1
    assert parse_metric_type("MEAN_PER_CLASS_MULTICLASS_F1") is MetricType.MEAN_PER_CLASS_MULTICLASS_F1
    with pytest.raises(ValueError, match="expected one of"):
        parse_metric_type("top5")
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        mean_per_class_multiclass_f1(np.zeros((2, 3)), [0, 3])


def test_per_class_report_matches_sklearn():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, 30)
    preds = rng.integers(0, 3, 30)
    rows = per_class_report(_scores_for(preds, 3, rng), targets, class_names=["a", "b", "c"])
    p = precision_score(targets, preds, average=None, zero_division=0)
    r = recall_score(targets, preds, average=None, zero_division=0)
    f = f1_score(targets, preds, average=None, zero_division=0)
    for c, row in enumerate(rows):
        assert row["class"] == "abc"[c]
        assert row["precision"] == pytest.approx(p[c]) and row["recall"] == pytest.approx(r[c])
        assert row["f1"] == pytest.approx(f[c])
        assert row["support"] == int((targets == c).sum()) and row["predicted"] == int((preds == c).sum())
    assert "mean" in format_report(rows)


def test_default_metric_and_loss_follow_the_label_shape():
    """One rule for eval knn and the linear probes: multi-hot -> multilabel F1 + BCE, class indices -> multiclass
    F1 + CE; a given metric (any spelling) or loss is kept."""
    multi_hot, indices = torch.tensor([[1, 0, 1], [0, 1, 0]]), torch.tensor([0, 2, 1])
    assert default_metric_and_loss(multi_hot) == (MetricType.MEAN_PER_CLASS_MULTILABEL_F1, "binary_cross_entropy")
    assert default_metric_and_loss(indices) == (MetricType.MEAN_PER_CLASS_MULTICLASS_F1, "cross_entropy")
    assert default_metric_and_loss(multi_hot.numpy().tolist())[1] == "binary_cross_entropy"  # a list of rows
    assert default_metric_and_loss(None)[0] is MetricType.MEAN_PER_CLASS_MULTICLASS_F1  # no labels known
    assert default_metric_and_loss(indices, "accuracy", "binary_cross_entropy") == (MetricType.MEAN_ACCURACY,
                                                                                   "binary_cross_entropy")
    assert default_metric_and_loss(multi_hot, "mean_per_class_multiclass_f1")[0].value == "mean_per_class_multiclass_f1"
