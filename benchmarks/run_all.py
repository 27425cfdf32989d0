"""Run every benchmark (or the named ones) against its baselines in the same run, write CSVs and REPORT.md.

    python -m benchmarks.run_all [names...] [--quick] [--results-dir DIR]
    celldino bench [names...]

On CPU each benchmark runs small sizes so it never rots; on a GPU the real DINOv2 / Cell-DINO shapes.
"""
import argparse
import importlib
import sys
import traceback

import torch

from . import common

BENCHMARKS = ["attention", "sinkhorn", "koleo", "data", "augment", "knn", "train"]


def add_arguments(parser):
    parser.add_argument("names", nargs="*", default=[], help=f"benchmarks to run (default all: {BENCHMARKS})")
    parser.add_argument("--quick", action="store_true", help="smallest sizes only (CPU default)")
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--no-report", action="store_true", help="skip writing REPORT.md")
    for name in BENCHMARKS:  # each benchmark's own options (prefixed with its name, e.g. --attn-layouts)
        try:
            module = importlib.import_module(f"{__package__}.bench_{name}")
        except ImportError:
            continue  # reported when run
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(f"{name} benchmark"))


def main(args):
    names = args.names or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        args.quick = True
    failures = []
    for name in names:
        try:
            module = importlib.import_module(f"{__package__}.bench_{name}")
        except ImportError as exc:
            print(f"[{name}] not available: {exc}", file=sys.stderr)
            failures.append(name)
            continue
        print(f"[{name}] running on {common.device_name()} ...", flush=True)
        try:
            rows = module.run(args)
        except Exception:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            failures.append(name)
            continue
        path = common.write_csv(name, rows, args.results_dir)
        print(f"[{name}] {len(rows)} rows -> {path}")
    if not args.no_report:
        from . import report
        print(f"report -> {report.write_report(args.results_dir)}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
