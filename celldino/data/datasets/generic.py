"""Datasets for users' own images: `Folder:root=...` and `CSV:path=...`."""

from __future__ import annotations

import csv
import logging
import os
from typing import Optional

import numpy as np

from ..io import IMAGE_EXTS, ZARR_EXTS
from .base import DatasetError, ImageDataset, parse_list

logger = logging.getLogger("celldino")

__all__ = ["FolderDataset", "CSVDataset", "PATH_COLUMNS", "TRUE_STRINGS"]

PATH_COLUMNS = ("file", "path", "filename", "file_path", "img_path", "image_path", "image")
TRUE_STRINGS = ("true", "1", "1.0", "yes", "y", "t")


def _normalise_exts(extensions) -> tuple:
    exts = parse_list(extensions) or list(IMAGE_EXTS)
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in exts)


class FolderDataset(ImageDataset):
    """Every image under `root` (recursive, sorted; OME-Zarr directories count as images).

    labels: "auto" (default: class = first-level sub-folder when every image lies in one), "true"
    (required; an image directly under root is an error) or "false" (target 0). `classes` lists the
    class names in index order (sorted folder names).
    """

    name = "Folder"

    def __init__(self, root: str, *, extensions=None, labels="auto", recursive: bool = True, **kwargs):
        super().__init__(**kwargs)
        if root is None or str(root) == "":
            raise DatasetError("Folder: the root key is required (Folder:root=/path/to/images)")
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.isdir(self.root):
            raise DatasetError(f"Folder: root {self.root} does not exist or is not a directory")
        exts = _normalise_exts(extensions)
        files = self._scan(self.root, exts, recursive)
        labels = str(labels).lower()
        if labels not in ("auto", "true", "false", "1", "0", "yes", "no"):
            raise DatasetError(f"Folder: labels={labels!r}: expected auto, true or false")
        rel_parts = [os.path.relpath(f, self.root).split(os.sep) for f in files]
        in_subfolder = [len(p) > 1 for p in rel_parts]
        use_labels = labels in ("true", "1", "yes") or (labels == "auto" and files and all(in_subfolder))
        if use_labels:
            loose = [f for f, sub in zip(files, in_subfolder) if not sub]
            if loose:
                raise DatasetError(f"Folder: labels=true but {loose[0]} is not inside a class sub-folder of {self.root}")
            self.classes = sorted({p[0] for p in rel_parts})
            index = {c: i for i, c in enumerate(self.classes)}
            targets = [index[p[0]] for p in rel_parts]
        else:
            self.classes = None
            targets = [0] * len(files)
        self._paths, self._targets = files, targets
        self._finalize(f"no files with extensions {', '.join(exts)} under {self.root}")

    @staticmethod
    def _scan(root: str, exts: tuple, recursive: bool) -> list:
        found = []
        seen = set()  # real paths of the folders walked: linked folders are followed, each once (no link loops)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames.sort()
            zarrs = [d for d in dirnames if d.lower().endswith(ZARR_EXTS)]
            if any(e in ZARR_EXTS for e in exts):
                found.extend(os.path.join(dirpath, d) for d in zarrs)
            # never descend into a zarr store or hidden folders
            dirnames[:] = [d for d in dirnames if d not in zarrs and not d.startswith(".")] if recursive else []
            found.extend(
                os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and f.lower().endswith(exts)
            )
        return sorted(found)


class CSVDataset(ImageDataset):
    """Images listed in a CSV file.

    column: the path column (default: the first of file, path, filename, file_path, img_path, image_path,
    image present). Relative paths are resolved against `root` (default: the CSV's folder).
    label: label column(s). One column: integer labels are used as they are, anything else becomes an index
    into the sorted distinct values (`classes`). Several columns (label=a,b,c): a multi-hot int64 vector of
    the truthy cells (True / 1 / yes). Default: the `label` column if present, else target 0.
    split: keep only rows whose `split_column` (default "split") equals this value.
    A `channel_names` column (`;`-separated) gives per-row channel names for name-based channel selection.
    check_files: verify at construction that every listed file exists (missing -> error naming the CSV row,
    or, with on_error=skip, the row is dropped, logged and counted).
    """

    name = "CSV"

    def __init__(
        self,
        path: str,
        *,
        root: Optional[str] = None,
        column: Optional[str] = None,
        label=None,
        split: Optional[str] = None,
        split_column: str = "split",
        channel_names_column: str = "channel_names",
        check_files: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if path is None or str(path) == "":
            raise DatasetError("CSV: the path key is required (CSV:path=/path/to/images.csv)")
        self.csv_path = os.path.abspath(os.path.expanduser(str(path)))
        if not os.path.isfile(self.csv_path):
            what = "is a directory (expected a .csv file)" if os.path.isdir(self.csv_path) else "does not exist"
            raise DatasetError(f"CSV: {self.csv_path} {what}")
        self.root = os.path.abspath(os.path.expanduser(str(root))) if root else os.path.dirname(self.csv_path)
        line_of = {}  # id(row) -> the file line the row ends on (for messages; quoted cells may span lines)
        try:
            with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                rows = []
                for r in reader:
                    line_of[id(r)] = reader.line_num
                    rows.append(r)
        except UnicodeDecodeError as exc:
            raise DatasetError(f"CSV: {self.csv_path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                               "save it as UTF-8") from None
        if not header:
            raise DatasetError(f"CSV: {self.csv_path} is empty (no header row)")
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise DatasetError(f"CSV: {self.csv_path} repeats the column name(s) {repeated}: each column needs its "
                               "own name")
        if column is None:
            column = next((c for c in PATH_COLUMNS if c in header), None)
            if column is None:
                raise DatasetError(f"CSV: {self.csv_path} has no path column (looked for {', '.join(PATH_COLUMNS)}; "
                                   f"columns are {header}); pass column=<name>")
        elif column not in header:
            raise DatasetError(f"CSV: {self.csv_path} has no column {column!r} (columns are {header})")
        label_cols = parse_list(label)
        if label_cols is None and "label" in header:
            label_cols = ["label"]
        for c in label_cols or []:
            if c not in header:
                raise DatasetError(f"CSV: {self.csv_path} has no label column {c!r} (columns are {header})")
        if split is not None:
            if split_column not in header:
                raise DatasetError(f"CSV: split={split!r} but {self.csv_path} has no {split_column!r} column")
            rows = [r for r in rows if r[split_column] == split]

        paths, kept, missing = [], [], 0
        for r in rows:
            rel = (r.get(column) or "").strip()
            if not rel:
                raise DatasetError(f"CSV: {self.csv_path} row {line_of[id(r)]}: empty {column!r}")
            p = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
            if check_files and not os.path.exists(p):
                if self.on_error == "skip":
                    missing += 1
                    self.skipped.increment()
                    logger.warning("CSV: %s row %d: missing file %s (skipped)", self.csv_path, line_of[id(r)], p)
                    continue
                raise DatasetError(f"CSV: {self.csv_path} row {line_of[id(r)]}: file not found: {p}")
            paths.append(p)
            kept.append(r)
        self.missing_files = missing

        self.label_columns = label_cols
        self.classes = None
        if not label_cols:
            targets = [0] * len(kept)
        elif len(label_cols) == 1:
            values = [(r[label_cols[0]] or "").strip() for r in kept]
            empty = [line_of[id(r)] for r, v in zip(kept, values) if not v]
            if empty:
                logger.warning("CSV: %s: %d row(s) with an empty %r cell (first: row %d) form a class of their own, "
                               "named ''", self.csv_path, len(empty), label_cols[0], empty[0])
            ints = [_as_int(v) for v in values]
            if all(v is not None for v in ints):
                targets = ints
            else:
                self.classes = sorted(set(values))
                index = {c: i for i, c in enumerate(self.classes)}
                targets = [index[v] for v in values]
        else:
            targets = [
                np.array([(r[c] or "").strip().lower() in TRUE_STRINGS for c in label_cols], dtype=np.int64)
                for r in kept
            ]
        if channel_names_column in header:
            self._row_channel_names = [
                [n for n in (r[channel_names_column] or "").split(";") if n] or None for r in kept
            ]
        self._paths, self._targets = paths, targets
        self._finalize(f"{self.csv_path} has no usable rows" + (f" for split {split!r}" if split is not None else ""))


def _as_int(v: str) -> Optional[int]:
    try:
        f = float(v)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None
