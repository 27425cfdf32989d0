"""`celldino embed` / `embed_dataset` on small CSVs of real PNG files: outputs never replace an input, the user's
own `label` column survives, the colour rule is the same for the API and the CLI, ids of files outside the
dataset root are absolute."""
import logging
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from celldino.cli import main as celldino
from celldino.eval.embed import EmbedError, color_column, embed_dataset
from celldino.eval.features import dataset_ids
from celldino.eval.inputs import build_input_dataset, make_eval_transform
from celldino.hub import export_backbone

from eval_helpers import tiny_vit


def _images(folder, n=6, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"c{i}.png")
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _csv(tmp_path, name="cells.csv", **columns):
    """cells.csv next to img/ (relative paths) with the given extra columns."""
    paths = _images(str(tmp_path / "img"))
    df = pd.DataFrame({"file": [os.path.relpath(p, tmp_path) for p in paths], **columns})
    path = tmp_path / name
    df.to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    model = tiny_vit(in_chans=1, seed=1, depth=2)
    return model, export_backbone(model, str(tmp_path_factory.mktemp("ckpt")), "tiny")["safetensors"]


def _dataset(spec):
    return build_input_dataset(spec, transform=make_eval_transform(crop_size=0))


def _embed_cli(ckpt, *args):
    return celldino(["embed", "--checkpoint", ckpt, *args, "--num-workers", "0", "--no-progress"])


# ---- outputs never replace an input ------------------------------------------------------------------------------

@pytest.mark.parametrize("as_string", [False, True])
def test_the_npy_sidecar_never_overwrites_the_input_csv(tmp_path, model_and_checkpoint, capsys, as_string):
    """The documented `--input cells.csv --output cells.npy` used to write the sidecar cells.csv over the input."""
    _, ckpt = model_and_checkpoint
    csv = _csv(tmp_path, label=[0, 1] * 3)
    before = open(csv, "rb").read()
    given = f"CSV:path={csv}:label=label" if as_string else csv
    assert _embed_cli(ckpt, "--input", given, "--output", str(tmp_path / "cells.npy")) == 2
    err = capsys.readouterr().err
    assert "cells.csv" in err and csv in err and "another --output" in err
    assert open(csv, "rb").read() == before and not (tmp_path / "cells.npy").exists()
    # a distinct name works and leaves the input alone
    assert _embed_cli(ckpt, "--input", given, "--output", str(tmp_path / "cells_emb.npy")) == 0
    assert open(csv, "rb").read() == before
    assert pd.read_csv(tmp_path / "cells_emb.csv").columns.tolist()[:2] == ["id", "file"]


def test_no_output_replaces_an_input_image(tmp_path, model_and_checkpoint):
    model, _ = model_and_checkpoint
    image = _images(str(tmp_path))[0]
    before = open(image, "rb").read()
    with pytest.raises(EmbedError, match=re.escape(f"the UMAP plot {image} would replace the input image {image}")):
        embed_dataset(model, _dataset(image), str(tmp_path / "x.h5ad"), umap_png=image, progress=False)
    assert open(image, "rb").read() == before
    with pytest.raises(EmbedError, match="the same file"):  # the plot would replace the sidecar
        embed_dataset(model, _dataset(image), str(tmp_path / "x.npy"), umap_png=str(tmp_path / "x.csv"),
                      progress=False)

    # the dataset lists the image through a symlinked folder, the plot names it by its real path: the same file
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}_link")
    linked = str(tmp_path.parent / f"{tmp_path.name}_link" / os.path.basename(image))
    with pytest.raises(EmbedError, match=re.escape(f"the UMAP plot {image} would replace the input image")):
        embed_dataset(model, _dataset(linked), str(tmp_path / "y.h5ad"), umap_png=image, progress=False)
    assert open(image, "rb").read() == before


# ---- label columns --------------------------------------------------------------------------------------------------

def test_a_csv_column_named_label_is_kept_when_the_labels_come_from_another(tmp_path, model_and_checkpoint, capsys):
    model, ckpt = model_and_checkpoint
    stains = ["dna", "actin", "dna", "spots", "actin", "dna"]
    csv = _csv(tmp_path, label=["keep", "me", "keep", "me", "keep", "me"], stain=stains)
    spec = f"CSV:path={csv}:label=stain"
    out = embed_dataset(model, _dataset(spec), str(tmp_path / "x.h5ad"), compute_projection=False, progress=False)
    import anndata
    obs = anndata.read_h5ad(tmp_path / "x.h5ad").obs
    assert obs["label"].astype(str).tolist() == ["keep", "me"] * 3  # the user's column, untouched
    assert obs["celldino_label"].tolist() == [1, 0, 1, 2, 0, 1]  # sorted classes: actin, dna, spots
    assert obs["celldino_label_name"].astype(str).tolist() == stains
    assert out["color"] == "celldino_label_name"
    # the colour error lists every column once
    assert _embed_cli(ckpt, "--input", spec, "--output", str(tmp_path / "y.npy"), "--color", "nope") == 2
    listed = capsys.readouterr().err.split("(columns: ")[1].split(")")[0].split(", ")
    assert listed == ["file", "label", "stain", "path", "celldino_label", "celldino_label_name"]
    # labels read from the `label` column itself: it holds the class index, as before
    out = embed_dataset(model, _dataset(f"CSV:path={csv}"), str(tmp_path / "z.npy"), progress=False)
    side = pd.read_csv(out["sidecar"])
    assert side["label"].tolist() == [0, 1] * 3 and side["label_name"].tolist() == ["keep", "me"] * 3
    assert "celldino_label" not in side.columns


def test_label_name_colours_by_label_for_integer_labels_in_api_and_cli(tmp_path, model_and_checkpoint, caplog):
    """docs/eval.md's `embed_dataset(..., color="label_name")` on a CSV of integer labels (like the sample) used
    to raise; the API and the CLI now share one rule: label_name, else label."""
    model, ckpt = model_and_checkpoint
    csv = _csv(tmp_path, label=[0, 1, 2] * 2)
    with caplog.at_level(logging.WARNING, logger="celldino"):
        out = embed_dataset(model, _dataset(csv), str(tmp_path / "x.h5ad"), umap_png=str(tmp_path / "x.png"),
                            color="label_name", progress=False)
    assert out["color"] == "label" and os.path.getsize(tmp_path / "x.png") > 1000
    assert "have no names (integer labels): colouring by 'label'" in caplog.text
    assert _embed_cli(ckpt, "--input", csv, "--output", str(tmp_path / "y.npy"), "--umap",
                      str(tmp_path / "y.png"), "--color", "label_name") == 0
    with pytest.raises(EmbedError, match="'stain' is not in the metadata"):
        embed_dataset(model, _dataset(csv), str(tmp_path / "x.npy"), color="stain", progress=False)


def test_the_default_colour_falls_back_to_the_users_label_name(tmp_path, model_and_checkpoint):
    """A CSV with its own label_name column and no label column: the generated columns (if any) are prefixed, and
    the default colour is still the user's label_name, as --help and docs/eval.md say (it was None)."""
    model, _ = model_and_checkpoint
    csv = _csv(tmp_path, label_name=["a", "b", "c"] * 2)
    out = embed_dataset(model, _dataset(csv), str(tmp_path / "x.npy"), umap_png=str(tmp_path / "x.png"),
                        progress=False)
    assert out["color"] == "label_name" and os.path.getsize(tmp_path / "x.png") > 1000
    assert color_column(None, ["label"], "celldino_label", "celldino_label_name") == "label"
    assert color_column(None, ["label_name", "celldino_label"], "celldino_label", "celldino_label_name") == \
        "celldino_label"  # the generated labels first


def test_a_csv_column_named_id_is_kept(tmp_path, model_and_checkpoint):
    """A CSV with its own `id` column gave the .npy sidecar two `id` columns and made the .h5ad write fail (after
    the extraction: anndata refuses an index name that is also a column): the ids are then `celldino_id`."""
    model, _ = model_and_checkpoint
    csv = _csv(tmp_path, id=[f"cell{i}" for i in range(6)])
    out = embed_dataset(model, _dataset(csv), str(tmp_path / "x.npy"), progress=False)
    side = pd.read_csv(out["sidecar"])
    assert side.columns.tolist() == ["celldino_id", "file", "id", "path"]
    assert side["id"].tolist() == [f"cell{i}" for i in range(6)] and side["celldino_id"][0] == "img/c0.png"
    embed_dataset(model, _dataset(csv), str(tmp_path / "x.h5ad"), compute_projection=False, progress=False)
    import anndata
    adata = anndata.read_h5ad(tmp_path / "x.h5ad")
    assert adata.obs["id"].astype(str).tolist() == side["id"].tolist() and adata.obs_names[0] == "img/c0.png"


# ---- ids ----------------------------------------------------------------------------------------------------

def test_ids_are_relative_under_the_root_and_absolute_outside_it(tmp_path):
    inside = _images(str(tmp_path / "data" / "img"), n=2)
    outside = _images(str(tmp_path / "elsewhere"), n=2, seed=1)
    csv = tmp_path / "data" / "cells.csv"
    pd.DataFrame({"file": ["img/c0.png", inside[1], outside[0], outside[1]]}).to_csv(csv, index=False)
    assert dataset_ids(_dataset(str(csv))) == [os.path.join("img", "c0.png"), os.path.join("img", "c1.png"),
                                              outside[0], outside[1]]


# ---- checkpoint sources -----------------------------------------------------------------------------------------------

def test_a_training_checkpoint_directory_is_read_by_embed(tmp_path):
    """docs/eval.md used to say a `checkpoints/iter_<n>/` directory is refused; embed reads its teacher backbone
    (a torch.distributed.checkpoint laid out as `celldino train` saves it, with its meta.json settings)."""
    import json
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    model = tiny_vit(in_chans=1, seed=4, depth=2)
    ckpt_dir = tmp_path / "out" / "checkpoints" / "iter_00000003"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming ... a single process"
        dcp.save({"train": {"model": {"teacher": {"backbone": model.state_dict()}}}}, checkpoint_id=str(ckpt_dir))
    settings = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2, init_values=1.0,
                    block_chunks=0, source="celldino train")
    (ckpt_dir / "meta.json").write_text(json.dumps({"iteration": 3, "world_size": 1,
                                                    "teacher_backbone": settings}))
    image = _images(str(tmp_path / "img"), n=1)[0]
    assert _embed_cli(str(ckpt_dir), "--input", image, "--output", str(tmp_path / "one.npy")) == 0
    with torch.no_grad():
        expected = model(_dataset(image)[0][0][None])
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), expected.numpy(), atol=1e-5, rtol=1e-5)
