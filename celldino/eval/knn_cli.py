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

import json
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

    from . import _dist
    from .features import extract_features, patch_size_of
    from .inputs import dataset_spec, make_eval_dataset, require_several_classes, share_label_space, warn_if_crop_pads
    from .knn import evaluate_knn, knn_leave_one_out
    from .linear import read_leave_one_out_groups
    from .metrics import default_metric_and_loss, format_report, parse_metric_type

    is_main = setup(args)
    model = load_model(args)
    if model is None:
        return 1
    try:
        if args.metric is not None:
            parse_metric_type(args.metric)
        specs = {"train": dataset_spec(args.train_dataset), "val": dataset_spec(args.val_dataset)}
        if args.test_dataset:
            specs["test"] = dataset_spec(args.test_dataset)
        datasets = {k: make_eval_dataset(v, crop_size=args.crop_size, resize_size=args.resize_size)
                    for k, v in specs.items()}
        share_label_space(datasets["train"], datasets["val"], datasets.get("test"))
        require_several_classes(datasets["train"], f"--train-dataset {args.train_dataset}")
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"celldino eval knn: {exc}", file=sys.stderr)
        return 1
    if is_main:
        warn_if_crop_pads(datasets["train"], args.crop_size, args.resize_size,
                          multiple_of=(patch_size_of(model) or (1,))[0])
    names = {"train": args.train_dataset, "val": args.val_dataset, "test": args.test_dataset}
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results_eval_knn.json")
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                  autocast_dtype=autocast_arg(args), progress=not args.no_progress)
    try:
        if args.leave_one_out_dataset:
            feats = {}
            for split in ("train", "val"):
                cache = None if args.cache_dir is None else os.path.join(args.cache_dir, split)
                feats[split] = extract_features(model, datasets[split], kind="knn", avgpool=args.avgpool,
                                                bag_of_channels=args.bag_of_channels, cache_dir=cache,
                                                desc=f"features {split}", **common)
            groups = read_leave_one_out_groups(args.leave_one_out_dataset, len(feats["val"]))
            scores = knn_leave_one_out(feats["train"].features, feats["train"].labels, feats["val"].features,
                                       feats["val"].labels, groups, args.nb_knn, args.temperature,
                                       score_labels=[4, 5, 6], voting=args.voting, device=args.device,
                                       normalize=False)
            results = {f"{names['val']}_{k} Top 1": 100.0 * v for k, v in scores.items()}
            metric, report = "leave-one-out macro F1 over labels 4, 5, 6", None
        else:
            train = datasets["train"]
            targets = train.get_targets() if hasattr(train, "get_targets") else None
            metric, _ = default_metric_and_loss(targets, args.metric)
            n_per_class = [int(n) if n >= 1 else n for n in args.n_per_class_list]
            out = evaluate_knn(model, datasets["train"], datasets["val"], test_dataset=datasets.get("test"),
                               nb_knn=args.nb_knn, temperature=args.temperature, metric=metric,
                               bag_of_channels=args.bag_of_channels, avgpool=args.avgpool,
                               n_per_class_list=n_per_class, n_tries=args.n_tries, voting=args.voting,
                               dataset_names={k: v for k, v in names.items() if v}, cache_dir=args.cache_dir,
                               **common)
            results, metric, report = out["results"], out["metric"], out["report"]
    except (ValueError, TypeError, DatasetError) as exc:
        print(f"celldino eval knn: {exc}", file=sys.stderr)
        return 1
    if is_main:
        with open(results_path, "a") as f:
            for k, v in results.items():
                f.write(json.dumps({k: v}) + "\n")
        print(f"kNN ({metric}, T={args.temperature}, voting {args.voting}):")
        for k, v in results.items():
            print(f"  {k}: {v:.2f}")
        if report:
            for split, rows in report.items():
                print(f"per-class report on {split} (k = {max(args.nb_knn)}):\n{format_report(rows)}")
        print(f"results appended to {results_path}")
    _dist.barrier()
    return 0
