"""`celldino embed`: embeddings of your images from any checkpoint, as .npy (+ ids .csv) or AnnData .h5ad,
optionally with a UMAP plot.

    celldino embed --checkpoint teacher_checkpoint.pth --input images/ --output cells.h5ad --umap cells.png
    celldino embed --checkpoint model.safetensors --input cells.csv --output cells_emb.npy --n-last-blocks 4 --avgpool
    celldino embed --checkpoint ca.pth --input "CHAMMI_HPA:root=/data/chammi:split=TRAIN" --output x.h5ad \
        --bag-of-channels --crop-size 224 --color label_name

--input: a folder (every image below it; first-level sub-folders become labels), a .csv file (a path column,
optional label column; all columns go into obs), a single image file (or .zarr store) or any dataset string
(`Name:key=value:...`).
Embedding = the final-norm CLS token (what the hub models return); --n-last-blocks N concatenates the CLS tokens
of the last N blocks and --avgpool appends the mean patch token (the linear-probe input).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Tuple

import numpy as np

from ._cli import add_model_arguments, autocast_arg, load_model, setup

logger = logging.getLogger("celldino")


def add_arguments(parser):
    parser.add_argument("--input", required=True,
                        help="folder, .csv file, single image file or dataset string (Name:key=value:...)")
    parser.add_argument("--output", required=True, help="x.npy (features + x.csv of ids and metadata) or x.h5ad")
    parser.add_argument("--umap", default=None, metavar="PNG", help="also write a UMAP plot of the embeddings")
    parser.add_argument("--color", default=None, metavar="COLUMN",
                        help="obs column colouring the plot (default: label_name, else label, when present; "
                             "label_name for integer labels colours by label)")
    parser.add_argument("--n-last-blocks", type=int, default=1,
                        help="concatenate the CLS tokens of the last N blocks (default 1: the final CLS)")
    parser.add_argument("--avgpool", action="store_true", help="append the average of the last block's patch tokens")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--no-umap", action="store_true", help="do not compute obsm['X_umap'] for .h5ad outputs")
    add_model_arguments(parser, crop_default=0, batch_default=64)


def _label_info(dataset):
    """(use labels?, class names) for a celldino dataset."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return True, list(classes)
    if hasattr(dataset, "label_columns"):  # CSV
        cols = dataset.label_columns
        return bool(cols), (list(cols) if cols and len(cols) > 1 else None)
    if type(dataset).__name__ in ("FolderDataset", "ImageFileDataset"):  # unlabelled folder / single image
        return False, None
    return True, None


class EmbedError(ValueError):
    """A bad argument of embed_dataset (unknown colour column, output type, ...)."""


def label_column_names(dataset, metadata_columns) -> Tuple[str, str]:
    """Names of the generated label and label-name columns: `label` / `label_name`, unless the metadata has a
    column of either name that the labels were not read from (a CSV with its own `label` column and
    label=stain): then both are `celldino_label` / `celldino_label_name` (a pair, so they read together), and
    the user's columns are kept. A `label` column the labels come from is replaced by the class index (its
    values stay in `label_name` when they are names)."""
    sources = set(getattr(dataset, "label_columns", None) or [])
    clash = any(c in metadata_columns and c not in sources for c in ("label", "label_name"))
    prefix = "celldino_" if clash else ""
    return f"{prefix}label", f"{prefix}label_name"


def color_column(color: Optional[str], columns, label_column: str = "label",
                 name_column: str = "label_name") -> Optional[str]:
    """The obs column colouring the UMAP plot, one rule for the API and the CLI: `color` when it is a column;
    None -> the label names, else the labels (the generated ones, then a CSV's own `label_name` / `label`: the
    generated pair is renamed celldino_* beside such a column), else no colour; "label_name" for labels without names (integer
    labels, as in the bundled sample) -> the labels, with a warning (why: the documented
    `color="label_name"` should not fail on such inputs). Anything else missing: EmbedError listing the
    columns."""
    if color is None:
        return next((c for c in (name_column, label_column, "label_name", "label") if c in columns), None)
    if color in columns:
        return color
    if color == "label_name":  # the generated names (renamed on a clash with a CSV column), else the labels
        if name_column in columns:
            return name_column
        if label_column in columns:
            logger.warning("the labels have no names (integer labels): colouring by %r instead of 'label_name'",
                           label_column)
            return label_column
    raise EmbedError(f"colour column {color!r} is not in the metadata (columns: {', '.join(columns)})")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(dataset, output: str, umap_png: Optional[str] = None) -> None:
    """Raise EmbedError when a file embed would write (the output, x.npy's sidecar x.csv, the UMAP PNG) is one of
    its inputs (the dataset's CSV, an input image) or another of its outputs. Why: the documented
    `--input cells.csv --output cells.npy` used to write the sidecar cells.csv over the input CSV (data loss).
    Checked before the feature extraction, so nothing is computed for a run that would be refused."""
    from .export import npy_sidecar_path

    # (how messages name it, path, the option that chose it)
    outputs = [(f"the output {output}", output, "--output")]
    if os.path.splitext(output)[1].lower() == ".npy":
        sidecar = npy_sidecar_path(output)
        outputs.append((f"the ids/metadata sidecar {sidecar} of {output}", sidecar, "--output"))
    if umap_png:
        outputs.append((f"the UMAP plot {umap_png}", umap_png, "--umap"))
    seen = {}
    for what, path, option in outputs:  # two outputs on one file: the later would silently replace the earlier
        earlier = seen.setdefault(os.path.realpath(path), what)
        if earlier != what:
            raise EmbedError(f"{earlier} and {what} are the same file: choose another {option} name")
    csv_path = getattr(dataset, "csv_path", None)  # a .csv input or a CSV:path=... string
    images = None
    for what, path, option in outputs:
        if not os.path.exists(path):  # only an existing file can be an input
            continue
        if csv_path and _same_file(path, csv_path):
            stem = os.path.splitext(os.path.basename(output))[0]
            raise EmbedError(f"{what} would replace the input CSV {csv_path}: choose another {option} name"
                             + (f" (e.g. {stem}_embeddings.npy)" if option == "--output" else ""))
        if images is None:  # built once, only when an output file exists (there may be millions of images)
            n = getattr(dataset, "num_images", len(dataset)) if hasattr(dataset, "image_path") else 0
            # real paths on both sides: a dataset listing files through a symlinked folder names them otherwise
            images = {os.path.realpath(dataset.image_path(i)) for i in range(n)}
        if os.path.realpath(path) in images:
            raise EmbedError(f"{what} would replace the input image {path}: choose another {option} name")


def embed_dataset(model, dataset, output: str, *, umap_png: Optional[str] = None, color: Optional[str] = None,
                  compute_projection: bool = True, n_last_blocks: int = 1, avgpool: bool = False,
                  bag_of_channels: bool = False, normalize: bool = False, batch_size: int = 64, num_workers: int = 0,
                  device=None, autocast_dtype="auto", cache_dir: Optional[str] = None, progress: bool = True,
                  info: Optional[dict] = None) -> dict:
    """Embed every item of a celldino dataset (with its eval transform) and write `output` (.npy + ids .csv,
    or .h5ad with obsm['X_umap'] unless compute_projection=False), plus a UMAP PNG coloured by `color` (an obs
    column; default label_name / label). Every rank computes its share; rank 0 writes.
    Returns {"output", "sidecar", "umap_png", "projection", "color", "n", "dim", "obs_columns"}."""
    from celldino import dist as _dist
    from .export import build_obs, compute_umap, dataset_metadata, plot_embedding, write_anndata, write_npy
    from .features import dataset_ids, extract_features

    ext = os.path.splitext(output)[1].lower()
    if ext not in (".npy", ".h5ad"):
        raise EmbedError(f"output {output}: expected a .npy or .h5ad file name")
    refuse_overwriting_inputs(dataset, output, umap_png)
    use_labels, class_names = _label_info(dataset)
    metadata = dataset_metadata(dataset)
    label_col, name_col = label_column_names(dataset, metadata.columns)
    # name_col only when the labels have names (folder classes, text labels), not for integer labels; each
    # column once (the generated label replaces the CSV column it was read from)
    generated = ([label_col] + ([name_col] if class_names is not None else [])) if use_labels else []
    columns = list(dict.fromkeys(list(metadata.columns) + generated))
    color = color_column(color, columns, label_col, name_col)  # before the (long) extraction
    feats = extract_features(model, dataset, kind="cls", n_last_blocks=n_last_blocks, avgpool=avgpool,
                             bag_of_channels=bag_of_channels, batch_size=batch_size, num_workers=num_workers,
                             device=device, autocast_dtype=autocast_dtype, cache_dir=cache_dir, progress=progress,
                             desc="embedding")
    result = {"output": output, "sidecar": None, "umap_png": None, "projection": None, "color": None,
              "n": int(feats.features.shape[0]), "dim": int(feats.features.shape[1])}
    if not _dist.is_main_process():
        _dist.barrier()
        return result
    x = feats.features.numpy()
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = feats.labels.numpy() if (use_labels and feats.labels is not None) else None
    obs = build_obs(dataset_ids(dataset), metadata, labels, class_names, label_column=label_col,
                    name_column=name_col)
    if color is not None and color not in obs.columns:  # names left out (labels outside the class list)
        color = label_col if label_col in obs.columns else None
    coords, projection = None, None
    if umap_png or (ext == ".h5ad" and compute_projection):
        coords, projection = compute_umap(x)
    if ext == ".h5ad":
        meta = {"n_last_blocks": n_last_blocks, "avgpool": avgpool, "bag_of_channels": bag_of_channels,
                "normalized": normalize, **(info or {})}
        write_anndata(output, x, obs, umap=coords, projection=projection or "none", info=meta,
                      labels_matrix=labels if labels is not None and labels.ndim == 2 else None)
    else:
        if coords is not None:
            obs = obs.copy()
            obs["umap_1"], obs["umap_2"] = coords[:, 0], coords[:, 1]
        result["sidecar"] = write_npy(output, x, obs)[1]
    if umap_png:
        plot_embedding(coords, umap_png, color=None if color is None else obs[color].to_numpy(), color_name=color,
                       projection=projection)
        result["umap_png"] = umap_png
    result.update(projection=projection, obs_columns=list(obs.columns), color=color)
    _dist.barrier()
    return result


def main(args) -> int:
    from celldino.data.datasets import DatasetError

    from .features import patch_size_of
    from .inputs import build_input_dataset, make_eval_transform, warn_if_crop_pads

    setup(args)
    if args.n_last_blocks < 1:
        print("celldino embed: --n-last-blocks must be >= 1", file=sys.stderr)
        return 2
    if os.path.splitext(args.output)[1].lower() not in (".npy", ".h5ad"):
        print(f"celldino embed: --output {args.output}: expected a .npy or .h5ad file name", file=sys.stderr)
        return 2
    model = load_model(args)
    if model is None:
        return 1
    try:
        dataset = build_input_dataset(args.input, transform=make_eval_transform(args.crop_size, args.resize_size))
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"celldino embed: --input {args.input}: {exc}", file=sys.stderr)
        return 1
    warn_if_crop_pads(dataset, args.crop_size, args.resize_size, what="input",
                      multiple_of=(patch_size_of(model) or (1,))[0])
    info = {"checkpoint": os.path.abspath(args.checkpoint), "input": args.input, "crop_size": args.crop_size,
            "resize_size": args.resize_size}
    try:
        out = embed_dataset(model, dataset, args.output, umap_png=args.umap, color=args.color,
                            compute_projection=not args.no_umap, n_last_blocks=args.n_last_blocks,
                            avgpool=args.avgpool, bag_of_channels=args.bag_of_channels, normalize=args.normalize,
                            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                            autocast_dtype=autocast_arg(args), cache_dir=args.cache_dir,
                            progress=not args.no_progress, info=info)
    except EmbedError as exc:
        print(f"celldino embed: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"celldino embed: {exc}", file=sys.stderr)
        return 1
    if out.get("obs_columns") is not None:
        extra = f" (ids and metadata: {out['sidecar']})" if out["sidecar"] else (
            f" (obsm['X_umap']: {out['projection']})" if out["projection"] else "")
        print(f"wrote {out['n']} x {out['dim']} embeddings to {out['output']}{extra}")
        if out["umap_png"]:
            print(f"wrote the {out['projection']} plot to {out['umap_png']}")
    return 0
