"""Datasets for users' own images: `Folder:root=...` and `CSV:path=...`."""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from ..io import IMAGE_EXTS, ZARR_EXTS
from .base import TRUE_WORDS, CSVTable, DatasetError, ImageDataset, parse_bool, parse_list, read_csv_rows

logger = logging.getLogger("celldino")

__all__ = ["FolderDataset", "CSVDataset", "PATH_COLUMNS"]

PATH_COLUMNS = ("file", "path", "filename", "file_path", "img_path", "image_path", "image")


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
        wanted = _folder_labels(labels)
        files = self._scan(self.root, exts, recursive)
        rel_parts = [os.path.relpath(f, self.root).split(os.sep) for f in files]
        in_subfolder = [len(p) > 1 for p in rel_parts]
        use_labels = wanted if wanted is not None else bool(files) and all(in_subfolder)
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
    the cells that say yes (`base.TRUE_WORDS`: true, 1, yes, on, ...). Default: the `label` column if present, else target 0.
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
        self.root = os.path.abspath(os.path.expanduser(str(root))) if root else os.path.dirname(self.csv_path)
        table = read_csv_rows(self.csv_path, self.name)
        guessed = column is None
        column = self._path_column(table, column)
        self.label_columns = self._label_columns(table, label)
        rows = self._split_rows(table, split, split_column)
        # a guessed column may hold ids, not paths (a column named `image`): then say which one was taken
        hint = (f" (paths read from column {column!r}, the first of {', '.join(PATH_COLUMNS)} in the header; pass "
                "column=<name> if another column holds them)") if guessed else ""
        self._paths, rows = self._rows_with_files(rows, column, check_files, hint)
        self.classes = None
        self._targets = self._row_targets(rows)
        if channel_names_column in table.header:
            self._row_channel_names = [_channel_names(r[channel_names_column]) for _, r in rows]
        self._finalize(f"{self.csv_path} has no usable rows" + (f" for split {split!r}" if split is not None else ""))

    # -- construction steps, in order ------------------------------------------------------------------------

    def _path_column(self, table: CSVTable, column: Optional[str]) -> str:
        """The column naming each row's image: `column`, else the first of PATH_COLUMNS present."""
        if column is None:
            column = next((c for c in PATH_COLUMNS if c in table.header), None)
            if column is None:
                raise DatasetError(f"CSV: {self.csv_path} has no path column (looked for {', '.join(PATH_COLUMNS)}; "
                                   f"columns are {table.header}); pass column=<name>")
        elif column not in table.header:
            raise DatasetError(f"CSV: {self.csv_path} has no column {column!r} (columns are {table.header})")
        return column

    def _label_columns(self, table: CSVTable, label) -> Optional[list]:
        """label=a,b -> ['a', 'b']; no label key -> ['label'] when that column exists, else None (target 0)."""
        columns = parse_list(label)
        if columns is None and "label" in table.header:
            columns = ["label"]
        for c in columns or []:
            if c not in table.header:
                raise DatasetError(f"CSV: {self.csv_path} has no label column {c!r} (columns are {table.header})")
        return columns

    def _split_rows(self, table: CSVTable, split: Optional[str], split_column: str) -> list:
        if split is None:
            return table.rows
        if split_column not in table.header:
            raise DatasetError(f"CSV: split={split!r} but {self.csv_path} has no {split_column!r} column")
        return [(line, r) for line, r in table.rows if r[split_column] == split]

    def _rows_with_files(self, rows: list, column: str, check_files: bool, hint: str = ""):
        """-> (image paths, their rows). A row whose file is missing (check_files) is an error or, with
        on_error=skip, dropped (counted, logged); `hint` is added to that message."""
        paths, kept = [], []
        for line, r in rows:
            rel = (r.get(column) or "").strip()
            if not rel:
                raise DatasetError(f"CSV: {self.csv_path} row {line}: empty {column!r}")
            p = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
            if check_files and not os.path.exists(p):
                self._missing_file(f"{self.csv_path} row {line}", p, hint)
                continue
            paths.append(p)
            kept.append((line, r))
        return paths, kept

    def _row_targets(self, rows: list) -> list:
        if not self.label_columns:
            return [0] * len(rows)
        if len(self.label_columns) == 1:
            return self._single_label_targets(rows, self.label_columns[0])
        # several columns: a multi-hot vector of the cells that say yes (True, 1, ...)
        return [np.array([(r[c] or "").strip().lower() in TRUE_WORDS for c in self.label_columns], dtype=np.int64)
                for _, r in rows]

    def _single_label_targets(self, rows: list, column: str) -> list:
        """Integer cells are the targets; otherwise each distinct value is a class (sorted into self.classes)."""
        values = [(r[column] or "").strip() for _, r in rows]
        empty = [line for (line, _), v in zip(rows, values) if not v]
        if empty:
            logger.warning("CSV: %s: %d row(s) with an empty %r cell (first: row %d) form a class of their own, "
                           "named ''", self.csv_path, len(empty), column, empty[0])
        ints = [_as_int(v) for v in values]
        if all(v is not None for v in ints):
            return ints
        self.classes = sorted(set(values))
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[v] for v in values]


def _channel_names(cell: Optional[str]) -> Optional[list]:
    """A `channel_names` cell 'DNA;ER' -> ['DNA', 'ER']; an empty cell -> None (the dataset's names apply)."""
    return [n for n in (cell or "").split(";") if n] or None


def _folder_labels(labels) -> Optional[bool]:
    """Folder's labels key: None for auto (sub-folders when every image lies in one), else parse_bool's words."""
    if str(labels).strip().lower() == "auto":
        return None
    try:
        return parse_bool(labels, "labels")
    except DatasetError:
        raise DatasetError(f"Folder: labels={labels!r}: expected auto, true or false") from None


def _as_int(v: str) -> Optional[int]:
    try:
        f = float(v)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None
