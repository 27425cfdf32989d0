"""`celldino demo`: the whole product on the bundled real sample, on a CPU, in a few minutes.

1. pretrain a small ViT with the Cell-DINO recipe (recipe `demo`: cell augmentations, DINO + iBOT + KoLeo, EMA
   centering) on the 16-bit crops of data/sample/stain_task (labels unused);
2. kNN-evaluate the trained teacher and the same architecture at random initialisation on the labelled split
   (train -> val, leave-source-out), printing mean per-class F1 side by side;
3. embed the val crops with the trained teacher into AnnData (.h5ad) and draw a UMAP coloured by stain.
"""
import json
import sys
import time
from pathlib import Path

import torch

from celldino.config import load_config
from celldino.files import atomic_write_text

SAMPLE_CSV = Path("stain_task") / "stain_task.csv"


def default_data_dir():
    """data/sample of the checkout this package runs from (editable install or source tree)."""
    return Path(__file__).resolve().parent.parent / "data" / "sample"


def add_arguments(parser):
    parser.add_argument("--output-dir", default="demo_output", help="where checkpoints, results and plots go")
    parser.add_argument("--data-dir", default=None,
                        help="the bundled sample (default: data/sample of this checkout)")
    parser.add_argument("--no-resume", action="store_true", help="start training from scratch even if a "
                        "checkpoint of an earlier demo run is in --output-dir")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("opts", nargs="*", default=[], metavar="key=value",
                        help="config overrides on top of the demo recipe, e.g. optim.epochs=2")


def _latest_teacher(output_dir):
    exports = sorted((Path(output_dir) / "eval").glob("training_*/teacher_checkpoint.pth"),
                     key=lambda p: int(p.parent.name.split("_")[-1]))
    if not exports:
        raise FileNotFoundError(f"no eval/training_*/teacher_checkpoint.pth under {output_dir}: training wrote no "
                                "teacher export (check evaluation.eval_period_iterations)")
    return exports[-1]


class RawPixels(torch.nn.Module):
    """The self-normalised pixels themselves as features: the floor a learned embedding has to beat."""

    def forward(self, x):
        return x.flatten(1)


def _knn_f1(model, csv, device):
    from celldino.eval.knn import evaluate_knn
    spec = f"CSV:path={csv}"
    result = evaluate_knn(model, f"{spec}:split=train", f"{spec}:split=val", nb_knn=(10, 20), crop_size=64,
                          device=device, progress=False, dataset_names={"val": "stain_task_val"})
    return result["scores"]["val"], result


def main(args):
    from celldino.config import ConfigError
    from celldino.hub import load_backbone
    from celldino.models import build_model_from_cfg
    from celldino.train.launch import train_reporting_errors

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    csv = (data_dir / SAMPLE_CSV).resolve()
    if not csv.is_file():
        where = (f"--data-dir {args.data_dir} has no {SAMPLE_CSV}" if args.data_dir else
                 "run from a checkout of the repository or pass --data-dir (the data/sample folder of one)")
        print(f"celldino demo: the bundled sample is missing ({csv}): {where}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir).resolve()
    try:
        cfg = load_config("demo", [f"train.dataset_path=CSV:path={csv}", f"train.output_dir={output_dir}"]
                          + args.opts)
    except ConfigError as exc:
        print(f"celldino demo: {exc}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    print(f"[1/3] pretraining a {cfg.student.arch} (embed {cfg.student.embed_dim}, depth {cfg.student.depth}, "
          f"patch {cfg.student.patch_size}) on {csv.parent} -> {output_dir}", flush=True)
    start = time.time()
    trained, code = train_reporting_errors(cfg, output_dir, resume=not args.no_resume, prog="celldino demo")
    if trained is None:
        return code
    train_seconds = time.time() - start

    print("[2/3] kNN evaluation (train -> val, unseen sources), mean per-class F1 x 100", flush=True)
    torch.manual_seed(cfg.train.seed)
    random_model, _ = build_model_from_cfg(cfg, only_teacher=True)
    teacher_path = _latest_teacher(output_dir)
    trained_model = load_backbone(teacher_path)
    scores = {"raw pixels (no model)": _knn_f1(RawPixels(), csv, device)[0],
              "random init": _knn_f1(random_model, csv, device)[0],
              f"trained ({teacher_path.parent.name})": _knn_f1(trained_model, csv, device)[0]}
    ks = list(next(iter(scores.values())).keys())
    print(f"\n  {'model':32s}" + "".join(f"  F1 k={k:>3s}" for k in ks))
    for name, row in scores.items():
        print(f"  {name:32s}" + "".join(f"  {row[k]:8.1f}" for k in ks))
    print("  (4 balanced classes: chance accuracy is 25%)\n")

    print("[3/3] embeddings of the val crops -> AnnData + UMAP", flush=True)
    from celldino.cli import main as cli_main
    h5ad, png = output_dir / "stain_task_val.h5ad", output_dir / "stain_task_val_umap.png"
    rc = cli_main(["embed", "--checkpoint", str(teacher_path), "--input", f"CSV:path={csv}:split=val",
                   "--output", str(h5ad), "--umap", str(png), "--color", "stain", "--crop-size", "64",
                   "--no-progress"] + (["--device", args.device] if args.device else []))
    summary = {"train_seconds": round(train_seconds, 1), "teacher_checkpoint": str(teacher_path),
               "knn_mean_per_class_f1": scores, "anndata": str(h5ad), "umap": str(png)}
    atomic_write_text(output_dir / "demo_results.json", json.dumps(summary, indent=2))
    print(f"results: {output_dir / 'demo_results.json'}")
    return rc
