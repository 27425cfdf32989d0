"""Run every benchmark (or the named ones) against its baselines in the same run, write CSVs and REPORT.md.

    python -m benchmarks.run_all [names...] [--quick] [--results-dir DIR]
    celldino bench [names...]

On CPU each benchmark runs small sizes so it never rots; on a GPU the real DINOv2 / Cell-DINO shapes.
"""
import argparse
import datetime as _dt
import importlib
import signal
import sys
import traceback
from pathlib import Path

import torch

from celldino.files import atomic_write_text

from . import common

BENCHMARKS = ["attention", "sinkhorn", "koleo", "data", "augment", "knn", "optim", "train"]


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


def _failed_marker(name, args):
    from .report import FAILED_SUFFIX
    return Path(args.results_dir) / f"{name}{FAILED_SUFFIX}"


def _write_rows(name, args, rows):
    """<name>.csv, and no `<name>.failed` marker (the rows are this run's)."""
    path = common.write_csv(name, rows, args.results_dir)
    _failed_marker(name, args).unlink(missing_ok=True)
    return path


def _write_partial(name, args, why, detail=""):
    """Rows a benchmark made before it stopped, each noted as partial; None when it made none: then an older
    <name>.csv stays but `<name>.failed` says the latest run measured nothing, so the report does not show that
    CSV as this run's."""
    rows = [dict(r, note=f"{r['note']}; partial run ({why})".lstrip("; ")) for r in common.ROWS_MADE]
    if rows:
        return _write_rows(name, args, rows)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    atomic_write_text(_failed_marker(name, args),
                      f"{why} before measuring any row ({stamp}){': ' + detail if detail else ''}\n")
    return None


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
            common.ROWS_MADE.clear()
            _write_partial(name, args, "failed", f"not importable: {exc}")
            continue
        print(f"[{name}] running on {common.device_name()} ...", flush=True)
        common.ROWS_MADE.clear()
        try:
            rows = module.run(args)
        except Stopped as stop:  # write what was measured, run nothing more
            failures.append(name)
            print(f"[{name}] stopped ({stop}); partial rows -> {_write_partial(name, args, 'stopped', str(stop))}",
                  flush=True)
            return
        except Exception as exc:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            failures.append(name)
            why = f"{type(exc).__name__}: {exc}"[:300]
            print(f"[{name}] failed; partial rows -> {_write_partial(name, args, 'failed', why)}", flush=True)
            continue
        path = _write_rows(name, args, rows)
        print(f"[{name}] {len(rows)} rows -> {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
