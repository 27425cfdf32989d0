"""`celldino eval knn`: the reference kNN protocol on a checkpoint (reference_spec.md §6.2).

    celldino eval knn --checkpoint teacher_checkpoint.pth --output-dir out/knn \
        --train-dataset "HPAone:split=TRAIN:mode=PROTEIN_LOCALIZATION:root=/data/HPAone" \
        --val-dataset "HPAone:split=VAL:mode=PROTEIN_LOCALIZATION:root=/data/HPAone" \
        --metric mean_per_class_multilabel_f1 --nb-knn 10 20

Features: L2-normalised final CLS (bag of channels: channel-concatenated last-block CLS, + patch means with
--avgpool), center-cropped eval transform. Results are appended to <output-dir>/results_eval_knn.json as JSON lines
with the reference's names ("<dataset>_<k> Top 1": score x 100).
"""
from __future__ import annotations

import os
import sys

from ._cli import add_model_arguments, autocast_arg, load_model, setup


def add_arguments(parser):
    parser.add_argument("--train-dataset", required=True, help="dataset string, folder or .csv of the train set")
    parser.add_argument("--val-dataset", required=True, help="dataset string, folder or .csv of the evaluated set")
    parser.add_argument("--test-dataset", default=None, help="a second evaluated set (kNN chooses nothing on val, "
                        "so val and test are simply both reported)")
    parser.add_argument("--output-dir", required=True, help="where results_eval_knn.json is appended")
    parser.add_argument("--nb-knn", "--nb_knn", dest="nb_knn", type=int, nargs="+", default=[10, 20],
                        help="numbers of neighbours (default 10 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="softmax voting temperature (default 0.07)")
    parser.add_argument("--metric", "--metric-type", dest="metric", default=None,
                        help="multiclass_f1 | multilabel_f1 | accuracy (or the reference names "
                             "mean_per_class_multiclass_f1, ...); default: multilabel_f1 for multi-hot labels, "
                             "multiclass_f1 otherwise")
    parser.add_argument("--avgpool", action="store_true",
                        help="append the average patch token to the CLS token (per channel in bag-of-channels mode, "
                             "as the reference; outside it the reference ignores the flag)")
    parser.add_argument("--voting", choices=["per_k", "reference"], default="per_k",
                        help="per_k (default): softmax over the first k neighbours for each k; reference: softmax "
                             "over the top max(nb_knn) once, then the first k summed (the reference's quirk)")
    parser.add_argument("--n-per-class-list", type=float, nargs="+", default=[-1],
                        help="few-shot: train samples per class (n >= 1) or fraction (< 1); -1 = all (default)")
    parser.add_argument("--n-tries", type=int, default=1, help="few-shot: random subsets per n (default 1)")
    parser.add_argument("--leave-one-out-dataset", default=None,
                        help="CHAMMI enriched_meta.csv: leave-one-out over HPA Task_three cell types / CP Task_four "
                             "plates, scored on labels 4, 5, 6 (as the reference)")
    add_model_arguments(parser, crop_default=384, batch_default=256)


def main(args) -> int:
    from celldino.data.datasets import DatasetError

    from celldino import dist as _dist
    from .knn import evaluate_knn

    is_main = setup(args)
    model = load_model(args)
    if model is None:
        return 1
    names = {"train": args.train_dataset, "val": args.val_dataset, "test": args.test_dataset}
    try:
        # evaluate_knn reads folders / .csv files / dataset strings itself; the names keep the user's spelling
        out = evaluate_knn(
            model, args.train_dataset, args.val_dataset, test_dataset=args.test_dataset, nb_knn=args.nb_knn,
            temperature=args.temperature, metric=args.metric, batch_size=args.batch_size,
            num_workers=args.num_workers, device=args.device, autocast_dtype=autocast_arg(args),
            bag_of_channels=args.bag_of_channels, avgpool=args.avgpool, crop_size=args.crop_size,
            resize_size=args.resize_size, n_per_class_list=[int(n) if n >= 1 else n for n in args.n_per_class_list],
            n_tries=args.n_tries, voting=args.voting, dataset_names={k: v for k, v in names.items() if v},
            cache_dir=args.cache_dir, progress=not args.no_progress,
            leave_one_out_dataset=args.leave_one_out_dataset, output_dir=args.output_dir)
    except (DatasetError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"celldino eval knn: {exc}", file=sys.stderr)
        return 1
    if is_main:
        print(format_results(out, args))
    _dist.barrier()
    return 0


def format_results(out: dict, args) -> str:
    """The console summary: scores, the per-class table of the largest k, where the results went."""
    from .metrics import format_report

    lines = [f"kNN ({out['metric']}, T={args.temperature}, voting {args.voting}):"]
    lines += [f"  {k}: {v:.2f}" for k, v in out["results"].items()]
    for split, rows in out["report"].items():
        lines.append(f"per-class report on {split} (k = {max(args.nb_knn)}):\n{format_report(rows)}")
    lines.append(f"results appended to {os.path.join(args.output_dir, 'results_eval_knn.json')}")
    return "\n".join(lines)
