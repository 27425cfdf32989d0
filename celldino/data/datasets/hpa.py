"""The reference's Human Protein Atlas datasets (HPAone single cells, HPAFoV fields of view), same file layout,
CSV columns, splits, modes and label vectors (reference `dinov2/data/datasets/cell_dino/{hpaone,hpafov}.py`).
Deliberate fixes are marked FIX and listed in docs/data.md."""

from __future__ import annotations

import os

import numpy as np

from .base import WILDCARDS, DatasetError, ImageDataset, parse_choice, read_csv_rows

__all__ = ["HPAone", "HPAFoV", "HPAONE_PROTEIN_LOCALIZATION", "HPAONE_CELL_TYPE", "HPAFOV_PROTEIN_LOCALIZATION",
           "HPAFOV_CELL_TYPE"]

HPAONE_PROTEIN_LOCALIZATION = [
    "actin filaments,focal adhesion sites", "aggresome", "centrosome,centriolar satellite", "cytosol",
    "endoplasmic reticulum", "golgi apparatus", "intermediate filaments", "microtubules", "mitochondria",
    "mitotic spindle", "no staining", "nuclear bodies", "nuclear membrane", "nuclear speckles", "nucleoli",
    "nucleoli fibrillar center", "nucleoplasm", "plasma membrane,cell junctions",
    "vesicles,peroxisomes,endosomes,lysosomes,lipid droplets,cytoplasmic bodies",
]  # 19
HPAONE_CELL_TYPE = [
    "A-431", "A549", "AF22", "ASC TERT1", "BJ", "CACO-2", "EFO-21", "HAP1", "HDLM-2", "HEK 293", "HEL",
    "HUVEC TERT2", "HaCaT", "HeLa", "Hep G2", "JURKAT", "K-562", "MCF7", "PC-3", "REH", "RH-30", "RPTEC TERT1",
    "RT4", "SH-SY5Y", "SK-MEL-30", "SiHa", "U-2 OS", "U-251 MG", "hTCEpi",
]  # 29
HPAFOV_PROTEIN_LOCALIZATION = [  # Kaggle HPA order
    "nucleoplasm", "nuclear membrane", "nucleoli", "nucleoli fibrillar center", "nuclear speckles", "nuclear bodies",
    "endoplasmic reticulum", "golgi apparatus", "peroxisomes", "endosomes", "lysosomes", "intermediate filaments",
    "actin filaments", "focal adhesion sites", "microtubules", "microtubule ends", "cytokinetic bridge",
    "mitotic spindle", "microtubule organizing center", "centrosome", "lipid droplets", "plasma membrane",
    "cell junctions", "mitochondria", "aggresome", "cytosol", "cytoplasmic bodies", "rods & rings",
]  # 28
HPAFOV_CELL_TYPE = [
    "BJ", "LHCN-M2", "RH-30", "SH-SY5Y", "U-2 OS", "ASC TERT1", "HaCaT", "A-431", "U-251 MG", "HEK 293", "A549",
    "RT4", "HeLa", "MCF7", "PC-3", "hTERT-RPE1", "SK-MEL-30", "EFO-21", "AF22", "HEL", "Hep G2", "HUVEC TERT2",
    "THP-1", "CACO-2", "JURKAT", "RPTEC TERT1", "SuSa", "REH", "HDLM-2", "K-562", "hTCEpi", "NB-4", "HAP1", "OE19",
    "SiHa",
]  # 35


class HPAone(ImageDataset):
    """HPA single-cell crops (4 channels: microtubules, protein, nucleus, ER; XChannels strip / RGBA PNG).

    split ALL (pretraining): varied_size_masked_single_cells_pretrain_20240507.csv, column img_path relative to
    varied_size_masked_single_cells_HPA/, target 0. TRAIN / VAL: fixed_size_masked_single_cells_{pretrain,
    evaluation}_20240507.csv, image fixed_size_masked_single_cells_HPA/<basename of "file">.
    mode PROTEIN_LOCALIZATION: 19-dim int multi-hot; CELL_TYPE: index over 29 cell lines (last "True" column
    wins, none -> 0); ALL or no mode: (protein vector, cell type) per sample; any other mode is an error (the
    reference gave the tuple for any unknown mode, typos included).
    """

    name = "HPAone"
    SPLITS = ("ALL", "TRAIN", "VAL")
    VARIED_DIR = "varied_size_masked_single_cells_HPA"
    FIXED_DIR = "fixed_size_masked_single_cells_HPA"
    MODES = ("ALL", "PROTEIN_LOCALIZATION", "CELL_TYPE")
    CSV_ALL = "varied_size_masked_single_cells_pretrain_20240507.csv"
    CSV_TRAIN = "fixed_size_masked_single_cells_pretrain_20240507.csv"
    CSV_VAL = "fixed_size_masked_single_cells_evaluation_20240507.csv"

    def __init__(self, root: str, *, split: str = "ALL", mode=None, **kwargs):
        kwargs.setdefault("layout", "strip")  # reference XChannelsDecoder
        super().__init__(**kwargs)
        if not root or not os.path.isdir(root):
            raise DatasetError(f"HPAone: root {root!r} does not exist or is not a directory")
        self.root = os.path.abspath(root)
        self.split = parse_choice(split, self.SPLITS, "split", self.name)
        # the reference gives the (protein, cell type) tuple for any other mode, typos included: ALL or no mode
        # asks for it here, anything else is an error naming the key
        self.mode = None if mode is None else parse_choice(mode, self.MODES, "mode", self.name)
        if self.split == "ALL":
            rows = self._rows(self.CSV_ALL, ["img_path"])
            self._paths = [os.path.join(self.root, self.VARIED_DIR, r["img_path"]) for r in rows]
            self._targets = [0] * len(rows)
        else:
            rows = self._rows(self.CSV_TRAIN if self.split == "TRAIN" else self.CSV_VAL,
                              ["file"] + HPAONE_PROTEIN_LOCALIZATION + HPAONE_CELL_TYPE)
            self._paths = [os.path.join(self.root, self.FIXED_DIR, r["file"].rsplit("/", 1)[-1]) for r in rows]
            prot = [np.array([r[c] == "True" for c in HPAONE_PROTEIN_LOCALIZATION], dtype=np.int64) for r in rows]
            cell = []
            for r in rows:
                idx = 0
                for k, c in enumerate(HPAONE_CELL_TYPE):
                    if r[c] == "True":
                        idx = k  # reference: the last True column wins
                cell.append(idx)
            if self.mode == "PROTEIN_LOCALIZATION":
                self._targets = prot
            elif self.mode == "CELL_TYPE":
                self._targets = cell
            else:
                # FIX: the reference stores (all protein vectors, all cell types) as one 2-tuple, so
                # get_target(i) returned whole columns; we return (protein vector, cell type) of sample i.
                self._targets = list(zip(prot, cell))
        self._finalize(f"split {self.split} under {self.root}")

    def _rows(self, csv_name: str, required) -> list:
        return [row for _, row in read_csv_rows(os.path.join(self.root, csv_name), self.name, required).rows]

    @property
    def num_labels(self) -> int:
        # FIX: the reference compares the enum to a string and always answers 19.
        return len(HPAONE_CELL_TYPE) if self.mode == "CELL_TYPE" else len(HPAONE_PROTEIN_LOCALIZATION)


class HPAFoV(ImageDataset):
    """HPA whole field-of-view images (512x512, 4 channels; RGBA PNG / TIFF).

    split TRAIN / VAL: whole_images_512_{train,test}.csv, images 512_whole_images/<basename of "file">, a
    `.tiff` name tried when that file is missing. split SSL: whole_images_names.csv column ID ->
    normalized_data/<ID>.png, targets 0..N-1.
    mode ALL (default): {"prot_loc": 28-dim multi-hot, "cell_type": index}; PROTEIN_LOCALIZATION; CELL_TYPE
    (index over 35 names; unknown name -> -1, FIX: the reference gives NaN). Rows without a positive protein
    label are dropped unless mode is CELL_TYPE (as the reference).
    wildcard SEPARATE_CHANNELS: bag of channels, 4 items per image, each one real channel (FIX, see base).
    """

    name = "HPAFoV"
    SPLITS = ("TRAIN", "VAL", "SSL")
    MODES = ("ALL", "PROTEIN_LOCALIZATION", "CELL_TYPE")
    NUM_CHANNELS = 4

    def __init__(self, root: str, *, split: str = "TRAIN", mode: str = "ALL", wildcard: str = "NONE", **kwargs):
        wild = parse_choice(wildcard, WILDCARDS, "wildcard", self.name)
        kwargs.setdefault("in_chans", None if kwargs.get("channels") else self.NUM_CHANNELS)
        super().__init__(separate_channels=wild == "SEPARATE_CHANNELS", **kwargs)
        if not root or not os.path.isdir(root):
            raise DatasetError(f"HPAFoV: root {root!r} does not exist or is not a directory")
        self.root = os.path.abspath(root)
        self.split = parse_choice(split, self.SPLITS, "split", self.name)
        self.mode = parse_choice(mode, self.MODES, "mode", self.name)
        self.wildcard = wild
        if self.split == "SSL":
            table = read_csv_rows(os.path.join(self.root, "whole_images_names.csv"), self.name, ["ID"])
            self._paths = [os.path.join(self.root, "normalized_data", r["ID"] + ".png") for _, r in table.rows]
            self._targets = list(range(len(table.rows)))
        else:
            self._read_labelled_split()
        self._finalize(f"split {self.split} under {self.root}")

    def _read_labelled_split(self) -> None:
        csv_name = "whole_images_512_train.csv" if self.split == "TRAIN" else "whole_images_512_test.csv"
        required = ["file"] + (["cell_type"] if self.mode != "PROTEIN_LOCALIZATION" else [])
        required += HPAFOV_PROTEIN_LOCALIZATION if self.mode != "CELL_TYPE" else []
        table = read_csv_rows(os.path.join(self.root, csv_name), self.name, required)
        for line, r in table.rows:
            cell_type = prot = None
            if self.mode != "PROTEIN_LOCALIZATION":
                ct = r["cell_type"]
                cell_type = HPAFOV_CELL_TYPE.index(ct) if ct in HPAFOV_CELL_TYPE else -1
            if self.mode != "CELL_TYPE":
                prot = np.array([r[c] == "True" for c in HPAFOV_PROTEIN_LOCALIZATION], dtype=np.int64)
                if prot.max() < 0.5:
                    continue
            path = self._image_file(r["file"].split("/")[-1], f"{table.path} row {line}")
            if path is None:
                continue
            self._paths.append(path)
            if self.mode == "PROTEIN_LOCALIZATION":
                self._targets.append(prot)
            elif self.mode == "CELL_TYPE":
                self._targets.append(cell_type)
            else:
                self._targets.append({"prot_loc": prot, "cell_type": cell_type})

    def _image_file(self, base: str, where: str):
        """512_whole_images/<base>, else the same name as .tiff (the reference's fallback); None when neither
        exists and on_error=skip (counted, logged)."""
        data_dir = os.path.join(self.root, "512_whole_images")
        named, tiff = os.path.join(data_dir, base), os.path.join(data_dir, base.split(".")[0] + ".tiff")
        for path in (named, tiff):
            if os.path.exists(path):
                return path
        self._missing_file(where, named, f" (nor {tiff})")
        return None

    @property
    def num_labels(self):
        if self.mode == "CELL_TYPE":
            return len(HPAFOV_CELL_TYPE)
        if self.mode == "PROTEIN_LOCALIZATION":
            return len(HPAFOV_PROTEIN_LOCALIZATION)
        return None
