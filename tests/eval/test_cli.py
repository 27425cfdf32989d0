"""`celldino embed`, `celldino eval knn` and `celldino eval linear` end to end on the bundled sample
(data/sample/stain_task: real 16-bit single-channel cell crops) with a tiny random ViT exported through the hub;
the numbers are checked against an independent recomputation (direct model calls, float64 kNN, scikit-learn F1)."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from celldino.cli import main as celldino
from celldino.data import build_dataset
from celldino.data.transforms import make_classification_eval_cell_transform
from celldino.hub import export_backbone

from eval_helpers import tiny_vit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSV = os.path.join(REPO, "data", "sample", "stain_task", "stain_task.csv")


@pytest.fixture(scope="module")
def subset_csv(tmp_path_factory):
    """15 train and 15 val crops per class of the sample (absolute paths), to keep the tests fast."""
    df = pd.read_csv(CSV)
    df = pd.concat([g.iloc[::7][:15] for _, g in df.groupby(["split", "label"])])
    df["file"] = [os.path.join(os.path.dirname(CSV), f) for f in df["file"]]
    path = tmp_path_factory.mktemp("subset") / "subset.csv"
    df.to_csv(path, index=False)
    return str(path), f"CSV:path={path}:split=train", f"CSV:path={path}:split=val"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_vit(in_chans=1, seed=3, depth=2)
    out = tmp_path_factory.mktemp("ckpt")
    return export_backbone(model, str(out), "tiny")["safetensors"], model


def _direct_features(model, spec, crop=32):
    ds = build_dataset(spec, transform=make_classification_eval_cell_transform(crop_size=crop))
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        return model(x), torch.as_tensor(ds.get_targets())


def test_embed_h5ad_with_umap(tmp_path, checkpoint, subset_csv):
    ckpt, model = checkpoint
    csv_path, _, VAL = subset_csv
    out, png = tmp_path / "val.h5ad", tmp_path / "val.png"
    rc = celldino(["embed", "--checkpoint", ckpt, "--input", VAL, "--output", str(out), "--umap", str(png),
                   "--color", "stain", "--crop-size", "32", "--num-workers", "0", "--batch-size", "64",
                   "--no-progress"])
    assert rc == 0
    import anndata
    adata = anndata.read_h5ad(out)
    expected, labels = _direct_features(model, VAL)
    np.testing.assert_allclose(adata.X, expected.numpy(), atol=1e-5, rtol=1e-5)
    csv = pd.read_csv(csv_path)
    val_rows = csv[csv["split"] == "val"].reset_index(drop=True)
    assert list(adata.obs_names) == [os.path.relpath(f, os.path.dirname(csv_path)) for f in val_rows["file"]]
    assert adata.obs["stain"].astype(str).tolist() == val_rows["stain"].tolist()
    assert adata.obs["source"].astype(str).tolist() == val_rows["source"].tolist()
    assert adata.obs["label"].tolist() == labels.tolist()
    assert adata.obsm["X_umap"].shape == (60, 2)
    assert png.stat().st_size > 10_000


def test_embed_npy_from_a_folder_with_last_blocks(tmp_path, checkpoint):
    ckpt, model = checkpoint
    folder = os.path.join(REPO, "data", "sample", "stain_task", "val")
    out = tmp_path / "emb.npy"
    rc = celldino(["embed", "--checkpoint", ckpt, "--input", folder, "--output", str(out), "--n-last-blocks", "2",
                   "--avgpool", "--num-workers", "0", "--no-progress"])  # no crop: whole 64 x 64 crops
    assert rc == 0
    x = np.load(out)
    side = pd.read_csv(tmp_path / "emb.csv")
    assert x.shape == (400, 3 * 32) and len(side) == 400
    assert side["id"].iloc[0].startswith("actin_cortical/") and set(side["label_name"]) == {
        "actin_cortical", "cyto_punctate", "dna", "spots"}
    ds = build_dataset(f"Folder:root={folder}", transform=make_classification_eval_cell_transform(crop_size=64))
    with torch.no_grad():
        layers = model.get_intermediate_layers(ds[5][0][None], 2, return_class_token=True)
    ref = torch.cat([layers[0][1], layers[1][1], layers[1][0].mean(1)], dim=1)[0]
    np.testing.assert_allclose(x[5], ref.numpy(), atol=1e-5, rtol=1e-5)


def test_embed_bad_inputs(tmp_path, checkpoint, subset_csv, capsys):
    ckpt, _ = checkpoint
    _, _, VAL = subset_csv
    assert celldino(["embed", "--checkpoint", ckpt, "--input", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "x.npy"), "--no-progress"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert celldino(["embed", "--checkpoint", ckpt, "--input", VAL, "--output", str(tmp_path / "x.txt")]) == 2
    assert celldino(["embed", "--checkpoint", ckpt, "--input", VAL, "--output", str(tmp_path / "x.npy"),
                     "--color", "nope", "--no-progress"]) == 2
    assert "'nope' is not in the metadata" in capsys.readouterr().err
    assert celldino(["embed", "--checkpoint", str(tmp_path / "missing.pth"), "--input", VAL, "--output",
                     str(tmp_path / "x.npy")]) == 1
    assert "cannot load --checkpoint" in capsys.readouterr().err
    two_channel = export_backbone(tiny_vit(in_chans=2), str(tmp_path), "two")["safetensors"]
    assert celldino(["embed", "--checkpoint", two_channel, "--input", VAL, "--output", str(tmp_path / "x.npy"),
                     "--crop-size", "32", "--num-workers", "0", "--no-progress"]) == 1
    assert "1 channels but the model expects 2" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_eval_knn_cli_matches_an_independent_computation(tmp_path, checkpoint, subset_csv):
    ckpt, model = checkpoint
    _, TRAIN, VAL = subset_csv
    rc = celldino(["eval", "knn", "--checkpoint", ckpt, "--train-dataset", TRAIN, "--val-dataset", VAL,
                   "--output-dir", str(tmp_path), "--nb-knn", "5", "20", "--crop-size", "32", "--num-workers", "0",
                   "--no-progress"])
    assert rc == 0
    lines = [json.loads(line) for line in (tmp_path / "results_eval_knn.json").read_text().splitlines()]
    got = {k: v for line in lines for k, v in line.items()}
    assert set(got) == {f"{VAL}_5 Top 1", f"{VAL}_20 Top 1"}
    train_f, train_y = _direct_features(model, TRAIN)
    val_f, val_y = _direct_features(model, VAL)
    tr = torch.nn.functional.normalize(train_f.double(), dim=1)
    te = torch.nn.functional.normalize(val_f.double(), dim=1)
    sims = te @ tr.T
    for k in (5, 20):
        top, idx = sims.topk(k, dim=1)
        w = torch.softmax(top / 0.07, dim=1)
        votes = torch.zeros(len(te), 4, dtype=torch.float64).scatter_add_(1, train_y[idx], w)
        expected = 100 * f1_score(val_y.numpy(), votes.argmax(1).numpy(), labels=range(4), average="macro",
                                  zero_division=0)
        assert got[f"{VAL}_{k} Top 1"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("with_test", [False, True])
def test_eval_linear_cli(tmp_path, checkpoint, subset_csv, with_test):
    ckpt, _ = checkpoint
    _, TRAIN, VAL = subset_csv
    args = ["eval", "linear", "--checkpoint", ckpt, "--train-dataset", TRAIN, "--val-dataset", VAL,
            "--output-dir", str(tmp_path), "--mode", "features", "--epochs", "2", "--epoch-length", "10",
            "--learning-rates", "0.01", "0.1", "--weight-decays", "0", "--n-last-blocks", "2", "--avgpool",
            "--crop-size", "32", "--num-workers", "0", "--batch-size", "32", "--no-progress"]
    if with_test:
        args += ["--test-datasets", TRAIN]
    assert celldino(args) == 0
    lines = [json.loads(line) for line in (tmp_path / "results_eval_linear.json").read_text().splitlines()]
    got = {k: v for line in lines for k, v in line.items()}
    assert got["best_classifier"]["name"].startswith("classifier_2_blocks_avgpool_True_lr_0_0")
    assert 0 <= got[f"{VAL}_accuracy"] <= 100
    assert got[f"{VAL}_accuracy"] == pytest.approx(100 * got["best_classifier"]["accuracy"])
    if with_test:
        assert f"{TRAIN}_accuracy" in got and "note" not in got
    else:
        assert "validation set" in got["note"]
