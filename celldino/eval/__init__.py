"""celldino evaluation: features, kNN, linear probes, metrics, AnnData / UMAP export (docs/eval.md).

    from celldino.eval.knn import knn_scores, evaluate_knn
    from celldino.eval.linear import evaluate_linear
    from celldino.eval.features import extract_features

Submodules are imported lazily (`celldino.eval.knn` does not pull in matplotlib, anndata or the models).
"""
import importlib

__all__ = ["knn_scores", "evaluate_knn", "evaluate_linear", "extract_features", "write_anndata", "plot_embedding"]

_LAZY = {
    "knn_scores": "celldino.eval.knn",
    "evaluate_knn": "celldino.eval.knn",
    "evaluate_linear": "celldino.eval.linear",
    "extract_features": "celldino.eval.features",
    "write_anndata": "celldino.eval.export",
    "plot_embedding": "celldino.eval.export",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'celldino.eval' has no attribute {name!r}")
