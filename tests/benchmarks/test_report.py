"""benchmarks.report: table cells escape `|`, the section header names the GPU when any row ran on one, plot labels
keep rows of one provider apart, and a benchmark whose latest run measured nothing is not reported from an older
CSV."""
import argparse
import re
import sys
import types

from celldino.benchmarks import bench_knn, common, report, run_all


def _row(provider, device, note="", dtype="uint16", op="decode", mode="none", shape="4x64x64", median=1.0):
    return {"bench": "data", "op": op, "provider": provider, "shape": shape, "dtype": dtype, "mode": mode,
            "median_ms": median, "p20_ms": median, "p80_ms": median, "device": device, "torch": "2.x",
            "triton": "3.x", "commit": "abc1234", "date": "2026-01-01T00:00:00", "note": note}


def _cells(line):
    return re.split(r"(?<!\\)\|", line)[1:-1]


def test_table_escapes_pipes_and_heads_with_the_gpu_row(tmp_path):
    rows = [_row("tifffile", "cpu (x86_64, 16 cores, 16 threads)", "1 thread"),
            _row("dali_gpu", "NVIDIA H200", "max|out - ref| 1e-3; a|b")]
    common.write_csv("data", rows, tmp_path)
    text = report.write_report(tmp_path).read_text()
    assert "device: NVIDIA H200;" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| decode")]
    assert len(table) == 2 and all(len(_cells(ln)) == len(report.TABLE_COLUMNS) for ln in table)
    assert _cells(table[1])[-1].strip() == r"max\|out - ref\| 1e-3; a\|b"


def test_plot_labels_tell_apart_dtypes_and_note_fields():
    koleo = [_row(p, "gpu", dtype=d, op="koleo", mode="fwd", shape="16x384")
             for d in ("float32", "bfloat16") for p in ("reference", "triton")]
    augment = [_row("reference", "gpu", "1 thread", op="augment", mode="2x224+8x96"),
               _row("cpp", "gpu", "1 thread, fp32 out, batch 32", op="augment", mode="2x224+8x96"),
               _row("cpp", "gpu", "1 thread, bf16 out, batch 32", op="augment", mode="2x224+8x96")]
    rows = koleo + augment
    labels = report.plot_labels(rows)
    pairs = [(r["provider"], lab) for r, lab in zip(rows, labels)]
    assert len(set(pairs)) == len(rows)  # no bar hides another
    assert "float32" in labels[0] and "bfloat16" in labels[2]
    assert labels[4] == "augment | 4x64x64 | uint16 | 2x224+8x96"  # a single row keeps the plain label
    assert labels[5].endswith("| fp32 out") and labels[6].endswith("| bf16 out")


def _fake(monkeypatch, name, run):
    module = types.ModuleType(f"celldino.benchmarks.bench_{name}")
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_a_benchmark_that_measured_nothing_is_not_reported_from_an_older_csv(monkeypatch, tmp_path):
    monkeypatch.setattr(run_all, "BENCHMARKS", ["broken", "fine"])
    common.write_csv("broken", [_row("old_provider", "NVIDIA H200", "from an earlier run")], tmp_path)

    def boom(args):
        raise RuntimeError("extension missing")

    _fake(monkeypatch, "broken", boom)
    _fake(monkeypatch, "fine", lambda args: [common.row("fine", "op", "p", "s", "float32", "fwd", (1.0, 1.0, 1.0))])
    args = argparse.Namespace(names=["broken"], quick=True, results_dir=str(tmp_path), no_report=False)
    assert run_all.main(args) == 1
    text = (tmp_path / "REPORT.md").read_text()
    assert "old_provider" not in text and "extension missing" in text and "not from that run" in text
    assert (tmp_path / "broken.csv").exists()  # the older results are kept, just not shown as current
    # a later invocation (gpu_check.sh runs one per stage into the same directory) still does not show them
    assert run_all.main(argparse.Namespace(names=["fine"], quick=True, results_dir=str(tmp_path),
                                           no_report=False)) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "old_provider" not in text and "## fine" in text
    # once it measures again, it is reported
    _fake(monkeypatch, "broken", lambda args: [common.row("broken", "op", "new_provider", "s", "float32", "fwd",
                                                          (1.0, 1.0, 1.0))])
    assert run_all.main(args) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "new_provider" in text and "No rows" not in text and not (tmp_path / "broken.failed").exists()


def test_knn_shapes_help_lists_the_defaults_in_run_order():
    parser = argparse.ArgumentParser()
    bench_knn.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    shapes = bench_knn._shapes(argparse.Namespace(quick=False), on_gpu=True)
    assert " ".join("x".join(str(v) for v in s) for s in shapes) in help_text
