"""AnnData round trip, obs construction, UMAP / PCA fallback and the PNG plot."""
import sys

import numpy as np
import pandas as pd

from celldino.eval.export import (build_obs, compute_umap, plot_embedding, read_anndata, write_anndata, write_npy)


def test_anndata_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    meta = pd.DataFrame({"well": ["A1", "A1", "B2", "B2", "C3", "C3"], "plate": ["1", "1", "1", "2", "2", "2"],
                         "note": [None, "x", "y", "z", "w", "v"]})
    labels = np.array([0, 1, 1, 2, 0, 2])
    obs = build_obs(["a.tif", "b.tif", "a.tif", "c.tif", "d.tif", "e.tif"], meta, labels, ["dna", "actin", "spots"])
    assert list(obs.index) == ["a.tif", "b.tif", "a.tif-1", "c.tif", "d.tif", "e.tif"]  # made unique
    assert obs.index.name == "id"  # also when made unique: the .npy sidecar's first column
    assert obs["plate"].tolist() == [1, 1, 1, 2, 2, 2]  # numeric-looking CSV strings become numbers
    umap = rng.normal(size=(6, 2)).astype(np.float32)
    path = tmp_path / "sub" / "emb.h5ad"
    write_anndata(str(path), x, obs, umap=umap, projection="UMAP", info={"checkpoint": "m.pth", "crop": 64})
    back = read_anndata(str(path))
    np.testing.assert_array_equal(back.X, x)
    np.testing.assert_array_equal(back.obsm["X_umap"], umap)
    assert list(back.obs_names) == list(obs.index)
    assert back.obs["label"].tolist() == labels.tolist()
    assert back.obs["label_name"].astype(str).tolist() == ["dna", "actin", "actin", "spots", "dna", "spots"]
    assert back.obs["well"].astype(str).tolist() == meta["well"].tolist()
    assert back.obs["note"].astype(str).tolist()[:2] == ["", "x"]
    assert back.uns["celldino"]["checkpoint"] == "m.pth" and back.uns["celldino"]["projection"] == "UMAP"
    assert not list(tmp_path.glob("sub/*.tmp*"))


def test_multilabel_obs_and_npy_sidecar(tmp_path):
    labels = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    obs = build_obs(["x", "y", "z"], None, labels, ["nucleus", "er", "golgi"])
    assert obs["label"].tolist() == ["0;2", "", "1"]
    assert obs["label_name"].tolist() == ["nucleus;golgi", "", "er"]
    path, sidecar = write_npy(str(tmp_path / "f.npy"), np.ones((3, 4)), obs)
    assert np.load(path).dtype == np.float32 and np.load(path).shape == (3, 4)
    side = pd.read_csv(sidecar, keep_default_na=False)
    assert side["id"].tolist() == ["x", "y", "z"] and side["label_name"].tolist()[0] == "nucleus;golgi"


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_umap_and_plot(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    # two well separated clusters stay separated in 2-D
    x = np.concatenate([rng.normal(0, 0.1, (30, 8)) + 3, rng.normal(0, 0.1, (30, 8)) - 3]).astype(np.float32)
    coords, method = compute_umap(x, metric="euclidean")
    assert method == "UMAP" and coords.shape == (60, 2)
    a, b = coords[:30].mean(0), coords[30:].mean(0)
    spread = max(coords[:30].std(0).max(), coords[30:].std(0).max())
    assert np.linalg.norm(a - b) > 3 * spread
    titles, labels = [], []
    import matplotlib.axes
    orig_title, orig_xlabel = matplotlib.axes.Axes.set_title, matplotlib.axes.Axes.set_xlabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, t, *a, **k: titles.append(t) or orig_title(self, t, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel",
                        lambda self, t, *a, **k: labels.append(t) or orig_xlabel(self, t, *a, **k))
    png = plot_embedding(coords, str(tmp_path / "u.png"), color=["a"] * 30 + ["b"] * 30, color_name="cluster")
    w, h = _png_size(png)
    assert w > 300 and h > 300 and (tmp_path / "u.png").stat().st_size > 10_000
    assert titles[-1] == "UMAP of 60 embeddings, coloured by cluster" and labels[-1] == "UMAP 1"
    plot_embedding(coords, str(tmp_path / "c.png"), color=np.linspace(0, 1, 60), color_name="intensity")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    # without umap-learn: PCA, and the title says so
    monkeypatch.setitem(sys.modules, "umap", None)
    coords2, method2 = compute_umap(x)
    assert method2 == "PCA (umap-learn not installed)" and coords2.shape == (60, 2)
    plot_embedding(coords2, str(tmp_path / "p.png"), projection=method2)
    assert "PCA (umap-learn not installed)" in titles[-1] and labels[-1] == "PCA 1"
    assert compute_umap(x[:3])[1] == "PCA (too few points for UMAP)"
