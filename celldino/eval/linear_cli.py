"""`celldino eval linear`: the reference linear-probe protocol on a checkpoint (reference_spec.md §6.1).

    celldino eval linear --checkpoint teacher_checkpoint.pth --output-dir out/linear \
        --train-dataset "HPAone:split=TRAIN:mode=PROTEIN_LOCALIZATION:root=/data/HPAone" \
        --val-dataset "HPAone:split=VAL:mode=PROTEIN_LOCALIZATION:root=/data/HPAone" \
        --val-metric-type mean_per_class_multilabel_f1 --loss-type binary_cross_entropy --avgpool

A grid of linear heads (--learning-rates x --weight-decays) on the frozen backbone's last-n CLS tokens (+ avgpool);
the best head on val is reported on --test-datasets, or on val itself when none is given (as the reference; the
output says so). --mode features trains on features extracted once (fast, no augmentation) instead of the
reference's random-crop + flip images every step. Results go to <output-dir>/results_eval_linear.json (JSON lines).
"""
from __future__ import annotations

import os
import sys

from ._cli import add_model_arguments, autocast_arg, load_model, setup
from .linear import DEFAULT_LEARNING_RATES, DEFAULT_WEIGHT_DECAYS, LOSS_TYPES


def add_arguments(parser):
    parser.add_argument("--train-dataset", required=True, help="dataset string, folder or .csv of the train set")
    parser.add_argument("--val-dataset", required=True, help="dataset string, folder or .csv choosing the best head")
    parser.add_argument("--test-datasets", "--test-dataset", dest="test_datasets", nargs="+", default=None,
                        help="datasets the best head is reported on (default: the val set, as the reference)")
    parser.add_argument("--output-dir", required=True, help="results_eval_linear.json and the heads checkpoint")
    parser.add_argument("--mode", choices=["augment", "features"], default="augment",
                        help="augment (reference): augmented images through the backbone each step; features: "
                             "train on features extracted once (center crop)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--epoch-length", type=int, default=145, help="iterations per epoch (default 145)")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=list(DEFAULT_LEARNING_RATES),
                        help="grid, each scaled by batch x world / 256 (default: the reference's 16 values)")
    parser.add_argument("--weight-decays", "--weight_decays", dest="weight_decays", type=float, nargs="+",
                        default=list(DEFAULT_WEIGHT_DECAYS), help="grid (default 0 1e-4 1e-5)")
    parser.add_argument("--n-last-blocks", type=int, default=4, help="CLS tokens of the last n blocks (default 4)")
    parser.add_argument("--avgpool", action="store_true", help="append the average of the last block's patch tokens")
    parser.add_argument("--val-metric-type", "--metric", dest="metric", default=None,
                        help="multiclass_f1 | multilabel_f1 | accuracy (or the reference names); default from the "
                             "labels: multilabel_f1 for multi-hot, multiclass_f1 otherwise")
    parser.add_argument("--loss-type", choices=list(LOSS_TYPES), default=None,
                        help="default: binary_cross_entropy for multi-hot labels, cross_entropy otherwise")
    parser.add_argument("--save-checkpoint-frequency", type=int, default=1250, help="iterations (default 1250)")
    parser.add_argument("--eval-period-iterations", type=int, default=1250, help="iterations (default 1250)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a heads checkpoint exists")
    parser.add_argument("--leave-one-out-dataset", default=None,
                        help="CHAMMI enriched_meta.csv: leave-one-out over HPA Task_three cell types / CP Task_four "
                             "plates on pre-extracted features, scored on labels 4, 5, 6")
    parser.add_argument("--sklearn", action="store_true",
                        help="also fit scikit-learn logistic regression on pre-extracted features")
    parser.add_argument("--seed", type=int, default=0)
    add_model_arguments(parser, crop_default=384, batch_default=64)


def format_results(results: dict) -> str:
    """The console summary: the result keys keep the reference's names ("<dataset>_accuracy" whatever the metric),
    so every score line says which metric the number is."""
    metric = results.get("metric")
    unit = f"{metric} x 100" if metric else None
    lines = [f"linear probe (best head chosen on val by {metric}):" if metric else "linear probe:"]
    for k, v in results.items():
        if k in ("val_metrics", "head_f1", "metric"):
            continue
        if isinstance(v, float):
            is_score = unit and (k.endswith("_accuracy") or k.endswith("_logistic_regression"))
            lines.append(f"  {k}: {v:.2f}" + (f"  ({unit})" if is_score else ""))
        else:
            lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def main(args) -> int:
    from celldino.data.datasets import DatasetError

    from celldino import dist as _dist
    from .inputs import dataset_spec
    from .linear import evaluate_linear

    is_main = setup(args)
    model = load_model(args)
    if model is None:
        return 1
    try:
        tests = [dataset_spec(t) for t in args.test_datasets] if args.test_datasets else None
        names = {"train": args.train_dataset, "val": args.val_dataset}
        for i, t in enumerate(args.test_datasets or []):
            names[f"test{i}"] = t
        results = evaluate_linear(
            model, dataset_spec(args.train_dataset), dataset_spec(args.val_dataset), test_datasets=tests,
            mode=args.mode, metric=args.metric, loss_type=args.loss_type, learning_rates=args.learning_rates,
            weight_decays=args.weight_decays, batch_size=args.batch_size, epochs=args.epochs,
            epoch_length=args.epoch_length, n_last_blocks=args.n_last_blocks, avgpool=args.avgpool,
            bag_of_channels=args.bag_of_channels, crop_size=args.crop_size, resize_size=args.resize_size,
            num_workers=args.num_workers, device=args.device, autocast_dtype=autocast_arg(args),
            output_dir=args.output_dir, resume=not args.no_resume,
            save_checkpoint_frequency=args.save_checkpoint_frequency,
            eval_period_iterations=args.eval_period_iterations, leave_one_out_dataset=args.leave_one_out_dataset,
            sklearn_probe=args.sklearn, dataset_names=names, seed=args.seed, cache_dir=args.cache_dir,
            progress=not args.no_progress)
    except (DatasetError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"celldino eval linear: {exc}", file=sys.stderr)
        return 1
    if is_main:
        print(format_results(results))
        print(f"results appended to {os.path.join(args.output_dir, 'results_eval_linear.json')}")
    _dist.barrier()
    return 0
