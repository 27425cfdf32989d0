"""Datasets on small synthetic trees that mimic the reference layouts (real CSV column names), the generic
Folder / CSV datasets, dataset strings and the bad-input policy."""

import csv
import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from celldino.data import build_dataset
from celldino.data.datasets import DatasetError, parse_dataset_str
from celldino.data.datasets.hpa import (
    HPAFOV_CELL_TYPE,
    HPAFOV_PROTEIN_LOCALIZATION,
    HPAONE_CELL_TYPE,
    HPAONE_PROTEIN_LOCALIZATION,
)
from celldino.data.io import ImageReadError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "data", "sample")


def _write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _strip_png(path, tiles, h=6, seed=0):
    """2-D uint8 strip of `tiles` square tiles; tile c is filled with c*10 + noise so channels are identifiable."""
    rng = np.random.default_rng(seed)
    strip = np.concatenate([np.full((h, h), 10 * c, np.uint8) + rng.integers(0, 5, (h, h), dtype=np.uint8)
                            for c in range(tiles)], axis=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(strip).save(path)
    return strip


# ---------------------------------------------------------------------------------------------------- HPAone


def _hpaone_tree(root):
    varied = os.path.join(root, "varied_size_masked_single_cells_HPA")
    strips = {}
    for k in range(3):
        rel = f"plate{k}/cell_{k}.png"
        strips[rel] = _strip_png(os.path.join(varied, rel), 4, h=5 + k, seed=k)
    _write_csv(os.path.join(root, "varied_size_masked_single_cells_pretrain_20240507.csv"), ["img_path", "ID"],
               [{"img_path": rel, "ID": i} for i, rel in enumerate(strips)])
    fixed = os.path.join(root, "fixed_size_masked_single_cells_HPA")
    header = ["file", "ID"] + HPAONE_PROTEIN_LOCALIZATION + HPAONE_CELL_TYPE
    rows = []
    for k in range(4):
        _strip_png(os.path.join(fixed, f"f{k}.png"), 4, seed=10 + k)
        r = {c: "False" for c in header}
        r.update(file=f"/some/where/else/f{k}.png", ID=k)
        r[HPAONE_PROTEIN_LOCALIZATION[k]] = "True"
        r[HPAONE_PROTEIN_LOCALIZATION[18]] = "True" if k == 1 else "False"
        if k == 2:  # two cell types marked: the last one wins
            r["A549"] = r["HeLa"] = "True"
        elif k == 3:  # none marked: 0
            pass
        else:
            r[HPAONE_CELL_TYPE[5 + k]] = "True"
        rows.append(r)
    _write_csv(os.path.join(root, "fixed_size_masked_single_cells_pretrain_20240507.csv"), header, rows)
    _write_csv(os.path.join(root, "fixed_size_masked_single_cells_evaluation_20240507.csv"), header, rows[:2])
    return strips


def test_hpaone_all_split_strips_and_zero_targets(tmp_path):
    strips = _hpaone_tree(str(tmp_path))
    ds = build_dataset(f"HPAone:split=ALL:root={tmp_path}")
    assert len(ds) == 3 and ds.get_targets().tolist() == [0, 0, 0]
    for i, strip in enumerate(strips.values()):
        img, target = ds[i]
        h = strip.shape[0]
        assert img.dtype == torch.uint8 and img.shape == (4, h, h) and target == 0
        for c in range(4):
            np.testing.assert_array_equal(img[c].numpy(), strip[:, c * h : (c + 1) * h])


def test_hpaone_labels_and_modes(tmp_path):
    _hpaone_tree(str(tmp_path))
    prot = build_dataset(f"HPAone:split=TRAIN:mode=PROTEIN_LOCALIZATION:root={tmp_path}")
    assert len(prot) == 4 and prot.num_labels == 19
    t = prot.get_targets()
    assert t.shape == (4, 19) and t.dtype == np.int64
    expected = np.zeros((4, 19), np.int64)
    expected[np.arange(4), np.arange(4)] = 1
    expected[1, 18] = 1
    np.testing.assert_array_equal(t, expected)
    assert prot.image_path(0).endswith(os.path.join("fixed_size_masked_single_cells_HPA", "f0.png"))

    cell = build_dataset(f"HPAone:split=TRAIN:mode=CELL_TYPE:root={tmp_path}")
    assert cell.num_labels == 29  # reference bug: always 19
    assert cell.get_targets().tolist() == [5, 6, HPAONE_CELL_TYPE.index("HeLa"), 0]

    both = build_dataset(f"HPAone:split=VAL:root={tmp_path}")
    assert len(both) == 2
    assert build_dataset(f"HPAone:split=VAL:mode=all:root={tmp_path}").get_target(1)[1] == 6
    p, ct = both.get_target(1)  # FIX: per-sample (protein, cell type)
    np.testing.assert_array_equal(p, expected[1])
    assert ct == 6
    img, _ = both[1]
    assert img.shape == (4, 6, 6)


def test_hpaone_errors(tmp_path):
    _hpaone_tree(str(tmp_path))
    with pytest.raises(DatasetError, match="split='TEST'"):
        build_dataset(f"HPAone:split=TEST:root={tmp_path}")
    with pytest.raises(DatasetError, match="mode='protein_localisation'.*PROTEIN_LOCALIZATION"):
        build_dataset(f"HPAone:split=TRAIN:mode=protein_localisation:root={tmp_path}")
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(f"HPAone:root={tmp_path}/nowhere")
    os.remove(os.path.join(tmp_path, "fixed_size_masked_single_cells_evaluation_20240507.csv"))
    with pytest.raises(DatasetError, match="evaluation_20240507.csv"):
        build_dataset(f"HPAone:split=VAL:root={tmp_path}")


# ---------------------------------------------------------------------------------------------------- HPAFoV


def _hpafov_tree(root):
    data = os.path.join(root, "512_whole_images")
    os.makedirs(data)
    header = ["file", "cell_type", "ID"] + HPAFOV_PROTEIN_LOCALIZATION
    rows, images = [], {}
    for k in range(5):
        img = np.random.default_rng(k).integers(0, 255, (8, 8, 4), dtype=np.uint8)
        img[..., 1] = 100 + k  # channel 1 identifiable
        name = f"img{k}.png"
        if k == 3:  # stored as .tiff only: the reference's fallback
            tifffile.imwrite(os.path.join(data, f"img{k}.tiff"), np.moveaxis(img, -1, 0), photometric="minisblack",
                             metadata={"axes": "CYX"})
        else:
            Image.fromarray(img, mode="RGBA").save(os.path.join(data, name))
        images[k] = np.moveaxis(img, -1, 0)
        r = {c: "False" for c in header}
        r.update(file=f"a/b/{name}", cell_type=HPAFOV_CELL_TYPE[k] if k != 4 else "Unknown-line", ID=k)
        if k != 2:  # row 2 has no positive protein label: dropped unless mode is CELL_TYPE
            r[HPAFOV_PROTEIN_LOCALIZATION[k]] = "True"
        rows.append(r)
    _write_csv(os.path.join(root, "whole_images_512_train.csv"), header, rows)
    _write_csv(os.path.join(root, "whole_images_512_test.csv"), header, rows[:2])
    norm = os.path.join(root, "normalized_data")
    os.makedirs(norm)
    for k in range(3):
        Image.fromarray(np.full((8, 8, 4), k, np.uint8), mode="RGBA").save(os.path.join(norm, f"id{k}.png"))
    _write_csv(os.path.join(root, "whole_images_names.csv"), ["ID"], [{"ID": f"id{k}"} for k in range(3)])
    return images


def test_hpafov_train_modes_drop_and_fallback(tmp_path):
    images = _hpafov_tree(str(tmp_path))
    ds = build_dataset(f"HPAFoV:split=TRAIN:root={tmp_path}")  # mode ALL
    assert len(ds) == 4  # row 2 dropped
    kept = [0, 1, 3, 4]
    for i, k in enumerate(kept):
        img, target = ds[i]
        assert img.shape == (4, 8, 8) and img.dtype == torch.uint8
        np.testing.assert_array_equal(img.numpy(), images[k])
        assert target["prot_loc"].shape == (28,) and target["prot_loc"][k] == 1 and target["prot_loc"].sum() == 1
        assert target["cell_type"] == (k if k != 4 else -1)
    assert ds.image_path(2).endswith("img3.tiff")
    cell = build_dataset(f"HPAFoV:split=TRAIN:mode=CELL_TYPE:root={tmp_path}")
    assert len(cell) == 5 and cell.get_targets().tolist() == [0, 1, 2, 3, -1] and cell.num_labels == 35
    prot = build_dataset(f"HPAFoV:split=VAL:mode=PROTEIN_LOCALIZATION:root={tmp_path}")
    assert len(prot) == 2 and prot.num_labels == 28 and prot.get_targets().shape == (2, 28)


def test_hpafov_ssl_split(tmp_path):
    _hpafov_tree(str(tmp_path))
    ds = build_dataset(f"HPAFoV:split=SSL:root={tmp_path}")
    assert len(ds) == 3 and ds.get_targets().tolist() == [0, 1, 2]
    assert ds[2][0].shape == (4, 8, 8) and int(ds[2][0].max()) == 2


def test_hpafov_separate_channels_fixed(tmp_path):
    images = _hpafov_tree(str(tmp_path))
    ds = build_dataset(f"HPAFoV:split=TRAIN:mode=CELL_TYPE:wildcard=SEPARATE_CHANNELS:root={tmp_path}")
    n = 5
    assert len(ds) == 4 * n  # FIX: the reference's length is not multiplied
    for idx in range(len(ds)):
        img, target = ds[idx]
        k, c = idx % n, idx // n  # every item one *real* channel (the reference always gave channel 1)
        assert img.shape == (1, 8, 8)
        np.testing.assert_array_equal(img[0].numpy(), images[k][c])
        assert target == [0, 1, 2, 3, -1][k]
    assert ds.get_targets().shape == (20,)


def test_hpafov_missing_image_error_and_skip(tmp_path):
    _hpafov_tree(str(tmp_path))
    os.remove(os.path.join(tmp_path, "512_whole_images", "img1.png"))
    with pytest.raises(DatasetError,
                       match=r"HPAFoV: .*whole_images_512_train.csv row 3: file not found: .*img1.png \(nor .*img1.tiff\)"):
        build_dataset(f"HPAFoV:split=TRAIN:root={tmp_path}")
    ds = build_dataset(f"HPAFoV:split=TRAIN:on_error=skip:root={tmp_path}")
    assert len(ds) == 3 and ds.skipped.value == 1


# ---------------------------------------------------------------------------------------------------- CHAMMI


def _chammi_tree(root):
    rows = []
    spec = {
        "CP": (5, [("Train", "DMSO"), ("Task_one", "BRD-A29260609"), ("Task_four", "BRD-K77947974"),
                   ("Task_two", "BRD-K21680192")]),
        "HPA": (4, [("Train", "microtubules"), ("Task_three", "nucleoplasm"), ("Train", "golgi apparatus")]),
        "Allen": (3, [("Train", "M3"), ("Task_two", "M6M7_single")]),
    }
    for subset, (tiles, entries) in spec.items():
        for k, (split, label) in enumerate(entries):
            if subset == "Allen":
                rel = f"Allen/img{k}.ome.tiff"
                x = np.concatenate([np.full((10, 7), 100 * c + k, np.uint16) for c in range(tiles)], axis=1)
                os.makedirs(os.path.join(root, "Allen"), exist_ok=True)
                tifffile.imwrite(os.path.join(root, rel), x)
            else:
                rel = f"{subset}/plate/img{k}.png"
                _strip_png(os.path.join(root, rel), tiles, h=8, seed=k)
            rows.append({"file_path": rel, "train_test_split": split, "label": label, "chunk": subset})
    _write_csv(os.path.join(root, "morphem70k_v2.csv"), ["file_path", "train_test_split", "label", "chunk"], rows)


def test_chammi_subsets_splits_labels(tmp_path):
    _chammi_tree(str(tmp_path))
    cp = build_dataset(f"CHAMMI_CP:split=TRAIN:root={tmp_path}")
    assert len(cp) == 1 and cp.get_targets().tolist() == [3] and cp[0][0].shape == (5, 8, 8)
    assert cp.num_additional_labels_loo_eval == 3
    cp4 = build_dataset(f"CHAMMI_CP:split=TASK_FOUR:root={tmp_path}")
    assert cp4.get_targets().tolist() == [6]
    hpa = build_dataset(f"CHAMMI_HPA:split=TRAIN:root={tmp_path}")
    assert hpa.get_targets().tolist() == [1, 0] and hpa[0][0].shape == (4, 8, 8)
    assert build_dataset(f"CHAMMI_HPA:split=task_three:root={tmp_path}").get_targets().tolist() == [6]
    wtc = build_dataset(f"CHAMMI_WTC:split=TASK_TWO:root={tmp_path}")
    img, target = wtc[0]
    assert target == 5 and img.shape == (3, 10, 7) and img.dtype == torch.uint16
    assert [int(img[c, 0, 0]) for c in range(3)] == [1, 101, 201]
    with pytest.raises(DatasetError, match="TASK_THREE"):
        build_dataset(f"CHAMMI_WTC:split=TASK_THREE:root={tmp_path}")
    with pytest.raises(DatasetError, match="no CP rows"):
        build_dataset(f"CHAMMI_CP:split=TASK_THREE:root={tmp_path}")


# ------------------------------------------------------------------------------------------- Folder and CSV


def _folder_tree(root):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("beta", "alpha"):
        for k in range(2):
            x = rng.integers(0, 65535, (3, 6, 7), dtype=np.uint16)
            p = os.path.join(root, cls, "sub" if k else "", f"{cls}{k}.tif")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tifffile.imwrite(p, x, photometric="minisblack", metadata={"axes": "CYX", "channel_names": ["A", "B", "C"]})
            arrays[p] = x
    with open(os.path.join(root, "alpha", "notes.txt"), "w") as f:
        f.write("not an image")
    return arrays


def test_folder_labels_recursive_sorted(tmp_path):
    arrays = _folder_tree(str(tmp_path))
    ds = build_dataset(f"Folder:root={tmp_path}")
    assert ds.classes == ["alpha", "beta"] and len(ds) == 4
    assert ds.get_targets().tolist() == [0, 0, 1, 1]
    for i in range(4):
        img, _ = ds[i]
        np.testing.assert_array_equal(img.numpy(), arrays[ds.image_path(i)])
        assert img.dtype == torch.uint16
    nolab = build_dataset(f"Folder:root={tmp_path}:labels=false:channels=C,A")
    assert nolab.get_targets().tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(nolab[0][0].numpy(), arrays[nolab.image_path(0)][[2, 0]])
    flat = build_dataset(f"Folder:root={tmp_path}/alpha:recursive=false")
    assert len(flat) == 1 and flat.classes is None


def test_folder_extensions_zarr_and_bag_of_channels(tmp_path):
    import zarr

    _folder_tree(str(tmp_path))
    np.save(tmp_path / "alpha" / "extra.npy", np.zeros((3, 6, 7), np.float32))
    g = zarr.open_group(str(tmp_path / "beta" / "z.ome.zarr"), mode="w", zarr_format=2)
    g.create_array("0", shape=(3, 6, 7), dtype=np.uint16)[...] = 7
    g.attrs.update({"multiscales": [{"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}]}]})
    assert len(build_dataset(f"Folder:root={tmp_path}")) == 6
    only_npy = build_dataset(f"Folder:root={tmp_path}:extensions=npy:labels=false")
    assert len(only_npy) == 1 and only_npy[0][0].dtype == torch.float32
    zs = build_dataset(f"Folder:root={tmp_path}/beta:extensions=.zarr")
    assert len(zs) == 1 and int(zs[0][0].sum()) == 7 * 3 * 6 * 7
    boc = build_dataset(f"Folder:root={tmp_path}:extensions=tif:wildcard=SEPARATE_CHANNELS")
    assert len(boc) == 12
    base = build_dataset(f"Folder:root={tmp_path}:extensions=tif")
    for idx in range(12):
        np.testing.assert_array_equal(boc[idx][0].numpy(), base[idx % 4][0].numpy()[idx // 4][None])
        assert boc[idx][1] == base[idx % 4][1]


def test_folder_empty_and_missing(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(f"Folder:root={tmp_path}/nope")
    os.makedirs(tmp_path / "empty" / "sub")
    with pytest.raises(DatasetError, match=r"no images found .*empty"):
        build_dataset(f"Folder:root={tmp_path}/empty")
    tifffile.imwrite(tmp_path / "empty" / "loose.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match="loose.tif is not inside a class sub-folder"):
        build_dataset(f"Folder:root={tmp_path}/empty:labels=true")


def _csv_tree(root):
    rng = np.random.default_rng(1)
    rows, arrays = [], []
    for k in range(6):
        x = rng.integers(0, 255, (2, 5, 5), dtype=np.uint8)
        rel = f"imgs/c{k}.tif"
        os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
        tifffile.imwrite(os.path.join(root, rel), x, photometric="minisblack", metadata={"axes": "CYX"})
        arrays.append(x)
        rows.append({"file": rel, "label": ["cat", "dog"][k % 2], "num": k % 3, "split": "train" if k < 4 else "val",
                     "nuclear": "True" if k % 2 else "False", "membrane": "1" if k > 2 else "0",
                     "channel_names": "DNA;Actin" if k != 5 else "Actin;DNA"})
    _write_csv(os.path.join(root, "meta.csv"), list(rows[0]), rows)
    return arrays


def test_csv_labels_split_and_row_channel_names(tmp_path):
    arrays = _csv_tree(str(tmp_path))
    ds = build_dataset(f"CSV:path={tmp_path}/meta.csv")
    assert len(ds) == 6 and ds.classes == ["cat", "dog"] and ds.get_targets().tolist() == [0, 1, 0, 1, 0, 1]
    ints = build_dataset(f"CSV:path={tmp_path}/meta.csv:label=num:split=val")
    assert ints.get_targets().tolist() == [1, 2] and ints.classes is None
    multi = build_dataset(f"CSV:path={tmp_path}/meta.csv:label=nuclear,membrane")
    np.testing.assert_array_equal(multi.get_targets(), [[0, 0], [1, 0], [0, 0], [1, 1], [0, 1], [1, 1]])
    # per-row channel names map a file stored as (Actin, DNA) onto the requested (DNA, Actin) order
    sel = build_dataset(f"CSV:path={tmp_path}/meta.csv:channels=DNA,Actin")
    np.testing.assert_array_equal(sel[0][0].numpy(), arrays[0])
    np.testing.assert_array_equal(sel[5][0].numpy(), arrays[5][[1, 0]])
    with pytest.raises(DatasetError, match="no column 'path_col'"):
        build_dataset(f"CSV:path={tmp_path}/meta.csv:column=path_col")
    with pytest.raises(DatasetError, match="no usable rows for split 'test'"):
        build_dataset(f"CSV:path={tmp_path}/meta.csv:split=test")


def test_csv_missing_rows_error_or_skip(tmp_path):
    _csv_tree(str(tmp_path))
    os.remove(os.path.join(tmp_path, "imgs", "c2.tif"))
    with pytest.raises(DatasetError, match=r"meta.csv row 4: file not found: .*c2.tif"):
        build_dataset(f"CSV:path={tmp_path}/meta.csv")
    ds = build_dataset(f"CSV:path={tmp_path}/meta.csv:on_error=skip")
    assert len(ds) == 5 and ds.skipped.value == 1 and ds.missing_files == 1
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(f"CSV:path={tmp_path}/nothing.csv")
    # a guessed path column that holds ids (cells-smoke's stain_task.csv has `image` = img2d) says what it took
    (tmp_path / "ids.csv").write_text("idx,image,label\n0,img2d,2\n")
    with pytest.raises(DatasetError, match=r"row 2: file not found: .*img2d \(paths read from column 'image', "
                                           r"the first of file, .* pass column=<name>"):
        build_dataset(f"CSV:path={tmp_path}/ids.csv")
    with pytest.raises(DatasetError, match=r"file not found: .*img2d$"):  # no hint for a column the user named
        build_dataset(f"CSV:path={tmp_path}/ids.csv:column=image")


def test_csv_file_problems_name_the_csv_and_its_line(tmp_path, caplog):
    _csv_tree(str(tmp_path))
    meta = tmp_path / "meta.csv"
    # line numbers are the file's, also after split= filtering: c5 (line 7) is the second val row
    os.remove(tmp_path / "imgs" / "c5.tif")
    with pytest.raises(DatasetError, match=r"meta.csv row 7: file not found: .*c5.tif"):
        build_dataset(f"CSV:path={meta}:split=val")
    dup = tmp_path / "dup.csv"
    dup.write_text("file,label,label\nimgs/c0.tif,1,5\n")
    with pytest.raises(DatasetError, match=r"dup.csv repeats the column name\(s\) \['label'\]"):
        build_dataset(f"CSV:path={dup}")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("file,label\nimgs/c0.tif,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin.csv is not UTF-8 text"):
        build_dataset(f"CSV:path={latin}")
    with pytest.raises(DatasetError, match=r"imgs is a directory \(expected a .csv file\)"):
        build_dataset(f"CSV:path={tmp_path / 'imgs'}")
    # a directory named like an image is said to be one (it used to be read as a zarr store)
    os.makedirs(tmp_path / "imgs" / "fake.tif")
    listed = tmp_path / "dir.csv"
    listed.write_text("file\nimgs/c0.tif\nimgs/fake.tif\n")
    ds = build_dataset(f"CSV:path={listed}")
    with pytest.raises(ImageReadError, match=r"fake.tif: is a directory, not an image file"):
        ds[1]
    # an empty label cell is a class of its own: allowed, but said
    blank = tmp_path / "blank.csv"
    blank.write_text("file,label\nimgs/c0.tif,1\nimgs/c1.tif,\n")
    with caplog.at_level("WARNING", logger="celldino"):
        assert build_dataset(f"CSV:path={blank}").classes == ["", "1"]
    assert "1 row(s) with an empty 'label' cell (first: row 3)" in caplog.text


def test_folder_follows_linked_folders_once(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    for folder in (root / "a", elsewhere / "b"):
        os.makedirs(folder)
        tifffile.imwrite(folder / "x.tif", np.zeros((4, 4), np.uint16))
    os.symlink(elsewhere / "b", root / "b")
    os.symlink(root, root / "a" / "loop")  # a link back up must not walk forever
    ds = build_dataset(f"Folder:root={root}")
    assert ds.classes == ["a", "b"] and len(ds) == 2


def test_bad_files_raise_by_default_and_skip_counts(tmp_path):
    _csv_tree(str(tmp_path))
    (tmp_path / "imgs" / "c1.tif").write_text("garbage")
    x = np.ones((2, 5, 5), np.float32)
    x[0, 1, 1] = np.nan
    tifffile.imwrite(tmp_path / "imgs" / "c3.tif", x, photometric="minisblack", metadata={"axes": "CYX"})
    ds = build_dataset(f"CSV:path={tmp_path}/meta.csv")
    with pytest.raises(ImageReadError, match="c1.tif"):
        ds[1]
    with pytest.raises(ImageReadError, match="c3.tif: 1 NaN/inf"):
        ds[3]
    skip = build_dataset(f"CSV:path={tmp_path}/meta.csv:on_error=skip")
    img, target = skip[1]  # replaced by the next readable item
    assert target == skip.get_target(2) and skip.skipped.value == 1
    skip[3]
    assert skip.skipped.value == 2
    skip[1]  # every replaced request counts; the bad file is remembered, not re-read
    assert skip.skipped.value == 3 and skip._unreadable == {1, 3}
    all_bad = build_dataset(f"CSV:path={tmp_path}/meta.csv:on_error=skip:in_chans=7")
    with pytest.raises(DatasetError, match="no readable item left"):
        all_bad[0]
    # the counter is shared with DataLoader worker processes
    counted = build_dataset(f"CSV:path={tmp_path}/meta.csv:on_error=skip")
    loader = torch.utils.data.DataLoader(counted, batch_size=1, num_workers=2, collate_fn=lambda b: b)
    assert len(list(loader)) == 6
    assert counted.skipped.value == 2


def test_wrong_channel_count_and_unknown_channel(tmp_path):
    _csv_tree(str(tmp_path))
    ds = build_dataset(f"CSV:path={tmp_path}/meta.csv:in_chans=4")
    with pytest.raises(ImageReadError, match="expected 4 channels"):
        ds[0]
    bad = build_dataset(f"CSV:path={tmp_path}/meta.csv:channels=Mito")
    with pytest.raises(ImageReadError, match="unknown channel name 'Mito'"):
        bad[0]


def test_image_paths_name_the_file_of_every_item(tmp_path):
    """`image_paths` (what the DALI loader decodes) is the file of every item in item order, for each dataset kind:
    the expected lists are written from the trees' layouts, not from the datasets."""
    root = str(tmp_path)
    arrays = _folder_tree(os.path.join(root, "folder"))
    folder = build_dataset(f"Folder:root={root}/folder")
    assert folder.image_paths == sorted(arrays)  # alpha/alpha0, alpha/sub/alpha1, beta/...
    for i, path in enumerate(folder.image_paths):
        np.testing.assert_array_equal(folder[i][0].numpy(), arrays[path])
    bag = build_dataset(f"Folder:root={root}/folder:wildcard=SEPARATE_CHANNELS")
    assert bag.image_paths == sorted(arrays) * 3 and len(bag.image_paths) == len(bag)
    assert all(bag.image_paths[i] == bag.image_path(i) for i in range(len(bag)))

    _csv_tree(os.path.join(root, "csv"))
    val = build_dataset(f"CSV:path={root}/csv/meta.csv:split=val")
    assert val.image_paths == [os.path.join(root, "csv", "imgs", f"c{k}.tif") for k in (4, 5)]

    _hpaone_tree(os.path.join(root, "hpaone"))
    hpaone = build_dataset(f"HPAone:split=VAL:root={root}/hpaone")
    assert hpaone.image_paths == [os.path.join(root, "hpaone", "fixed_size_masked_single_cells_HPA", f"f{k}.png")
                                  for k in (0, 1)]

    _hpafov_tree(os.path.join(root, "hpafov"))
    fov = build_dataset(f"HPAFoV:split=TRAIN:root={root}/hpafov")  # row 2 dropped, img3 found as .tiff
    data = os.path.join(root, "hpafov", "512_whole_images")
    assert fov.image_paths == [os.path.join(data, name) for name in ("img0.png", "img1.png", "img3.tiff", "img4.png")]

    _chammi_tree(os.path.join(root, "chammi"))
    hpa = build_dataset(f"CHAMMI_HPA:split=TRAIN:root={root}/chammi")
    assert hpa.image_paths == [os.path.join(root, "chammi", "HPA", "plate", f"img{k}.png") for k in (0, 2)]
    paths = hpa.image_paths
    paths.clear()  # a copy: the dataset is unchanged
    assert len(hpa.image_paths) == 2


def test_dataset_string_errors():
    assert parse_dataset_str("CSV:path=/a/b=c.csv:split=x") == ("CSV", {"path": "/a/b=c.csv", "split": "x"})
    with pytest.raises(DatasetError, match="unknown dataset 'ImageNet42'"):
        build_dataset("ImageNet42:root=/x")
    with pytest.raises(DatasetError, match="unknown key 'colour'"):
        build_dataset("Folder:root=/x:colour=red")
    with pytest.raises(DatasetError, match="is not key=value"):
        build_dataset("Folder:root")
    with pytest.raises(DatasetError, match="needs root"):
        build_dataset("Folder:labels=true")
    with pytest.raises(DatasetError, match="on_error='ignore'"):
        build_dataset("Folder:root=/x:on_error=ignore")


# ------------------------------------------------------------------------------------ shared parsing rules


def test_one_yes_no_vocabulary_for_keys_and_label_cells(tmp_path):
    """Folder's labels key, check_files and multi-hot CSV label cells read the same yes / no words
    (labels=on used to be refused by Folder although parse_bool took it for check_files)."""
    from celldino.data.datasets.base import FALSE_WORDS, TRUE_WORDS, parse_bool

    assert all(parse_bool(w) for w in TRUE_WORDS) and not any(parse_bool(w) for w in FALSE_WORDS)
    for folder in ("a", "b"):
        os.makedirs(tmp_path / "tree" / folder)
        tifffile.imwrite(tmp_path / "tree" / folder / "x.tif", np.zeros((4, 4), np.uint8))
    for word, classes in (("on", ["a", "b"]), ("Y", ["a", "b"]), ("off", None), ("f", None), ("auto", ["a", "b"])):
        ds = build_dataset(f"Folder:root={tmp_path}/tree:labels={word}")
        assert ds.classes == classes, word
        assert ds.get_targets().tolist() == ([0, 1] if classes else [0, 0])
    with pytest.raises(DatasetError, match="Folder: labels='maybe': expected auto, true or false"):
        build_dataset(f"Folder:root={tmp_path}/tree:labels=maybe")
    _csv_tree(str(tmp_path))
    cells = tmp_path / "cells.csv"  # every spelling of yes in a label cell is 1, anything else 0
    cells.write_text("file,a,b\n" + "".join(f"imgs/c0.tif,{w},{w.upper()}\n" for w in TRUE_WORDS)
                     + "imgs/c0.tif,no,2\nimgs/c0.tif,,off\n")
    ds = build_dataset(f"CSV:path={cells}:label=a,b")
    assert ds.get_targets().tolist() == [[1, 1]] * len(TRUE_WORDS) + [[0, 0], [0, 0]]
    assert build_dataset(f"CSV:path={cells}:check_files=on").num_images == len(TRUE_WORDS) + 2


def test_choices_ignore_case_and_name_the_key(tmp_path):
    _csv_tree(str(tmp_path))
    ds = build_dataset(f"CSV:path={tmp_path}/meta.csv:layout=CHW:on_error=Skip:wildcard=separate_channels")
    assert ds.layout == "chw" and ds.on_error == "skip" and ds.separate_channels
    from celldino.data.datasets import CSVDataset

    with pytest.raises(DatasetError, match="CSV: layout='rows': expected one of auto, strip, chw, hwc"):
        CSVDataset(f"{tmp_path}/meta.csv", layout="rows")  # checked when built, not at the first read
    with pytest.raises(DatasetError, match="wildcard='all': expected one of NONE, SEPARATE_CHANNELS"):
        build_dataset(f"CSV:path={tmp_path}/meta.csv:wildcard=all")
    _chammi_tree(str(tmp_path / "chammi"))
    assert len(build_dataset(f"CHAMMI_CP:split=task_one:root={tmp_path}/chammi")) == 1
    with pytest.raises(DatasetError, match="CHAMMI_CP: split='task_five': expected one of TRAIN, TASK_ONE"):
        build_dataset(f"CHAMMI_CP:split=task_five:root={tmp_path}/chammi")


def test_reference_csvs_get_the_generic_csv_checks(tmp_path):
    """HPA / CHAMMI metadata CSVs are read by the CSV dataset's reader: non-UTF-8 text, a repeated column and
    a broken file are errors naming the file, and rows are numbered by their line in the file (a quoted cell
    spanning lines used to shift CHAMMI's and HPAFoV's row numbers)."""
    _chammi_tree(str(tmp_path))
    meta = tmp_path / "morphem70k_v2.csv"
    with open(meta, "a", newline="") as f:
        csv.writer(f).writerow(["CP/plate/img0.png", "Train", "no such\nlabel", "CP"])  # lines 11-12
    with pytest.raises(DatasetError, match=r"CHAMMI_CP: .*morphem70k_v2.csv row 12: unknown label 'no such\\nlabel'"):
        build_dataset(f"CHAMMI_CP:split=TRAIN:root={tmp_path}")
    meta.write_bytes("file_path,train_test_split,label\nCP/caf\u00e9.png,Train,DMSO\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"CHAMMI_CP: .*morphem70k_v2.csv is not UTF-8 text"):
        build_dataset(f"CHAMMI_CP:split=TRAIN:root={tmp_path}")
    meta.write_text("file_path,train_test_split,label,label\nCP/a.png,Train,DMSO,DMSO\n")
    with pytest.raises(DatasetError, match=r"repeats the column name\(s\) \['label'\]"):
        build_dataset(f"CHAMMI_CP:split=TRAIN:root={tmp_path}")
    # a repeated column the dataset does not read, and blank names from trailing commas, are fine
    meta.write_text("file_path,train_test_split,label,note,note,,\nCP/a.png,Train,DMSO,x,y,,\n")
    assert len(build_dataset(f"CHAMMI_CP:split=TRAIN:root={tmp_path}")) == 1
    meta.write_text("file_path,train_test_split,label\nCP/a.png,Train," + "x" * 200_000 + "\n")
    with pytest.raises(DatasetError, match=r"morphem70k_v2.csv line 2: not valid CSV \(field larger"):
        build_dataset(f"CHAMMI_CP:split=TRAIN:root={tmp_path}")
    meta.write_text("")
    with pytest.raises(DatasetError, match=r"morphem70k_v2.csv is empty \(no header row\)"):
        build_dataset(f"CHAMMI_CP:split=TRAIN:root={tmp_path}")
    _hpaone_tree(str(tmp_path / "hpa"))
    (tmp_path / "hpa" / "varied_size_masked_single_cells_pretrain_20240507.csv").write_text("ID\n1\n")
    with pytest.raises(DatasetError, match=r"HPAone: .*pretrain_20240507.csv has no column\(s\) \['img_path'\]"):
        build_dataset(f"HPAone:split=ALL:root={tmp_path}/hpa")


def test_hpafov_missing_files_counted_like_csv(tmp_path, caplog):
    _hpafov_tree(str(tmp_path))
    os.remove(os.path.join(tmp_path, "512_whole_images", "img1.png"))
    with caplog.at_level("WARNING", logger="celldino"):
        ds = build_dataset(f"HPAFoV:split=TRAIN:on_error=skip:root={tmp_path}")
    assert ds.missing_files == 1 and ds.skipped.value == 1
    assert "HPAFoV: " in caplog.text and "row 3: file not found: " in caplog.text and "(skipped)" in caplog.text


def test_transforms_applied(tmp_path):
    _csv_tree(str(tmp_path))
    ds = build_dataset(f"CSV:path={tmp_path}/meta.csv", transform=lambda x: x.float() + 1,
                       target_transform=lambda t: ())
    img, target = ds[0]
    assert img.dtype == torch.float32 and target == () and img.min() >= 1


# ------------------------------------------------------------------------------------------- vendored sample


def test_sample_stain_task_csv():
    spec = f"CSV:path={SAMPLE}/stain_task/stain_task.csv"
    full = build_dataset(spec)
    train, val = build_dataset(spec + ":split=train"), build_dataset(spec + ":split=val")
    assert len(full) == len(train) + len(val) == 778
    assert np.bincount(val.get_targets()).tolist() == [100, 100, 100, 100]
    assert np.bincount(train.get_targets()).tolist() == [100, 78, 100, 100]
    img, label = val[0]
    assert img.shape == (1, 64, 64) and img.dtype == torch.uint16 and int(img.to(torch.int32).max()) > 255


def test_sample_cells_multichannel():
    ds = build_dataset(f"CSV:path={SAMPLE}/cells/cells.csv")
    shapes = {(tuple(ds[i][0].shape), ds[i][0].dtype) for i in range(len(ds))}
    assert shapes == {((2, 64, 64), torch.uint16), ((3, 64, 64), torch.uint8)}
    fly = build_dataset(f"Folder:root={SAMPLE}/cells/cellprofiler-examplefly:channels=Rhodamine,DAPI")
    assert len(fly) == 60 and fly[0][0].shape == (2, 64, 64)
