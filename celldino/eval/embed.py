"""`celldino embed`: embeddings of your images from any checkpoint, as .npy (+ ids .csv) or AnnData .h5ad,
optionally with a UMAP plot.

    celldino embed --checkpoint teacher_checkpoint.pth --input images/ --output cells.h5ad --umap cells.png
    celldino embed --checkpoint model.safetensors --input cells.csv --output cells.npy --n-last-blocks 4 --avgpool
    celldino embed --checkpoint ca.pth --input "CHAMMI_HPA:root=/data/chammi:split=TRAIN" --output x.h5ad \
        --bag-of-channels --crop-size 224 --color label_name

--input: a folder (every image below it; first-level sub-folders become labels), a .csv file (a path column,
optional label column; all columns go into obs) or any dataset string (`Name:key=value:...`).
Embedding = the final-norm CLS token (what the hub models return); --n-last-blocks N concatenates the CLS tokens
of the last N blocks and --avgpool appends the mean patch token (the linear-probe input).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ._cli import add_model_arguments, autocast_arg, load_model, setup


def add_arguments(parser):
    parser.add_argument("--input", required=True, help="folder, .csv file or dataset string (Name:key=value:...)")
    parser.add_argument("--output", required=True, help="x.npy (features + x.csv of ids and metadata) or x.h5ad")
    parser.add_argument("--umap", default=None, metavar="PNG", help="also write a UMAP plot of the embeddings")
    parser.add_argument("--color", default=None, metavar="COLUMN",
                        help="obs column colouring the plot (default: label_name, else label, when present)")
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
    if type(dataset).__name__ == "FolderDataset":
        return False, None
    return True, None


def main(args) -> int:
    from celldino.data import build_dataset
    from celldino.data.datasets import DatasetError

    from . import _dist
    from .export import build_obs, compute_umap, dataset_metadata, plot_embedding, write_anndata, write_npy
    from .features import dataset_ids, dataset_spec, extract_features, make_eval_transform

    is_main = setup(args)
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in (".npy", ".h5ad"):
        print(f"celldino embed: --output {args.output}: expected a .npy or .h5ad file name", file=sys.stderr)
        return 2
    if args.n_last_blocks < 1:
        print("celldino embed: --n-last-blocks must be >= 1", file=sys.stderr)
        return 2
    model = load_model(args)
    if model is None:
        return 1
    try:
        spec = dataset_spec(args.input)
        dataset = build_dataset(spec, transform=make_eval_transform(args.crop_size, args.resize_size))
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"celldino embed: --input {args.input}: {exc}", file=sys.stderr)
        return 1
    try:
        feats = extract_features(model, dataset, kind="cls", n_last_blocks=args.n_last_blocks, avgpool=args.avgpool,
                                 bag_of_channels=args.bag_of_channels, batch_size=args.batch_size,
                                 num_workers=args.num_workers, device=args.device, autocast_dtype=autocast_arg(args),
                                 cache_dir=args.cache_dir, progress=not args.no_progress, desc="embedding")
    except (ValueError, TypeError) as exc:
        print(f"celldino embed: {exc}", file=sys.stderr)
        return 1
    if not is_main:
        _dist.barrier()
        return 0
    x = feats.features.numpy()
    if args.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    use_labels, class_names = _label_info(dataset)
    labels = feats.labels.numpy() if (use_labels and feats.labels is not None) else None
    obs = build_obs(dataset_ids(dataset), dataset_metadata(dataset), labels, class_names)

    color = args.color
    if color is None:
        color = next((c for c in ("label_name", "label") if c in obs.columns), None)
    elif color not in obs.columns:
        print(f"celldino embed: --color {color!r} is not a column of the metadata (columns: "
              f"{', '.join(obs.columns)})", file=sys.stderr)
        return 2
    coords, projection = None, "UMAP"
    if args.umap or (ext == ".h5ad" and not args.no_umap):
        coords, projection = compute_umap(x)
    if ext == ".h5ad":
        info = {"checkpoint": os.path.abspath(args.checkpoint), "input": args.input, "n_last_blocks": args.n_last_blocks,
                "avgpool": args.avgpool, "bag_of_channels": args.bag_of_channels, "crop_size": args.crop_size,
                "resize_size": args.resize_size, "normalized": args.normalize}
        write_anndata(args.output, x, obs, umap=coords, projection=projection, info=info,
                      labels_matrix=labels if labels is not None and labels.ndim == 2 else None)
        print(f"wrote {x.shape[0]} x {x.shape[1]} embeddings to {args.output}"
              + (f" (obsm['X_umap']: {projection})" if coords is not None else ""))
    else:
        if coords is not None:
            obs = obs.copy()
            obs["umap_1"], obs["umap_2"] = coords[:, 0], coords[:, 1]
        _, sidecar = write_npy(args.output, x, obs)
        print(f"wrote {x.shape[0]} x {x.shape[1]} embeddings to {args.output} (ids and metadata: {sidecar})")
    if args.umap:
        plot_embedding(coords, args.umap, color=None if color is None else obs[color].to_numpy(), color_name=color,
                       projection=projection)
        print(f"wrote the {projection} plot to {args.umap}")
    _dist.barrier()
    return 0
