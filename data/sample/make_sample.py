"""Rebuild data/sample/ from the cells-smoke set (deterministic; see PROVENANCE.md).

    python data/sample/make_sample.py --source /work/shared/data/cells-smoke

(a) stain_task/: the labelled stain task as single-channel uint16 TIFF crops (zlib) + stain_task.csv,
    up to 100 crops per class per split, split evenly over the sources of that class (seeded).
(b) cells/: every napari-zelda-bpae crop (2-channel uint16) and 20 cellprofiler-examplefly crops per field
    (3-channel uint8), copied unchanged, + cells.csv (the source rows, same columns).
(c) fields/neuron_4ch.ome.tif: copied unchanged (4-channel uint16 OME-TIFF with channel names).
"""

import argparse
import os
import shutil

import numpy as np
import pandas as pd
import tifffile

PER_CLASS_PER_SPLIT = 100
FLY_PER_FIELD = 20
SEED = 0


def quotas(counts: dict, total: int) -> dict:
    """Split `total` as evenly as possible over sources, never more than a source has (round robin)."""
    out = {k: 0 for k in counts}
    left = total
    while left > 0:
        open_ = [k for k in sorted(counts) if out[k] < counts[k]]
        if not open_:
            break
        for k in open_[:left]:
            out[k] += 1
        left = total - sum(out.values())
    return out


def build_stain_task(src: str, dst: str, rng: np.random.Generator) -> None:
    npz = np.load(os.path.join(src, "stain_task", "stain_task.npz"))
    meta = pd.read_csv(os.path.join(src, "stain_task", "stain_task.csv"))
    images = npz["images"]
    assert len(meta) == images.shape[0] and (meta["idx"].to_numpy() == np.arange(len(meta))).all()
    rows = []
    for (split, stain), group in meta.groupby(["split", "stain"], sort=True):
        counts = group.groupby("source").size().to_dict()
        want = quotas(counts, min(PER_CLASS_PER_SPLIT, len(group)))
        for source, n in sorted(want.items()):
            pool = group[group["source"] == source]["idx"].to_numpy()
            chosen = np.sort(rng.choice(pool, size=n, replace=False))
            for idx in chosen:
                r = meta.iloc[idx]
                rel = f"{split}/{stain}/{source}_{idx:04d}.tif"
                path = os.path.join(dst, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tifffile.imwrite(path, images[idx], compression="zlib", photometric="minisblack",
                                 metadata={"axes": "CYX", "channel_names": [stain]})
                rows.append({"file": rel, "label": int(r["label"]), "stain": stain, "split": split,
                             "source": source, "image": r["image"], "idx": int(idx)})
    pd.DataFrame(rows).to_csv(os.path.join(dst, "stain_task.csv"), index=False)


def build_cells(src: str, dst: str, rng: np.random.Generator) -> None:
    meta = pd.read_csv(os.path.join(src, "cells", "cells.csv"))
    keep = [meta[meta["source"] == "napari-zelda-bpae"]]
    fly = meta[meta["source"] == "cellprofiler-examplefly"]
    for _, field in fly.groupby("image", sort=True):
        keep.append(field.iloc[np.sort(rng.choice(len(field), FLY_PER_FIELD, replace=False))])
    sub = pd.concat(keep)
    for rel in sub["file"]:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(src, "cells", rel), os.path.join(dst, rel))
    sub.to_csv(os.path.join(dst, "cells.csv"), index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/work/shared/data/cells-smoke")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    rng = np.random.default_rng(SEED)
    for sub in ("stain_task", "cells", "fields"):
        shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    build_stain_task(args.source, os.path.join(args.out, "stain_task"), rng)
    build_cells(args.source, os.path.join(args.out, "cells"), rng)
    os.makedirs(os.path.join(args.out, "fields"), exist_ok=True)
    shutil.copyfile(os.path.join(args.source, "fields", "neuron_4ch.ome.tif"),
                    os.path.join(args.out, "fields", "neuron_4ch.ome.tif"))


if __name__ == "__main__":
    main()
