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
from celldino.eval.knn import knn_leave_one_out
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
    # the subset CSV lists absolute paths outside its own folder: the ids are those paths (not '../../...')
    assert list(adata.obs_names) == val_rows["file"].tolist()
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
    # --color label_name on integer labels colours by label (API and CLI): tests/eval/test_embed.py
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


def test_eval_knn_cli_leave_one_out(tmp_path, checkpoint, subset_csv, capsys):
    """--leave-one-out-dataset: the CHAMMI protocol on train + val, keys "<val>_<k> Top 1", no per-class table."""
    ckpt, model = checkpoint
    _, TRAIN, VAL = subset_csv
    n_val = len(build_dataset(VAL))
    meta = tmp_path / "enriched_meta_CP.csv"
    meta.write_text("Plate,Task_four\n" + "".join(f"{'AB'[i % 2]},True\n" for i in range(n_val)))
    assert celldino(["eval", "knn", "--checkpoint", ckpt, "--train-dataset", TRAIN, "--val-dataset", VAL,
                     "--leave-one-out-dataset", str(meta), "--output-dir", str(tmp_path / "out"), "--nb-knn", "5",
                     "--crop-size", "32", "--num-workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "out" / "results_eval_knn.json").read_text().splitlines()]
    train_f, train_y = _direct_features(model, TRAIN)
    val_f, val_y = _direct_features(model, VAL)
    nf = torch.nn.functional.normalize
    expected = knn_leave_one_out(nf(train_f, dim=1), train_y, nf(val_f, dim=1), val_y, ["AB"[i % 2] for i in
                                 range(n_val)], [5], 0.07, score_labels=[4, 5, 6], normalize=False)
    assert lines == [{f"{VAL}_5 Top 1": pytest.approx(100 * expected[5], abs=1e-6)}]
    assert "kNN (leave-one-out macro F1 over labels 4, 5, 6, T=0.07, voting per_k):" in out
    assert "per-class report" not in out


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


# ---- user-flow fixes: each failed before its change ----------------------------------------------------------------

def _first_val_path(csv_path):
    df = pd.read_csv(csv_path)
    return df[df["split"] == "val"]["file"].iloc[0]


def test_a_non_standard_width_pth_loads_with_num_heads(tmp_path, subset_csv, capsys):
    """The hub .pth of a custom-width model does not record num_heads: embed / eval take --num-heads."""
    _, _, VAL = subset_csv
    model = tiny_vit(in_chans=1, seed=5, embed_dim=48, depth=2, num_heads=3)
    pth = export_backbone(model, str(tmp_path), "custom")["pth"]
    out = tmp_path / "e.npy"
    args = ["embed", "--checkpoint", pth, "--input", VAL, "--output", str(out), "--crop-size", "32",
            "--num-workers", "0", "--no-progress"]
    assert celldino(args) == 1
    err = capsys.readouterr().err
    assert "--num-heads N" in err and ".safetensors" in err
    assert celldino(args + ["--num-heads", "3"]) == 0
    expected, _ = _direct_features(model, VAL)
    np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-5, rtol=1e-5)
    from celldino.cli import build_parser
    for cmd in (["eval", "knn"], ["eval", "linear"]):
        parsed = build_parser().parse_args(cmd + ["--checkpoint", pth, "--train-dataset", "a", "--val-dataset", "b",
                                                  "--output-dir", "o", "--num-heads", "3"])
        assert parsed.num_heads == 3


def test_embed_a_single_image_file(tmp_path, checkpoint, subset_csv, capsys):
    ckpt, model = checkpoint
    csv_path, _, _ = subset_csv
    image = _first_val_path(csv_path)
    out = tmp_path / "one.npy"
    assert celldino(["embed", "--checkpoint", ckpt, "--input", image, "--output", str(out), "--crop-size", "32",
                     "--num-workers", "0", "--no-progress"]) == 0
    import tifffile
    x = make_classification_eval_cell_transform(crop_size=32)(torch.from_numpy(tifffile.imread(image)))
    with torch.no_grad():
        expected = model(x[None])
    np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-5, rtol=1e-5)
    side = pd.read_csv(tmp_path / "one.csv")
    assert side["id"].tolist() == [os.path.basename(image)] and "label" not in side.columns  # unlabelled
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert celldino(["embed", "--checkpoint", ckpt, "--input", str(notes), "--output", str(out),
                     "--no-progress"]) == 1
    assert "neither a .csv nor an image" in capsys.readouterr().err


def test_errors_name_the_file_and_the_crop_option(tmp_path, checkpoint, subset_csv, capsys):
    ckpt, _ = checkpoint
    csv_path, _, VAL = subset_csv
    first = _first_val_path(csv_path)
    # 64 x 64 crops resized to 60 x 60: not a multiple of the patch size 8
    assert celldino(["embed", "--checkpoint", ckpt, "--input", VAL, "--output", str(tmp_path / "x.npy"),
                     "--resize-size", "60", "--num-workers", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"CSV item 0 ({first}): image size 60x60 is not a multiple of the model's patch size 8" in err
    assert "--crop-size 56" in err and "--resize-size" in err
    two_channel = export_backbone(tiny_vit(in_chans=2), str(tmp_path), "two")["safetensors"]
    assert celldino(["embed", "--checkpoint", two_channel, "--input", VAL, "--output", str(tmp_path / "x.npy"),
                     "--crop-size", "32", "--num-workers", "0", "--no-progress"]) == 1
    assert f"CSV item 0 ({first}): the image has 1 channels" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_eval_refuses_a_train_split_with_one_class(tmp_path, checkpoint, command, capsys):
    """A folder without class sub-folders labels every image 0: kNN / linear F1 would be a meaningless 100."""
    ckpt, _ = checkpoint
    folder = os.path.join(REPO, "data", "sample", "stain_task", "val", "dna")
    assert celldino(["eval", command, "--checkpoint", ckpt, "--train-dataset", folder, "--val-dataset", folder,
                     "--output-dir", str(tmp_path), "--crop-size", "32", "--num-workers", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    # one wording for both commands (eval knn said "--train-dataset <folder>" before they shared the set-up)
    assert f"celldino eval {command}: the train split {folder} has a single class (label 0 for all 100 images)" \
        in err and "class sub-folders" in err
    assert not (tmp_path / f"results_eval_{command}.json").exists()


def test_linear_cli_warns_about_padding_once_and_says_what_the_numbers_are(tmp_path, checkpoint, subset_csv,
                                                                           capsys, caplog):
    ckpt, _ = checkpoint
    _, TRAIN, VAL = subset_csv
    args = ["eval", "linear", "--checkpoint", ckpt, "--train-dataset", TRAIN, "--val-dataset", VAL,
            "--output-dir", str(tmp_path), "--mode", "features", "--epochs", "1", "--epoch-length", "2",
            "--learning-rates", "0.01", "--weight-decays", "0", "--n-last-blocks", "1",
            "--crop-size", "72", "--num-workers", "0", "--batch-size", "32", "--no-progress"]
    with caplog.at_level("WARNING", logger="celldino"):
        assert celldino(args) == 0
    out = capsys.readouterr().out
    logs = caplog.text
    padding = [r.getMessage() for r in caplog.records if "smaller than the crop size" in r.getMessage()]
    assert len(padding) == 1 and "is 64x64" in padding[0] and "--crop-size 0" in padding[0]
    assert "--crop-size 64" in padding[0]
    assert (out + logs).count("no test dataset") == 1
    assert "best head chosen on val by mean_per_class_multiclass_f1" in out
    assert f"{VAL}_accuracy: " in out and "(mean_per_class_multiclass_f1 x 100)" in out
