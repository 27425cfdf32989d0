"""benchmarks.run_all: a benchmark stopped by a time limit (SIGTERM) or failing part-way still leaves the rows it
measured, marked partial; the benchmarks after a failure still run."""
import argparse
import csv
import os
import signal
import sys
import types

from celldino.benchmarks import common, run_all


def fake_bench(monkeypatch, name, behaviour):
    module = types.ModuleType(f"celldino.benchmarks.bench_{name}")

    def run(args):
        rows = [common.row(name, "op", "baseline", "s", "float32", "fwd", (1.0, 0.9, 1.1))]
        behaviour()
        return rows + [common.row(name, "op", "fast", "s", "float32", "fwd", (0.5, 0.4, 0.6), baseline_ms=1.0)]

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)


def read(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def args_for(tmp_path, names):
    return argparse.Namespace(names=names, quick=True, results_dir=str(tmp_path), no_report=True)


def test_sigterm_writes_the_measured_rows_and_stops(monkeypatch, tmp_path):
    monkeypatch.setattr(run_all, "BENCHMARKS", ["stopped", "later"])
    fake_bench(monkeypatch, "stopped", lambda: os.kill(os.getpid(), signal.SIGTERM))
    fake_bench(monkeypatch, "later", lambda: None)
    assert run_all.main(args_for(tmp_path, ["stopped", "later"])) == 1
    rows = read(tmp_path / "stopped.csv")
    assert [r["provider"] for r in rows] == ["baseline"] and rows[0]["note"] == "partial run (stopped)"
    assert not (tmp_path / "later.csv").exists()  # a stop ends the whole run
    assert signal.getsignal(signal.SIGTERM) is not run_all._stop  # handler restored


def test_failure_keeps_partial_rows_and_runs_the_rest(monkeypatch, tmp_path):
    monkeypatch.setattr(run_all, "BENCHMARKS", ["broken", "fine"])

    def boom():
        raise ValueError("out of memory, say")

    fake_bench(monkeypatch, "broken", boom)
    fake_bench(monkeypatch, "fine", lambda: None)
    assert run_all.main(args_for(tmp_path, ["broken", "fine"])) == 1
    assert [(r["provider"], r["note"]) for r in read(tmp_path / "broken.csv")] == [("baseline", "partial run (failed)")]
    fine = read(tmp_path / "fine.csv")
    assert [r["provider"] for r in fine] == ["baseline", "fast"] and float(fine[1]["speedup_vs_baseline"]) == 2.0
