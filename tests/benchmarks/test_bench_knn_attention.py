"""bench_knn makes each provider's row as soon as it is measured (a SIGTERM after the first provider keeps that row;
speed-ups are filled in when the baseline arrives); bench_attention scopes FlexAttention's config change to flex."""
import argparse
import csv
import os
import signal

import torch._functorch.config as functorch_config

from celldino.benchmarks import bench_attention, bench_knn, run_all

SHAPE = ["3000x64x32x5"]


def _read(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_knn_stop_after_the_first_provider_keeps_its_row(monkeypatch, tmp_path):
    def stop(*a, **k):  # the second provider (the baseline) is killed by a time limit as it starts
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(bench_knn, "_reference_loop", stop)
    args = argparse.Namespace(names=["knn"], quick=True, results_dir=str(tmp_path), no_report=True, knn_shapes=SHAPE)
    assert run_all.main(args) == 1
    rows = _read(tmp_path / "knn.csv")
    assert [(r["provider"], r["dtype"]) for r in rows] == [("celldino", "float32")]
    assert float(rows[0]["median_ms"]) > 0 and rows[0]["speedup_vs_baseline"] == ""  # its baseline never came
    assert rows[0]["note"].startswith("recall@5 vs celldino fp32 1.0000") and rows[0]["note"].endswith(
        "partial run (stopped)")


def test_knn_rows_made_before_the_baseline_get_their_speedup():
    rows = bench_knn.run(argparse.Namespace(quick=True, knn_shapes=SHAPE))
    by = {r["provider"]: r for r in rows}
    assert list(by)[:2] == ["celldino", "reference_loop"] and "3 timed runs" in by["celldino"]["note"]
    base = by["reference_loop"]["median_ms"]
    for r in rows:  # speed-ups come from the unrounded medians: allow the rounding of the printed ones (4 decimals)
        ratio = base / r["median_ms"]
        slack = ratio * (5e-5 / base + 5e-5 / r["median_ms"]) + 5e-4
        assert abs(r["speedup_vs_baseline"] - ratio) <= slack, r


def test_flex_config_is_scoped_to_the_flex_provider(monkeypatch):
    """Buffer donation is off only while flex runs (the config is patched, never monkeypatched: undoing a
    monkeypatch of torch's config module hid the setting from every later compile in the process)."""
    with functorch_config.patch(donated_buffer=True):
        _check_flex_scope(monkeypatch)


def _check_flex_scope(monkeypatch):
    with bench_attention.provider_context("flex"):
        assert functorch_config.donated_buffer is False
    assert functorch_config.donated_buffer is True
    with bench_attention.provider_context("sdpa_per_group"):
        assert functorch_config.donated_buffer is True

    seen = []
    real_make = bench_attention._make_providers

    def make(names, lengths, heads, device, dtype):  # a CPU stand-in for flex that records the setting it runs under
        made, skipped = real_make(["sdpa_per_group"], lengths, heads, device, dtype)
        base = made["sdpa_per_group"]

        def flex(q, k, v):
            seen.append(functorch_config.donated_buffer)
            return base(q, k, v)
        made["flex"] = flex
        return made, skipped

    monkeypatch.setattr(bench_attention, "_make_providers", make)
    rows = bench_attention.run(argparse.Namespace(quick=True, attn_providers=["sdpa_per_group", "flex"]))
    assert {r["provider"] for r in rows} == {"sdpa_per_group", "flex"} and seen and not any(seen)
    assert functorch_config.donated_buffer is True  # later benchmarks in the process keep buffer donation
