"""Classification metrics of the reference evaluations (reference_spec.md §6.1, §12), in numpy.

All metrics return a fraction in [0, 1]; the reference reports them x 100 as "top-1".

Conventions (each one a decision; see docs/eval.md):
- Multiclass predictions are the argmax of the scores; ties go to the lowest class index.
- Multilabel predictions are `score > threshold` (strictly greater, threshold 0.5, never tuned). Logits (linear
  heads) go through a sigmoid first: `logits=True`. The reference (torchmetrics) decides "are these logits?" per
  batch by checking whether every value lies in [0, 1]; we say it explicitly instead.
- Macro F1 and classes that appear in neither the predictions nor the targets: torchmetrics 0.10.3 (the version
  the reference pins and its published numbers come from) counts them with F1 = 0; torchmetrics 1.x drops them
  from the multiclass mean. Default `absent="zero"` follows 0.10.3 (= scikit-learn
  `f1_score(..., labels=range(C), average="macro", zero_division=0)`); `absent="ignore"` follows 1.x for
  multiclass (= scikit-learn with `zero_division=np.nan`, which excludes them from the mean).
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "MetricType",
    "parse_metric_type",
    "default_metric_and_loss",
    "to_numpy",
    "multiclass_predictions",
    "multilabel_predictions",
    "f1_from_counts",
    "mean_per_class_multiclass_f1",
    "mean_per_class_multilabel_f1",
    "accuracy",
    "compute_metric",
    "per_class_report",
    "format_report",
]

ABSENT = ("zero", "ignore")


class MetricType(Enum):
    """Reference metric names (dinov2/eval/metrics.py); all reported as "top-1"."""

    MEAN_ACCURACY = "mean_accuracy"
    MEAN_PER_CLASS_MULTICLASS_F1 = "mean_per_class_multiclass_f1"
    MEAN_PER_CLASS_MULTILABEL_F1 = "mean_per_class_multilabel_f1"

    @property
    def multilabel(self) -> bool:
        return self is MetricType.MEAN_PER_CLASS_MULTILABEL_F1

    def __str__(self) -> str:
        return self.value


_ALIASES = {
    "accuracy": MetricType.MEAN_ACCURACY,
    "acc": MetricType.MEAN_ACCURACY,
    "multiclass_f1": MetricType.MEAN_PER_CLASS_MULTICLASS_F1,
    "f1": MetricType.MEAN_PER_CLASS_MULTICLASS_F1,
    "multilabel_f1": MetricType.MEAN_PER_CLASS_MULTILABEL_F1,
}


def parse_metric_type(value) -> MetricType:
    """MetricType from its reference name (mean_per_class_multiclass_f1, ...), enum name, or short alias
    (multiclass_f1, multilabel_f1, accuracy)."""
    if isinstance(value, MetricType):
        return value
    s = str(value).strip()
    low = s.lower()
    if low in _ALIASES:
        return _ALIASES[low]
    for m in MetricType:
        if low in (m.value, m.name.lower()):
            return m
    names = sorted({m.value for m in MetricType} | set(_ALIASES))
    raise ValueError(f"metric {value!r}: expected one of {', '.join(names)}")


def default_metric_and_loss(labels, metric=None, loss_type: Optional[str] = None) -> Tuple[MetricType, str]:
    """(metric, linear-head loss) for these train labels, each kept when given: multi-hot [N, L] labels get
    multilabel F1 and binary cross-entropy, class indices [N] multiclass F1 and cross-entropy (the reference's
    pairs). Only the labels' number of dimensions is read (tensor, array, list; None counts as class indices)."""
    multi_hot = np.ndim(labels) == 2
    metric = parse_metric_type(metric or (MetricType.MEAN_PER_CLASS_MULTILABEL_F1 if multi_hot
                                          else MetricType.MEAN_PER_CLASS_MULTICLASS_F1))
    return metric, loss_type or ("binary_cross_entropy" if multi_hot else "cross_entropy")


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.float16", "torch.bfloat16"):  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def multiclass_predictions(scores_or_preds) -> np.ndarray:
    """[N, C] scores -> argmax (first maximum wins); [N] integer predictions pass through."""
    a = to_numpy(scores_or_preds)
    if a.ndim == 2:
        return np.argmax(a, axis=1).astype(np.int64)  # numpy documents: first occurrence on ties
    if a.ndim == 1:
        return a.astype(np.int64)
    raise ValueError(f"multiclass predictions: expected [N, C] scores or [N] labels, got shape {a.shape}")


def multilabel_predictions(scores, threshold: float = 0.5, logits: bool = False) -> np.ndarray:
    """[N, L] scores (vote mass / probabilities, or logits with logits=True) -> {0, 1} by `> threshold`."""
    a = to_numpy(scores).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"multilabel predictions: expected [N, L] scores, got shape {a.shape}")
    if logits:
        a = 1.0 / (1.0 + np.exp(-a))
    return (a > threshold).astype(np.int64)


def _check_absent(absent: str) -> None:
    if absent not in ABSENT:
        raise ValueError(f"absent={absent!r}: expected one of {ABSENT}")


def f1_from_counts(tp, fp, fn, absent: str = "zero"):
    """Per-class F1 = 2tp / (2tp + fp + fn) and its macro mean. A class with tp + fp + fn = 0 gets F1 0
    (absent="zero") or is left out of the mean (absent="ignore"; its per-class value is NaN)."""
    _check_absent(absent)
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    empty = denom == 0
    f1 = np.where(empty, 0.0, 2 * tp / np.where(empty, 1.0, denom))
    if absent == "ignore":
        f1 = np.where(empty, np.nan, f1)
        mean = float(np.nanmean(f1)) if (~empty).any() else 0.0
    else:
        mean = float(f1.mean()) if f1.size else 0.0
    return f1, mean


def _multiclass_counts(preds: np.ndarray, targets: np.ndarray, num_classes: int):
    if preds.shape != targets.shape:
        raise ValueError(f"predictions {preds.shape} and targets {targets.shape} differ in shape")
    for name, a in (("targets", targets), ("predictions", preds)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}); got [{a.min()}, {a.max()}]")
    tp = np.bincount(targets[preds == targets], minlength=num_classes)
    pred_count = np.bincount(preds, minlength=num_classes)
    true_count = np.bincount(targets, minlength=num_classes)
    return tp, pred_count - tp, true_count - tp


def _num_classes(scores_or_preds, targets, num_classes) -> int:
    if num_classes is not None:
        return int(num_classes)
    a = to_numpy(scores_or_preds)
    if a.ndim == 2:
        return int(a.shape[1])
    t = to_numpy(targets)
    return int(max(a.max(initial=-1), t.max(initial=-1)) + 1)


def mean_per_class_multiclass_f1(scores_or_preds, targets, num_classes: Optional[int] = None,
                                 absent: str = "zero") -> float:
    """Macro F1 over classes 0..C-1 (reference `mean_per_class_multiclass_f1`, torchmetrics
    MulticlassF1Score(average="macro"))."""
    num_classes = _num_classes(scores_or_preds, targets, num_classes)
    preds = multiclass_predictions(scores_or_preds)
    tp, fp, fn = _multiclass_counts(preds, to_numpy(targets).astype(np.int64).reshape(-1), num_classes)
    return f1_from_counts(tp, fp, fn, absent)[1]


def _multilabel_counts(preds: np.ndarray, targets: np.ndarray):
    targets = (np.asarray(targets) > 0).astype(np.int64)
    if preds.shape != targets.shape:
        raise ValueError(f"multilabel predictions {preds.shape} and targets {targets.shape} differ in shape")
    tp = (preds * targets).sum(0)
    return tp, (preds * (1 - targets)).sum(0), ((1 - preds) * targets).sum(0)


def mean_per_class_multilabel_f1(scores, targets, threshold: float = 0.5, logits: bool = False,
                                 absent: str = "zero") -> float:
    """Macro F1 over labels of `score > threshold` (reference `mean_per_class_multilabel_f1`, torchmetrics
    MultilabelF1Score(average="macro"), threshold 0.5)."""
    preds = multilabel_predictions(scores, threshold, logits)
    tp, fp, fn = _multilabel_counts(preds, to_numpy(targets))
    return f1_from_counts(tp, fp, fn, absent)[1]


def accuracy(scores_or_preds, targets) -> float:
    """Top-1 accuracy (reference `mean_accuracy`: MulticlassAccuracy(average="micro"))."""
    preds = multiclass_predictions(scores_or_preds)
    t = to_numpy(targets).astype(np.int64).reshape(-1)
    if preds.shape != t.shape:
        raise ValueError(f"predictions {preds.shape} and targets {t.shape} differ in shape")
    return float((preds == t).mean()) if t.size else 0.0


def compute_metric(metric_type, scores, targets, num_classes: Optional[int] = None, *, logits: bool = False,
                   threshold: float = 0.5, absent: str = "zero") -> float:
    """One reference metric on scores [N, C] (kNN vote mass, or logits with logits=True) -> fraction."""
    m = parse_metric_type(metric_type)
    if m is MetricType.MEAN_PER_CLASS_MULTILABEL_F1:
        return mean_per_class_multilabel_f1(scores, targets, threshold, logits, absent)
    if m is MetricType.MEAN_PER_CLASS_MULTICLASS_F1:
        return mean_per_class_multiclass_f1(scores, targets, num_classes, absent)
    return accuracy(scores, targets)


def per_class_report(scores, targets, *, multilabel: bool = False, num_classes: Optional[int] = None,
                     class_names: Optional[Sequence[str]] = None, threshold: float = 0.5,
                     logits: bool = False) -> List[Dict]:
    """One row per class: name, precision, recall, f1, support (number of true samples), predicted."""
    t = to_numpy(targets)
    if multilabel:
        preds = multilabel_predictions(scores, threshold, logits)
        tp, fp, fn = _multilabel_counts(preds, t)
    else:
        num_classes = _num_classes(scores, targets, num_classes)
        preds = multiclass_predictions(scores)
        tp, fp, fn = _multiclass_counts(preds, t.astype(np.int64).reshape(-1), num_classes)
    f1, _ = f1_from_counts(tp, fp, fn, "zero")
    rows = []
    for c in range(len(tp)):
        p_den, r_den = tp[c] + fp[c], tp[c] + fn[c]
        rows.append({
            "class": c if class_names is None else str(class_names[c]),
            "precision": float(tp[c] / p_den) if p_den else 0.0,
            "recall": float(tp[c] / r_den) if r_den else 0.0,
            "f1": float(f1[c]),
            "support": int(r_den),
            "predicted": int(p_den),
        })
    return rows


def format_report(rows: List[Dict]) -> str:
    """Plain-text table of `per_class_report` rows (values x 100)."""
    width = max([len(str(r["class"])) for r in rows] + [5])
    lines = [f"{'class':<{width}}  precision  recall     f1  support  predicted"]
    for r in rows:
        lines.append(f"{str(r['class']):<{width}}  {100 * r['precision']:9.2f}  {100 * r['recall']:6.2f}  "
                     f"{100 * r['f1']:5.2f}  {r['support']:7d}  {r['predicted']:9d}")
    if rows:
        lines.append(f"{'mean':<{width}}  {100 * np.mean([r['precision'] for r in rows]):9.2f}  "
                     f"{100 * np.mean([r['recall'] for r in rows]):6.2f}  {100 * np.mean([r['f1'] for r in rows]):5.2f}")
    return "\n".join(lines)
