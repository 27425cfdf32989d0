"""Dataset strings `Name:key=value:...` -> datasets (see docs/data.md for every name and key).

    build_dataset("HPAone:split=ALL:root=/data/hpa")
    build_dataset("Folder:root=~/images:channels=DNA,ER,RNA,AGP,Mito")
    build_dataset("CSV:path=data/sample/stain_task/stain_task.csv:split=train")
"""

from __future__ import annotations

from typing import Callable, Optional

from ..io import LAYOUTS
from .base import ON_ERROR, WILDCARDS, DatasetError, ImageDataset, SkipCounter, parse_bool, parse_choice, parse_list
from .chammi import CHAMMI_CP, CHAMMI_HPA, CHAMMI_WTC
from .generic import CSVDataset, FolderDataset
from .hpa import HPAFoV, HPAone

__all__ = [
    "build_dataset",
    "parse_dataset_str",
    "DATASETS",
    "DatasetError",
    "ImageDataset",
    "SkipCounter",
    "FolderDataset",
    "CSVDataset",
    "HPAone",
    "HPAFoV",
    "CHAMMI_CP",
    "CHAMMI_HPA",
    "CHAMMI_WTC",
]


def _int(v, key):
    try:
        return int(v)
    except (TypeError, ValueError):
        raise DatasetError(f"{key}={v!r}: expected an integer") from None


def _one_of(allowed):
    """A key parser accepting one of `allowed` (any case), returning its canonical spelling."""
    return lambda v, key: parse_choice(v, allowed, key)


def _channels(v, key):
    items = parse_list(v)
    if items is None:
        raise DatasetError(f"{key}={v!r}: expected a comma-separated list of channel names or indices")
    return items


_READ_KEYS = {
    "channels": _channels,
    "channel_names": _channels,
    "layout": _one_of(LAYOUTS),
    "tiles": _int,
    "in_chans": _int,
    "on_error": _one_of(ON_ERROR),
}
_wildcard = _one_of(WILDCARDS)
_STR = lambda v, key: str(v)  # noqa: E731

# name -> (class, {key: parser}); a key's parser turns the string value into the constructor argument
DATASETS = {
    "Folder": (FolderDataset, {"root": _STR, "extensions": _STR, "labels": _STR, "recursive": parse_bool,
                               "wildcard": _wildcard, **_READ_KEYS}),
    "CSV": (CSVDataset, {"path": _STR, "root": _STR, "column": _STR, "label": _STR, "split": _STR,
                         "split_column": _STR, "channel_names_column": _STR, "check_files": parse_bool,
                         "wildcard": _wildcard, **_READ_KEYS}),
    "HPAone": (HPAone, {"root": _STR, "split": _STR, "mode": _STR, **_READ_KEYS}),
    "HPAFoV": (HPAFoV, {"root": _STR, "split": _STR, "mode": _STR, "wildcard": _wildcard, **_READ_KEYS}),
    "CHAMMI_CP": (CHAMMI_CP, {"root": _STR, "split": _STR, **_READ_KEYS}),
    "CHAMMI_HPA": (CHAMMI_HPA, {"root": _STR, "split": _STR, **_READ_KEYS}),
    "CHAMMI_WTC": (CHAMMI_WTC, {"root": _STR, "split": _STR, **_READ_KEYS}),
}


def parse_dataset_str(spec: str):
    """'Name:key=value:...' -> (name, {key: raw string value}). Values may contain '=' (split at the first)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"dataset string {spec!r}: expected 'Name:key=value:...'")
    tokens = spec.strip().split(":")
    name, kwargs = tokens[0], {}
    for token in tokens[1:]:
        if not token:
            continue
        if "=" not in token:
            raise DatasetError(f"dataset string {spec!r}: {token!r} is not key=value")
        key, value = token.split("=", 1)
        if key in kwargs:
            raise DatasetError(f"dataset string {spec!r}: key {key!r} given twice")
        kwargs[key] = value
    return name, kwargs


def build_dataset(spec: str, transform: Optional[Callable] = None, target_transform: Optional[Callable] = None):
    """Build the dataset named by `spec` ('Name:key=value:...'). Items are (image, target) with image a
    C x H x W tensor of the exact decoded values (dtype kept), then transform / target_transform."""
    name, raw = parse_dataset_str(spec)
    if name not in DATASETS:
        raise DatasetError(f"dataset string {spec!r}: unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    cls, schema = DATASETS[name]
    kwargs = {}
    for key, value in raw.items():
        if key not in schema:
            raise DatasetError(f"dataset string {spec!r}: unknown key {key!r} for {name} (allowed: {', '.join(schema)})")
        kwargs[key] = schema[key](value, key)
    if name in ("Folder", "CSV") and "wildcard" in kwargs:
        kwargs["separate_channels"] = kwargs.pop("wildcard") == "SEPARATE_CHANNELS"
    positional = "path" if name == "CSV" else "root"
    if positional not in kwargs:
        raise DatasetError(f"dataset string {spec!r}: {name} needs {positional}=...")
    first = kwargs.pop(positional)
    return cls(first, transform=transform, target_transform=target_transform, **kwargs)
