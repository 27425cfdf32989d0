"""CHAMMI benchmark subsets (evaluation only; reference `dinov2/data/datasets/cell_dino/chammi_{cp,hpa,wtc}.py`).

root holds morphem70k_v2.csv (columns file_path, train_test_split, label) and the images under
<root>/<file_path>; the first component of file_path (CP / HPA / Allen) selects the subset. Splits are compared
with the CSV value upper-cased (Train -> TRAIN, Task_one -> TASK_ONE, ...). Images are horizontal strips of
channel tiles: CP 5 channels and HPA 4 channels as PNG (square tiles), WTC 3 channels as TIFF (3 tiles).
"""

from __future__ import annotations

import os

from .base import DatasetError, ImageDataset, parse_choice, read_csv_rows

__all__ = ["CHAMMI_CP", "CHAMMI_HPA", "CHAMMI_WTC", "CHAMMI_METADATA_FILE"]

CHAMMI_METADATA_FILE = "morphem70k_v2.csv"


class _CHAMMI(ImageDataset):
    SUBSET = ""
    CLASS_LABELS: dict = {}
    SPLITS: tuple = ()
    NUM_CHANNELS = 0
    TILES = None  # None: square tiles (width / height)
    num_additional_labels_loo_eval = 0

    def __init__(self, root: str, *, split: str = None, **kwargs):
        kwargs.setdefault("layout", "strip")
        kwargs.setdefault("tiles", self.TILES)
        super().__init__(**kwargs)
        if not root or not os.path.isdir(root):
            raise DatasetError(f"{self.name}: root {root!r} does not exist or is not a directory")
        if split is None:
            raise DatasetError(f"{self.name}: the split key is required ({', '.join(self.SPLITS)})")
        self.root = os.path.abspath(root)
        self.split = parse_choice(split, self.SPLITS, "split", self.name)
        csv_path = os.path.join(self.root, CHAMMI_METADATA_FILE)
        table = read_csv_rows(csv_path, self.name, ["file_path", "train_test_split", "label"])
        for line, r in table.rows:
            if r["file_path"].split("/")[0] != self.SUBSET or r["train_test_split"].upper() != self.split:
                continue
            if r["label"] not in self.CLASS_LABELS:
                raise DatasetError(f"{self.name}: {csv_path} row {line}: unknown label {r['label']!r} "
                                   f"(expected one of {list(self.CLASS_LABELS)})")
            self._paths.append(os.path.join(self.root, r["file_path"]))
            self._targets.append(self.CLASS_LABELS[r["label"]])
        self.classes = list(self.CLASS_LABELS)
        self._finalize(f"no {self.SUBSET} rows with split {self.split} in {csv_path}")

    @property
    def num_labels(self) -> int:
        return len(self.CLASS_LABELS)


class CHAMMI_CP(_CHAMMI):
    """Cell Painting subset: 5 channels; labels 0-3 (4-6 only in TASK_FOUR)."""

    name = "CHAMMI_CP"
    SUBSET = "CP"
    NUM_CHANNELS = 5
    SPLITS = ("TRAIN", "TASK_ONE", "TASK_TWO", "TASK_THREE", "TASK_FOUR")
    CLASS_LABELS = {
        "BRD-A29260609": 0, "BRD-K04185004": 1, "BRD-K21680192": 2, "DMSO": 3,
        "BRD-K11129031": 4, "BRD-K62310379": 5, "BRD-K77947974": 6,
    }
    num_additional_labels_loo_eval = 3


class CHAMMI_HPA(_CHAMMI):
    """HPA subset: 4 channels; labels 0-3 (4-6 only in TASK_THREE)."""

    name = "CHAMMI_HPA"
    SUBSET = "HPA"
    NUM_CHANNELS = 4
    SPLITS = ("TRAIN", "TASK_ONE", "TASK_TWO", "TASK_THREE")
    CLASS_LABELS = {
        "golgi apparatus": 0, "microtubules": 1, "mitochondria": 2, "nuclear speckles": 3,
        "cytosol": 4, "endoplasmic reticulum": 5, "nucleoplasm": 6,
    }
    num_additional_labels_loo_eval = 3


class CHAMMI_WTC(_CHAMMI):
    """Allen WTC-11 subset: 3 channels, TIFF strips of 3 tiles; labels 0-5."""

    name = "CHAMMI_WTC"
    SUBSET = "Allen"
    NUM_CHANNELS = 3
    TILES = 3
    SPLITS = ("TRAIN", "TASK_ONE", "TASK_TWO")
    CLASS_LABELS = {"M0": 0, "M1M2": 1, "M3": 2, "M4M5": 3, "M6M7_complete": 4, "M6M7_single": 5}
