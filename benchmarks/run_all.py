"""Run every benchmark (or the named ones) against its baselines in the same run, write CSVs and REPORT.md.

    python -m benchmarks.run_all [names...] [--quick] [--results-dir DIR]
    celldino bench [names...]

On CPU each benchmark runs small sizes so it never rots; on a GPU the real DINOv2 / Cell-DINO shapes.
"""
import argparse
import importlib
import signal
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


class Stopped(BaseException):
    """SIGTERM (a time limit, a scheduler) while a benchmark runs: the rows measured so far are still written."""


def _stop(signum, frame):
    raise Stopped(f"signal {signum}")


def _write_partial(name, args, why):
    """Rows a benchmark made before it stopped, each noted as partial; None when it made none."""
    rows = [dict(r, note=f"{r['note']}; partial run ({why})".lstrip("; ")) for r in common.ROWS_MADE]
    return common.write_csv(name, rows, args.results_dir) if rows else None


def main(args):
    names = args.names or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        args.quick = True
    failures = []
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        _run_each(names, args, failures)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not args.no_report:
        from . import report
        print(f"report -> {report.write_report(args.results_dir)}")
    return 1 if failures else 0


def _run_each(names, args, failures):
    for name in names:
        try:
            module = importlib.import_module(f"{__package__}.bench_{name}")
        except ImportError as exc:
            print(f"[{name}] not available: {exc}", file=sys.stderr)
            failures.append(name)
            continue
        print(f"[{name}] running on {common.device_name()} ...", flush=True)
        common.ROWS_MADE.clear()
        try:
            rows = module.run(args)
        except Stopped as stop:  # write what was measured, run nothing more
            failures.append(name)
            print(f"[{name}] stopped ({stop}); partial rows -> {_write_partial(name, args, 'stopped')}", flush=True)
            return
        except Exception:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            failures.append(name)
            print(f"[{name}] failed; partial rows -> {_write_partial(name, args, 'failed')}", flush=True)
            continue
        path = common.write_csv(name, rows, args.results_dir)
        print(f"[{name}] {len(rows)} rows -> {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
