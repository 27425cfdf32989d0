"""Embeddings out: AnnData (.h5ad) for scanpy & co, .npy + ids, UMAP coordinates and a PNG plot.

AnnData layout (what single-cell tools expect): X = embeddings [n_cells, dim] float32; obs_names = image ids;
obs = dataset metadata (all CSV columns for CSV inputs) + label columns; obsm["X_umap"] = 2-D coordinates when
computed; uns["celldino"] = how the embeddings were made.

The 2-D projection is UMAP (umap-learn). Only when umap-learn is not importable (or there are fewer than 4
points) a PCA projection is used instead, and the plot title and uns say so.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from celldino.files import atomic_write

logger = logging.getLogger("celldino")

__all__ = [
    "compute_umap",
    "dataset_metadata",
    "build_obs",
    "write_anndata",
    "read_anndata",
    "write_npy",
    "npy_sidecar_path",
    "plot_embedding",
]


# ---- projection ---------------------------------------------------------------------------------------------------

def _pca2(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2), dtype=np.float32)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out.astype(np.float32)


def compute_umap(x, *, n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "cosine",
                 seed: int = 0) -> Tuple[np.ndarray, str]:
    """2-D coordinates of the rows of x and the method used: "UMAP", or a PCA fallback named with its reason."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"UMAP: expected a non-empty [n, dim] matrix, got shape {x.shape}")
    if x.shape[0] < 4:
        return _pca2(x), "PCA (too few points for UMAP)"
    try:
        import umap
    except ImportError:
        logger.warning("umap-learn is not installed: falling back to PCA (pip install umap-learn)")
        return _pca2(x), "PCA (umap-learn not installed)"
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(n_neighbors, x.shape[0] - 1)), min_dist=min_dist,
                        metric=metric, random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float32), "UMAP"


# ---- metadata -------------------------------------------------------------------------------------------------------

def _csv_metadata(dataset):
    """All columns of the dataset's CSV, row-aligned with the dataset's images (matched on the resolved path)."""
    import pandas as pd

    df = pd.read_csv(dataset.csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    paths = [dataset.image_path(i) for i in range(dataset.num_images)]
    root = getattr(dataset, "root", os.path.dirname(dataset.csv_path))
    wanted = set(paths)
    for column in df.columns:
        resolved = [v if os.path.isabs(v) else os.path.join(root, v) for v in df[column].astype(str)]
        resolved = [os.path.abspath(p) for p in resolved]
        if wanted <= set(resolved):
            first = {}
            for row, p in enumerate(resolved):
                first.setdefault(p, row)
            return df.iloc[[first[os.path.abspath(p)] for p in paths]].reset_index(drop=True)
    return None


def dataset_metadata(dataset):
    """pandas DataFrame with one row per item of a celldino dataset (metadata columns; CSV: every column)."""
    import pandas as pd

    n = len(dataset)
    meta = None
    if hasattr(dataset, "csv_path") and hasattr(dataset, "image_path"):
        try:
            meta = _csv_metadata(dataset)
        except Exception as exc:  # metadata is a convenience: never fail the embedding because of it
            logger.warning("could not attach the CSV metadata of %s: %s", dataset.csv_path, exc)
    if meta is None:
        meta = pd.DataFrame(index=range(getattr(dataset, "num_images", n)))
    if hasattr(dataset, "image_path"):
        meta["path"] = [dataset.image_path(i) for i in range(getattr(dataset, "num_images", n))]
    if getattr(dataset, "separate_channels", False) and hasattr(dataset, "locate"):
        # bag-of-channels datasets: item k is channel k // N of image k % N
        rows = [dataset.locate(i) for i in range(n)]
        meta = meta.iloc[[r[0] for r in rows]].reset_index(drop=True)
        meta["channel"] = [r[1] for r in rows]
    return meta.reset_index(drop=True)


def build_obs(ids: Sequence[str], metadata=None, labels=None, class_names: Optional[Sequence[str]] = None, *,
              label_column: str = "label", name_column: str = "label_name"):
    """obs DataFrame: index = ids (made unique; named `id`, or `celldino_id` when the metadata has an `id`
    column), metadata columns, then `label_column` (class index, or the
    multi-hot vector as ';'-joined label indices) and `name_column` when class names are known."""
    import pandas as pd

    # the index is named "id" unless the metadata has its own `id` column: anndata refuses an index name that
    # is also a column (the .h5ad write failed) and the .npy sidecar would get two `id` columns
    own_id = metadata is not None and "id" in map(str, metadata.columns)
    obs = pd.DataFrame(index=pd.Index([str(i) for i in ids], name="celldino_id" if own_id else "id"))
    if metadata is not None and len(metadata):
        if len(metadata) != len(obs):
            raise ValueError(f"metadata has {len(metadata)} rows for {len(obs)} embeddings")
        for column in metadata.columns:
            obs[str(column)] = _h5ad_safe(metadata[column].to_numpy())
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim == 1:
            obs[label_column] = lab.astype(np.int64)
            if class_names is not None and lab.size and lab.max() < len(class_names) and lab.min() >= 0:
                obs[name_column] = pd.Categorical([str(class_names[v]) for v in lab])
        elif lab.ndim == 2:
            obs[label_column] = [";".join(str(j) for j in np.nonzero(row)[0]) for row in lab]
            if class_names is not None and lab.shape[1] == len(class_names):
                obs[name_column] = [";".join(str(class_names[j]) for j in np.nonzero(row)[0]) for row in lab]
    for column in obs.columns:  # repeated strings as categories (what anndata would do, noisily, on write)
        col = obs[column]
        if col.dtype == object and col.map(type).eq(str).all() and col.nunique() < len(col):
            obs[column] = pd.Categorical(col)
    if not obs.index.is_unique:
        obs.index = pd.Index(_make_unique(list(obs.index)), name=obs.index.name)  # keep the id column's name
    return obs


def _make_unique(names):
    seen, out = {}, []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return out


def _h5ad_safe(values: np.ndarray):
    """Numbers stay numbers; anything else becomes strings (h5ad cannot store arbitrary objects)."""
    if values.dtype.kind in "biuf":
        return values
    as_str = np.array(["" if v is None else str(v) for v in values], dtype=object)
    try:  # numeric-looking CSV columns become numbers again
        nums = np.array([float(v) for v in as_str])
        if np.all(np.isfinite(nums)) and len(as_str):
            return nums.astype(np.int64) if np.all(nums == np.round(nums)) else nums
    except ValueError:
        pass
    return as_str


# ---- writers --------------------------------------------------------------------------------------------------------

def write_anndata(path: str, embeddings, obs=None, *, umap: Optional[np.ndarray] = None,
                  projection: str = "UMAP", info: Optional[Dict] = None, labels_matrix=None):
    """Write an .h5ad atomically; returns the AnnData object."""
    import anndata as ad

    x = np.asarray(embeddings, dtype=np.float32)
    adata = ad.AnnData(X=x, obs=obs)
    if umap is not None:
        adata.obsm["X_umap"] = np.asarray(umap, dtype=np.float32)
    if labels_matrix is not None:
        adata.obsm["labels"] = np.asarray(labels_matrix, dtype=np.int8)
    uns = {"projection": projection}
    if info:
        uns.update({k: _json_safe(v) for k, v in info.items()})
    adata.uns["celldino"] = uns
    atomic_write(path, adata.write_h5ad)
    return adata


def _json_safe(v):
    if isinstance(v, (str, int, float, bool, np.integer, np.floating)):
        return v
    return json.dumps(v, default=str)


def read_anndata(path: str):
    import anndata as ad
    return ad.read_h5ad(path)


def npy_sidecar_path(path: str) -> str:
    """Where write_npy puts the ids + metadata of x.npy: x.csv (one definition: embed checks it against inputs)."""
    return os.path.splitext(path)[0] + ".csv"


def write_npy(path: str, embeddings, obs=None) -> Tuple[str, Optional[str]]:
    """embeddings -> path (.npy, float32) and, with obs, a sidecar <stem>.csv of ids + metadata (same order)."""
    x = np.asarray(embeddings, dtype=np.float32)
    atomic_write(path, lambda tmp: np.save(tmp, x))
    sidecar = None
    if obs is not None:
        sidecar = npy_sidecar_path(path)
        atomic_write(sidecar, lambda tmp: obs.to_csv(tmp, index=True, index_label=obs.index.name or "id"))
    return path, sidecar


# ---- plot -----------------------------------------------------------------------------------------------------------

def _is_categorical(values: np.ndarray) -> bool:
    if values.dtype.kind not in "biuf":
        return True
    uniq = np.unique(values[~np.isnan(values)] if values.dtype.kind == "f" else values)
    return values.dtype.kind in "biu" and len(uniq) <= 30


def plot_embedding(coords, path: str, *, color=None, color_name: Optional[str] = None,
                   projection: str = "UMAP", title: Optional[str] = None, point_size: Optional[float] = None):
    """Scatter plot of 2-D coordinates as a PNG (matplotlib Agg), coloured by `color` (categories: legend;
    numbers: colour bar). Axes are labelled "<projection> 1/2"; the title names the projection (and a PCA
    fallback's reason). Written atomically; returns the path."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    coords = np.asarray(coords, dtype=np.float32)
    n = len(coords)
    size = point_size or float(np.clip(4000.0 / max(n, 1), 6.0, 40.0))
    fig, ax = plt.subplots(figsize=(7.5, 6.0), dpi=120)
    short = projection.split(" (")[0]
    if color is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, c="#1f77b4", alpha=0.8, linewidths=0)
    else:
        values = np.asarray(color)
        if len(values) != n:
            raise ValueError(f"color has {len(values)} values for {n} points")
        if _is_categorical(values):
            cats = sorted({str(v) for v in values})
            cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
            strs = np.array([str(v) for v in values])
            for i, cat in enumerate(cats):
                sel = strs == cat
                ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=cmap(i % cmap.N), alpha=0.85,
                           linewidths=0, label=f"{cat} ({int(sel.sum())})")
            ax.legend(title=color_name, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                      title_fontsize=9, markerscale=max(1.0, 6.0 / np.sqrt(size)), frameon=False)
        else:
            sc = ax.scatter(coords[:, 0], coords[:, 1], s=size, c=values.astype(np.float64), cmap="viridis",
                            alpha=0.85, linewidths=0)
            fig.colorbar(sc, ax=ax, label=color_name)
    ax.set_xlabel(f"{short} 1")
    ax.set_ylabel(f"{short} 2")
    ax.set_title(title or f"{projection} of {n} embeddings" + (f", coloured by {color_name}" if color_name else ""),
                 fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path
