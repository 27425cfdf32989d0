"""Common machinery of every celldino dataset: decoding, channel handling, bag-of-channels, bad-input policy.

An item is (image, target): image a C x H x W torch tensor holding exactly the decoded values with the file's
dtype (uint8, uint16, int16, int32, uint32, float16/32/64: torch has all of them, so nothing is widened or
rescaled), then `transform(image)` and `target_transform(target)` when given.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import multiprocessing.context
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import LAYOUTS, ImageReadError, probe_image, read_image_and_names

logger = logging.getLogger("celldino")

__all__ = ["DatasetError", "ImageDataset", "SkipCounter", "CSVTable", "ON_ERROR", "WILDCARDS", "TRUE_WORDS",
           "FALSE_WORDS", "parse_bool", "parse_choice", "parse_list", "read_csv_rows"]

ON_ERROR = ("raise", "skip")
WILDCARDS = ("NONE", "SEPARATE_CHANNELS")
# The one spelling list of yes / no in dataset keys (check_files=on, labels=no) and CSV label cells (True, 1.0),
# lower-case; "" is no, so that an empty key (check_files=) or cell is false.
TRUE_WORDS = ("1", "1.0", "true", "t", "yes", "y", "on")
FALSE_WORDS = ("0", "0.0", "false", "f", "no", "n", "off", "")
_MAX_CONSECUTIVE_SKIPS = 100


class DatasetError(ValueError):
    """A dataset cannot be built or used: the message names the file / key and what was expected."""


def parse_bool(value, key: str = "value") -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in TRUE_WORDS:
        return True
    if s in FALSE_WORDS:
        return False
    raise DatasetError(f"{key}={value!r}: expected true or false")


def parse_choice(value, allowed: Sequence[str], key: str, owner: Optional[str] = None) -> str:
    """`value` matched against `allowed` ignoring case; returns the allowed spelling (split=train -> TRAIN,
    layout=HWC -> hwc). Anything else is a DatasetError naming the key and the choices."""
    s = str(value).lower()
    for choice in allowed:
        if s == choice.lower():
            return choice
    where = f"{owner}: " if owner else ""
    raise DatasetError(f"{where}{key}={value!r}: expected one of {', '.join(allowed)}")


def parse_list(value) -> Optional[list]:
    """'a,b,c' -> ['a', 'b', 'c']; lists pass through; None / '' -> None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    return items or None


class CSVTable(NamedTuple):
    """A CSV file read by `read_csv_rows`: its header and its rows as (file line, {column: cell})."""

    path: str
    header: List[str]
    rows: List[Tuple[int, Dict[str, str]]]


def read_csv_rows(path: str, owner: str, required: Sequence[str] = ()) -> CSVTable:
    """Every dataset's CSV reader: UTF-8 (a BOM allowed), a header row with distinct names, the `required`
    columns present. Each row keeps the file line it ends on (a quoted cell may span lines) for messages.
    Problems are DatasetErrors naming `owner` and the file."""
    if not os.path.isfile(path):
        what = "is a directory (expected a .csv file)" if os.path.isdir(path) else "does not exist"
        raise DatasetError(f"{owner}: {path} {what}")
    header, rows = _csv_header_and_rows(path, owner)
    if not header:
        raise DatasetError(f"{owner}: {path} is empty (no header row)")
    # csv.DictReader would silently keep the last of the same-named cells: an error for the columns a dataset reads
    # (all of them for the CSV dataset, whose columns the user picks; the named ones for the reference datasets,
    # whose real metadata files may repeat a column they never read). Blank names (trailing commas) never count.
    read = set(required) if required else set(header)
    repeated = sorted({c for c in header if c and c in read and header.count(c) > 1})
    if repeated:
        raise DatasetError(f"{owner}: {path} repeats the column name(s) {repeated}: each column needs its own name")
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{owner}: {path} has no column(s) {missing} (columns are {header})")
    return CSVTable(path, header, rows)


def _csv_header_and_rows(path: str, owner: str):
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{owner}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "save it as UTF-8") from None
    except csv.Error as exc:
        # line_num counts the lines of the records read whole: the broken one starts on the next
        raise DatasetError(f"{owner}: {path} line {reader.line_num + 1}: not valid CSV ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{owner}: {path} cannot be read ({exc})") from None
    return header, rows


class SkipCounter:
    """Number of items skipped because their file was unreadable, shared by the DataLoader workers (a
    multiprocessing Value inherited by fork / spawn), so the trainer can report it from the main process."""

    def __init__(self):
        # a spawn-context Value can be inherited by fork children and pickled into spawn / forkserver ones
        self._value = multiprocessing.get_context("spawn").Value("q", 0)
        self._local = 0

    def increment(self) -> None:
        if self._value is not None:
            with self._value.get_lock():
                self._value.value += 1
        else:
            self._local += 1

    @property
    def value(self) -> int:
        return int(self._value.value) if self._value is not None else self._local

    def __getstate__(self):
        # a shared Value can only travel to a process being started; any other pickling gets a local count
        spawning = multiprocessing.context.get_spawning_popen() is not None
        return {"_value": self._value if spawning else None, "_local": self.value if not spawning else self._local}

    def __int__(self) -> int:
        return self.value


class ImageDataset(Dataset):
    """Base class: subclasses fill `self._paths` (absolute file paths) and `self._targets` (one per path),
    optionally `self._row_channel_names` (per-path names), then call `self._finalize()`.

    read options: channels (selection / order by index or name), channel_names (names of the stored
    channels, when the files carry none), layout ("auto" | "strip" | "chw" | "hwc"), tiles (strip tile count).
    in_chans: required channel count after selection (a clear error otherwise).
    separate_channels: bag-of-channels; item k is channel k // N of image k % N (length C * N), each item one
    real channel [1, H, W]; the target is the image's target.
    on_error: "raise" (default) or "skip": an unreadable / invalid file is logged, counted in `skipped`
    and replaced by the next readable item.
    """

    name = "ImageDataset"

    def __init__(
        self,
        *,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        channels: Optional[Sequence] = None,
        channel_names: Optional[Sequence[str]] = None,
        layout: str = "auto",
        tiles: Optional[int] = None,
        in_chans: Optional[int] = None,
        separate_channels: bool = False,
        on_error: str = "raise",
    ):
        self.transform = transform
        self.target_transform = target_transform
        self.channels = list(channels) if channels is not None else None
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.layout = parse_choice(layout, LAYOUTS, "layout", self.name)
        self.tiles = int(tiles) if tiles is not None else None
        self.in_chans = int(in_chans) if in_chans is not None else None
        self.separate_channels = bool(separate_channels)
        self.on_error = parse_choice(on_error, ON_ERROR, "on_error", self.name)
        self.skipped = SkipCounter()
        self.missing_files = 0  # listed files found missing at construction and skipped (on_error=skip)
        self._unreadable: set = set()  # per process: items known to be unreadable (on_error=skip)
        self._paths: List[str] = []
        self._targets: List[Any] = []
        self._row_channel_names: Optional[List[Optional[List[str]]]] = None
        self._n_channels: Optional[int] = None

    # -- construction -------------------------------------------------------------------------------------

    def _finalize(self, source: str) -> None:
        if len(self._paths) != len(self._targets):
            raise RuntimeError(f"{self.name}: {len(self._paths)} paths but {len(self._targets)} targets")
        if not self._paths:
            raise DatasetError(f"{self.name}: no images found ({source})")
        if self.separate_channels:
            self._n_channels = self._channels_per_image()

    def _missing_file(self, where: str, path: str, also: str = "") -> None:
        """A listed image that does not exist (`where`: the CSV file and row). on_error=skip: counted in
        `skipped` and `missing_files`, logged, and the caller drops the row; else a DatasetError."""
        if self.on_error != "skip":
            raise DatasetError(f"{self.name}: {where}: file not found: {path}{also}")
        self.missing_files += 1
        self.skipped.increment()
        logger.warning("%s: %s: file not found: %s%s (skipped)", self.name, where, path, also)

    def _channels_per_image(self) -> int:
        """Channel count used for bag-of-channels indexing: from the selection, in_chans, or the first file."""
        if self.channels is not None:
            return len(self.channels)
        if self.in_chans is not None:
            return self.in_chans
        try:
            info = probe_image(self._paths[0], layout=self.layout, tiles=self.tiles)
        except ImageReadError as e:
            raise DatasetError(f"{self.name}: cannot determine the channel count for separate channels: {e}") from None
        return info.shape[0]

    # -- access ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        n = len(self._paths)
        return n * self._n_channels if self.separate_channels else n

    @property
    def num_images(self) -> int:
        return len(self._paths)

    def locate(self, index: int):
        """index -> (image index, channel index or None)."""
        n = len(self._paths)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for length {len(self)}")
        if self.separate_channels:
            return index % n, index // n
        return index, None

    def image_path(self, index: int) -> str:
        """The file item `index` reads."""
        return self._paths[self.locate(index)[0]]

    @property
    def image_paths(self) -> List[str]:
        """The file of every item, in item order (`image_paths[i] == image_path(i)`, a new list each access).
        Each item is one file; with separate_channels every file appears once per channel."""
        return list(self._paths) * (self._n_channels if self.separate_channels else 1)

    def read_array(self, index: int) -> np.ndarray:
        """Decoded C x H x W numpy array of item `index` (after channel selection / bag-of-channels)."""
        i, channel = self.locate(index)
        path = self._paths[i]
        names = self.channel_names
        if self._row_channel_names is not None and self._row_channel_names[i] is not None:
            names = self._row_channel_names[i]
        arr, _ = read_image_and_names(
            path, self.channels, channel_names=names, layout=self.layout, tiles=self.tiles
        )
        if self.in_chans is not None and arr.shape[0] != self.in_chans:
            raise ImageReadError(path, f"expected {self.in_chans} channels (in_chans), the image has {arr.shape[0]}")
        if channel is not None:
            if channel >= arr.shape[0]:
                raise ImageReadError(
                    path, f"separate channels: expected at least {channel + 1} channels, the image has {arr.shape[0]}"
                )
            arr = arr[channel : channel + 1]
        return arr

    def align_classes(self, classes: Sequence[str]) -> List[str]:
        """Re-index this dataset's named class labels (`self.classes`, e.g. a Folder's sub-folders or a CSV's
        string label column) into the order of `classes`, another split's label space, so that class index k
        means the same class in both; names only this dataset has are appended. Returns the class list now in
        use (== self.classes). A dataset without class names is left as it is."""
        own = getattr(self, "classes", None)
        if own is None:
            return list(classes)
        known = set(classes)
        merged = list(classes) + [c for c in own if c not in known]
        index = {c: i for i, c in enumerate(merged)}
        remap = [index[c] for c in own]
        self._targets = [remap[t] for t in self._targets]
        self.classes = merged
        return list(merged)

    def get_target(self, index: int) -> Any:
        return self._targets[self.locate(index)[0]]

    def get_targets(self) -> np.ndarray:
        targets = self._targets
        if self.separate_channels:
            targets = list(targets) * self._n_channels
        try:
            return np.array(targets)
        except ValueError:
            return np.array(targets, dtype=object)

    def _load(self, index: int):
        image = torch.from_numpy(self.read_array(index))
        target = self.get_target(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getitem__(self, index: int):
        if self.on_error == "raise":
            return self._load(index)
        # skip: an unreadable item is replaced by the next readable one. `skipped` counts replaced requests
        # (one per fetch of an unreadable item); files found unreadable are remembered by this process and
        # not read (or logged) again.
        n = len(self)
        reads = 0
        for attempt in range(n):
            j = (index + attempt) % n
            if j in self._unreadable:
                continue
            reads += 1
            try:
                item = self._load(j)
            except ImageReadError as e:
                self._unreadable.add(j)
                logger.warning("%s: skipping unreadable item %d (%s)", self.name, j, e)
                if reads >= _MAX_CONSECUTIVE_SKIPS:
                    raise DatasetError(
                        f"{self.name}: {reads} consecutive unreadable items from index {index}; last: {e}"
                    ) from None
                continue
            if attempt:
                self.skipped.increment()
            return item
        raise DatasetError(f"{self.name}: no readable item left (all {n} items failed to load)")

    def __repr__(self) -> str:
        extra = f", separate channels x{self._n_channels}" if self.separate_channels else ""
        return f"{self.name}({len(self._paths)} images{extra}, on_error={self.on_error})"
