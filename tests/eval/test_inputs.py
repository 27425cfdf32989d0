"""What the evaluation commands read (celldino.eval.inputs): single-image inputs, bad paths, the padding warning,
the splits' names and checks shared by eval knn / eval linear. The shared label space is tested with kNN
(test_knn.py), the one-class refusal through the CLI (test_cli.py)."""
import numpy as np
import pytest
import tifffile
import torch

from celldino.eval.inputs import (ImageFileDataset, build_input_dataset, dataset_spec, prepare_eval_datasets,
                                  warn_if_crop_pads)

from eval_helpers import TensorItems, tiny_vit


def test_padding_warning_for_images_smaller_than_the_crop(tmp_path, caplog):
    from celldino.data import build_dataset
    for i in range(2):
        tifffile.imwrite(tmp_path / f"c{i}.tif", np.zeros((1, 50, 70), dtype=np.uint16))
    ds = build_dataset(f"Folder:root={tmp_path}")
    with caplog.at_level("WARNING", logger="celldino"):
        assert warn_if_crop_pads(ds, 384, multiple_of=8)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"({tmp_path / 'c0.tif'}) is 50x70" in msg and "zero-padded" in msg
    assert "--crop-size 0" in msg and "--crop-size 48" in msg and "~42x" in msg  # 384^2 / (50 x 70) = 42.1
    assert not warn_if_crop_pads(ds, 48)  # fits
    assert not warn_if_crop_pads(ds, 0)  # whole images
    assert not warn_if_crop_pads(ds, 384, resize_size=400)  # resized to 400 x 560 first
    assert warn_if_crop_pads(ds, 384, resize_size=300)  # 300 x 420


def test_single_image_inputs_and_bad_paths(tmp_path):
    path = tmp_path / "cell.ome.tif"
    tifffile.imwrite(path, np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8))
    ds = build_input_dataset(str(path))
    assert isinstance(ds, ImageFileDataset) and len(ds) == 1 and ds.image_path(0) == str(path)
    image, target = ds[0]
    assert image.shape == (2, 8, 8) and int(image[1, 0, 0]) == 64 and target == 0
    assert dataset_spec(str(tmp_path)) == f"Folder:root={tmp_path}"
    with pytest.raises(FileNotFoundError, match="no such folder, CSV or image file"):
        dataset_spec(str(tmp_path / "absent.tif"))
    assert dataset_spec("HPAone:split=TRAIN:root=/x") == "HPAone:split=TRAIN:root=/x"


class _Plates(TensorItems):
    """A dataset object with a name and targets, as a user's own dataset class might have."""

    name = "Plates"

    def get_targets(self):
        return np.asarray(self.targets)


def _folder_with_classes(root, classes, size=20):
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(np.full((size, size), 10 * j + 1, dtype=np.uint8)).save(root / c / f"{j}.png")
    return f"Folder:root={root}"


def test_every_split_is_named_by_one_rule_and_only_string_splits_warn(tmp_path, caplog):
    """Given name, else the dataset string, else the object's `name`, else the split key, train included (kNN
    used to call an object train split "train" whatever its name; linear used its name)."""
    images = [torch.zeros(1, 8, 8)] * 4
    p = prepare_eval_datasets({"train": _Plates(images, [0, 1, 0, 1]), "val": TensorItems(images, [1, 0, 1, 0]),
                               "test": None}, names={"val": "V"})
    assert p.names == {"train": "Plates", "val": "V"} and list(p.datasets) == ["train", "val"]
    assert p.train_where == "the train split Plates" and p.class_names is None
    assert prepare_eval_datasets({"train": TensorItems(images, [0, 1, 0, 1]), "val": None}).train_where == \
        "the train split"
    spec = _folder_with_classes(tmp_path / "cells", "ab")
    with caplog.at_level("WARNING", logger="celldino"):
        p = prepare_eval_datasets({"train": spec, "val": spec}, crop_size=64, model=tiny_vit(in_chans=1))
        prepare_eval_datasets({"train": p.datasets["train"], "val": spec}, crop_size=64)  # an object: no warning
    assert p.names == {"train": spec, "val": spec} and p.class_names == ["a", "b"]
    assert p.train_where == f"the train split {spec}"
    (warning,) = [r.getMessage() for r in caplog.records if "smaller than the crop size" in r.getMessage()]
    assert "is 20x20" in warning and "--crop-size 16" in warning  # rounded down to the patch size 8


def test_knn_and_linear_refuse_a_one_class_train_split_with_the_same_words():
    from celldino.eval.knn import evaluate_knn
    from celldino.eval.linear import evaluate_linear

    images, model = [torch.zeros(1, 8, 8)] * 4, tiny_vit(in_chans=1)
    val = TensorItems(images, [0, 1, 0, 1])
    for evaluate in (evaluate_knn, evaluate_linear):
        with pytest.raises(ValueError, match=r"^the train split Plates has a single class \(label 0 for all 4 "):
            evaluate(model, _Plates(images, [0] * 4), val, progress=False)
        with pytest.raises(ValueError, match=r"^the train split T has a single class"):
            evaluate(model, _Plates(images, [0] * 4), val, dataset_names={"train": "T"}, progress=False)


def test_the_label_space_warning_names_the_split_by_its_display_name(tmp_path, caplog):
    """A val split with a class train lacks is named as the splits are everywhere else (here: its dataset
    string), not by its dataset class ("Folder has classes the train split lacks")."""
    train = _folder_with_classes(tmp_path / "train", "ab")
    val = _folder_with_classes(tmp_path / "val", "ac")
    with caplog.at_level("WARNING", logger="celldino"):
        p = prepare_eval_datasets({"train": train, "val": val}, crop_size=16)
        prepare_eval_datasets({"train": train, "val": val}, crop_size=16, names={"val": "V"})
    assert p.class_names == ["a", "b", "c"]
    first, second = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert first.startswith(f"the val split {val} has classes the train split lacks (c)")
    assert second.startswith("the val split V has classes the train split lacks (c)")


def test_splits_that_would_share_a_name_get_their_key(tmp_path):
    """val and test Folder objects are both named "Folder": kNN's "Folder_1 Top 1" of val was overwritten by
    test's, and linear's test_sets dict kept one of two test Folders. Each such split now gets its key."""
    from celldino.eval.inputs import make_eval_dataset
    from celldino.eval.knn import evaluate_knn
    from celldino.eval.linear import evaluate_linear

    folders = {key: make_eval_dataset(_folder_with_classes(tmp_path / key, "ab"), crop_size=16)
               for key in ("train", "val", "test", "test2")}
    assert prepare_eval_datasets({"train": folders["train"], "val": folders["val"], "test": folders["test"]}).names \
        == {"train": "Folder", "val": "Folder_val", "test": "Folder_test"}  # train is not scored: kept
    model = tiny_vit(in_chans=1)
    knn = evaluate_knn(model, folders["train"], folders["val"], test_dataset=folders["test"], nb_knn=(1,),
                       progress=False)
    assert set(knn["results"]) == {"Folder_val_1 Top 1", "Folder_test_1 Top 1"}
    linear = evaluate_linear(model, folders["train"], folders["val"], test_datasets=[folders["test"], folders["test2"]],
                             mode="features", learning_rates=(0.01,), weight_decays=(0.0,), epochs=1,
                             epoch_length=2, n_last_blocks=1, batch_size=4, progress=False)
    assert {"Folder_val_accuracy", "Folder_test0_accuracy", "Folder_test1_accuracy"} <= set(linear)
