"""What the evaluation commands read (celldino.eval.inputs): single-image inputs, bad paths, the padding warning.
The shared label space is tested with kNN (test_knn.py), the one-class refusal through the CLI (test_cli.py)."""
import numpy as np
import pytest
import tifffile

from celldino.eval.inputs import ImageFileDataset, build_input_dataset, dataset_spec, warn_if_crop_pads


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
