"""What the evaluation commands read: the eval transform, CLI inputs (a folder, a .csv, one image file or a
dataset string) as datasets, one label space shared by the train / val / test splits, and the checks that stop a
meaningless evaluation (one class) or warn about a costly one (crops larger than the images)."""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from celldino.data.datasets import ImageDataset

from celldino import dist as _dist

logger = logging.getLogger("celldino")


# ---- transforms and datasets -------------------------------------------------------------------------------------------------

def make_eval_transform(crop_size: int = 384, resize_size: int = 0, augment: bool = False, intensity_scale=None,
                        resize_antialias: bool = False):
    """Reference eval transform (center crop, or random crop + flips with augment=True); crop_size 0 keeps the
    whole image (scale, optional resize, self-normalise)."""
    from torchvision import transforms

    from celldino.data.transforms import (NormalizationType, ResizeKeepingConstantChannels, ScaleIntensity,
                                          SelfNormalizeNoDiv, make_classification_eval_cell_transform)
    if crop_size and crop_size > 0:
        kind = NormalizationType.SELF_NORM_AUG_DECODER if augment else NormalizationType.SELF_NORM_CENTER_CROP
        return make_classification_eval_cell_transform(resize_size=resize_size, crop_size=crop_size,
                                                       normalization_type=kind, intensity_scale=intensity_scale,
                                                       resize_antialias=resize_antialias)
    steps = [ScaleIntensity(intensity_scale)]
    if resize_size and resize_size > 0:
        steps.append(ResizeKeepingConstantChannels(resize_size, interpolation=transforms.InterpolationMode.BICUBIC,
                                                   antialias=resize_antialias))
    if augment:
        steps += [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()]
    steps.append(SelfNormalizeNoDiv())
    return transforms.Compose(steps)


def make_eval_dataset(spec: str, crop_size: int = 384, resize_size: int = 0, augment: bool = False,
                      intensity_scale=None):
    """A dataset from a `Name:key=value` string (or a folder / .csv / image file path) with the eval transform."""
    return build_input_dataset(spec, transform=make_eval_transform(crop_size, resize_size, augment, intensity_scale))


def share_label_space(train, *others, where: Optional[List[str]] = None) -> Optional[List[str]]:
    """Give the evaluation splits one label space: each split with named classes (Folder sub-folders, a CSV's
    string labels) is built alone, so a val split missing a class would otherwise number the rest differently
    from train and be scored against the wrong classes. Re-indexes `others` into train's class order in place
    (classes train lacks are appended, with a warning: no train item can vote for them). `where`: how the
    warning names each of `others` (e.g. "the val split <dataset string>"; default "evaluation split <k>").
    Returns the class names (None when train has none)."""
    names = getattr(train, "classes", None)
    if names is None:
        return None
    names = list(names)
    for k, ds in enumerate(others):
        if ds is None or getattr(ds, "classes", None) is None or not hasattr(ds, "align_classes"):
            continue
        if list(ds.classes[:len(names)]) == names:  # already in this label space (e.g. aligned by the CLI)
            names = list(ds.classes)
            continue
        unseen = [c for c in ds.classes if c not in set(names)]
        if unseen:
            # named as the splits are everywhere else, not by the dataset class ("Folder has classes ...")
            logger.warning("%s has classes the train split lacks (%s): they are scored, but no train item can "
                           "vote for them", where[k] if where else f"evaluation split {k + 1}",
                           ", ".join(map(str, unseen)))
        names = ds.align_classes(names)
    return names


def require_several_classes(targets, where: str = "the train split") -> None:
    """Refuse a classification evaluation whose train labels cannot tell anything apart: one class (a folder
    without class sub-folders or a CSV without a label column gives every image label 0; kNN / linear F1 would
    then be a meaningless 100) or multi-hot labels that are never positive. `targets`: labels, or a dataset with
    get_targets() (anything else is not checked here)."""
    if hasattr(targets, "get_targets"):
        targets = targets.get_targets()
    elif not isinstance(targets, (np.ndarray, torch.Tensor, list, tuple)):
        return
    if isinstance(targets, torch.Tensor):
        targets = targets.cpu().numpy()
    t = np.asarray(targets)
    if t.dtype == object or t.size == 0:
        return
    hint = ("give labels (class sub-folders of a folder: <root>/<class>/<image>, or a label column in a CSV: "
            "label=<column>); a one-class evaluation is meaningless")
    if t.ndim == 1:
        classes = np.unique(t)
        if len(classes) < 2:
            raise ValueError(f"{where} has a single class (label {classes[0].item()!r} for all {len(t)} images): "
                             f"{hint}")
    elif t.ndim == 2 and not t.any():
        raise ValueError(f"{where}: no image has any of its {t.shape[1]} multi-hot labels: {hint}")


def warn_if_crop_pads(dataset, crop_size: int, resize_size: int = 0, what: str = "train",
                      multiple_of: int = 1) -> bool:
    """Warn (once: call it on the first image of the train split) when that image is smaller than the center
    crop, which then zero-pads every such image to crop_size x crop_size: slower by the area ratio, and the padding
    enters the features (e.g. the eval default 384, meant for 512-pixel HPA crops, on 64-pixel cells). The
    suggested crop is the image's shorter side rounded down to `multiple_of` (the patch size). Returns whether it
    warned."""
    if not crop_size or crop_size <= 0 or not hasattr(dataset, "read_array") or len(dataset) == 0:
        return False
    try:
        h, w = (int(v) for v in dataset.read_array(0).shape[-2:])
    except Exception:  # unreadable first image: extraction reports it with its file name
        return False
    if resize_size and resize_size > 0:  # Resize(int) scales the shorter side to resize_size
        scale = resize_size / min(h, w)
        h, w = (resize_size, int(w * scale)) if h <= w else (int(h * scale), resize_size)
    if h >= crop_size and w >= crop_size:
        return False
    path = dataset.image_path(0) if hasattr(dataset, "image_path") else "item 0"
    logger.warning("the first %s image (%s) is %dx%d%s, smaller than the crop size %d: images are center-cropped "
                   "to %dx%d, i.e. zero-padded, which costs ~%.0fx the compute of the image itself and puts the "
                   "padding into the features; pass --crop-size 0 to keep whole images (or the image size, e.g. "
                   "--crop-size %d)", what, path, h, w, " after --resize-size" if resize_size else "", crop_size,
                   crop_size, crop_size, crop_size * crop_size / max(1, h * w),
                   max(multiple_of, min(h, w) // multiple_of * multiple_of))
    return True


# ---- the evaluation splits, built and checked once -------------------------------------------------------------

@dataclass
class EvalDatasets:
    """The splits of one evaluation: datasets by split key ("train" first), their names (result keys such as
    "<name>_10 Top 1", messages) and the class names they share (None when train has none)."""

    datasets: Dict[str, Any]
    names: Dict[str, str]
    class_names: Optional[List[str]]

    def where(self, key: str) -> str:
        """How messages name a split: "the <key> split", plus its name unless that is just the key."""
        name = self.names[key]
        return f"the {key} split" + ("" if name == key else f" {name}")

    @property
    def train_where(self) -> str:
        """How errors name the train split (`where("train")`)."""
        return self.where("train")


def prepare_eval_datasets(splits: Dict[str, Any], *, crop_size: int = 384, resize_size: int = 0,
                          names: Optional[Dict[str, str]] = None, model=None, group=None) -> EvalDatasets:
    """The set-up shared by eval knn and eval linear (API and CLI), so they cannot drift apart. `splits`: {key:
    dataset object, or string built with the center-crop eval transform}, "train" first; None entries are left
    out. Each split is named by `names[key]`, else its string, else the dataset's `name`, else its key (one rule
    for every split); evaluated splits (not train) that would share a name get `_<key>` appended. The splits get train's label space, a one-class train split is refused before any feature
    is extracted, and on the main rank one warning says when string-built train images are smaller than the
    crop (`model` gives the patch size the suggested crop is rounded to)."""
    names = dict(names or {})
    built = {}
    for key, ds in splits.items():
        if ds is None:
            continue
        if isinstance(ds, str):
            names.setdefault(key, ds)
            ds = make_eval_dataset(ds, crop_size=crop_size, resize_size=resize_size)
        names.setdefault(key, getattr(ds, "name", key))
        built[key] = ds
    # the scored splits' names are result keys ("<name>_10 Top 1", "<name>_accuracy"): two of one name (val and
    # test Folder objects, both "Folder") would overwrite each other, so each such split gets its key appended
    scored = Counter(names[key] for key in built if key != "train")
    for key in built:
        if key != "train" and scored[names[key]] > 1:
            names[key] = f"{names[key]}_{key}"
    train = built["train"]
    prepared = EvalDatasets(built, names, None)
    others = [key for key in built if key != "train"]
    prepared.class_names = share_label_space(train, *(built[key] for key in others),
                                             where=[prepared.where(key) for key in others])
    require_several_classes(train, prepared.train_where)
    # a dataset object brings its own transform: the crop options say nothing about it
    if isinstance(splits["train"], str) and _dist.is_main_process(group):
        warn_if_crop_pads(train, crop_size, resize_size, multiple_of=_patch_multiple(model))
    return prepared


def _patch_multiple(model) -> int:
    from .features import patch_size_of  # features imports this module: import at call time

    return (patch_size_of(model) or (1,))[0] if model is not None else 1


def is_image_path(path: str) -> bool:
    """An existing single image: a file with an image extension, or an OME-Zarr store (a *.zarr directory)."""
    from celldino.data.io import IMAGE_EXTS, ZARR_EXTS

    path = os.path.expanduser(str(path))
    low = path.rstrip(os.sep).lower()
    if os.path.isdir(path):
        return low.endswith(ZARR_EXTS)
    return os.path.isfile(path) and low.endswith(tuple(e for e in IMAGE_EXTS if e not in ZARR_EXTS))


def dataset_spec(value: str) -> str:
    """A folder -> 'Folder:root=...', a .csv file -> 'CSV:path=...', a single image file (or .zarr store) -> its
    absolute path (`build_input_dataset` reads it as a one-item dataset), anything else is a dataset string."""
    from celldino.data.io import IMAGE_EXTS

    s = str(value)
    path = os.path.expanduser(s)
    if is_image_path(path):
        return os.path.abspath(path)
    if os.path.isdir(path):
        return f"Folder:root={os.path.abspath(path)}"
    if s.lower().endswith(".csv") and os.path.isfile(path):
        return f"CSV:path={os.path.abspath(path)}"
    if os.path.isfile(path):
        raise FileNotFoundError(f"input {s!r} is a file but neither a .csv nor an image (extensions: "
                                f"{', '.join(IMAGE_EXTS)})")
    if ":" not in s and (os.sep in s or "." in os.path.basename(s)):
        raise FileNotFoundError(f"input {s!r}: no such folder, CSV or image file")
    return s


class ImageFileDataset(ImageDataset):
    """One image file (or OME-Zarr store) as an unlabelled one-item dataset: `celldino embed --input cell.tif`."""

    name = "Image"

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        self.root = os.path.dirname(os.path.abspath(path))
        self.classes = None
        self._paths, self._targets = [os.path.abspath(path)], [0]
        self._finalize(path)


def build_input_dataset(value: str, transform=None):
    """The dataset of a CLI input: a folder, a .csv, a single image file or a dataset string (`dataset_spec`)."""
    from celldino.data import build_dataset

    spec = dataset_spec(value)
    if is_image_path(spec):
        return ImageFileDataset(spec, transform=transform)
    return build_dataset(spec, transform=transform)
