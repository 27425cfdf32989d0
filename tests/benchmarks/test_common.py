"""benchmarks.common: medians and percentiles from the data (no extrapolation), slow GPU calls still get several
timed runs (do_bench replaced by a fake that counts runs the way do_bench does), few runs are said in the note,
speed-ups filled in once a baseline arrives."""
import math

import pytest
import triton.testing

from celldino.benchmarks import common


def test_summarize_true_median_and_percentiles_inside_the_data():
    t = common.summarize([4.0, 1.0, 3.0, 2.0])
    assert t[0] == 2.5 and t.runs == 4  # the mean of the two middle runs, not the upper-middle one (3)
    med, p20, p80 = common.summarize([3.0, 1.0, 2.0])
    assert (med, p20, p80) == pytest.approx((2.0, 1.4, 2.6))  # exclusive quantiles would give 0.8 / 3.2
    assert tuple(common.summarize([7.0])) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="no timed runs"):
        common.summarize([])


def test_cpu_bench_counts_its_runs_and_a_row_says_when_they_are_few():
    calls = []
    timing = common.bench(lambda: calls.append(1), warmup=2, rep=3, device="cpu")
    assert len(calls) == 5 and timing.runs == 3 and timing[1] <= timing[0] <= timing[2]
    few = common.row("t", "op", "p", "s", "float32", "fwd", timing, note="base note")
    assert few["note"] == "base note; 3 timed runs"
    many = common.row("t", "op", "p", "s", "float32", "fwd", common.Timing(1.0, 1.0, 1.0, common.FEW_RUNS))
    plain = common.row("t", "op", "p", "s", "float32", "fwd", (1.0, 1.0, 1.0))
    assert many["note"] == "" and plain["note"] == ""


def _fake_do_bench(calls, all_supported=True):
    """do_bench's run-count rule, n = max(1, int(rep / estimate)), with every call taking `estimate` ms."""
    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        calls.append(rep)
        if return_mode == "all" and not all_supported:
            raise AssertionError  # an old Triton's check of return_mode
        n = max(1, int(rep / do_bench.estimate))
        times = [do_bench.estimate] * n
        return times if quantiles is None else [do_bench.estimate] * len(quantiles)
    return do_bench


@pytest.mark.parametrize("estimate_ms, expect_runs", [(0.05, 2000), (250.0, common.MIN_CUDA_RUNS), (4000.0, 2)])
def test_gpu_bench_gives_slow_calls_several_runs(monkeypatch, estimate_ms, expect_runs):
    calls = []
    fake = _fake_do_bench(calls)
    fake.estimate = estimate_ms
    monkeypatch.setattr(common, "_cuda_estimate_ms", lambda fn: estimate_ms)
    monkeypatch.setattr(triton.testing, "do_bench", fake)
    timing = common.bench(lambda: None, device="cuda")
    assert calls == [common.cuda_rep_ms(estimate_ms)]
    assert timing.runs == expect_runs  # a 250 ms call: 10 runs (the plain rep=100 gave one)
    note = common.row("t", "op", "p", "s", "float32", "fwd", timing)["note"]
    assert note == ("2 timed runs" if expect_runs == 2 else "")  # capped at MAX_CUDA_REP_MS: few, and said


def test_gpu_bench_on_a_triton_without_return_mode_all(monkeypatch):
    calls = []
    fake = _fake_do_bench(calls, all_supported=False)
    fake.estimate = 1.0
    monkeypatch.setattr(common, "_cuda_estimate_ms", lambda fn: 1.0)
    monkeypatch.setattr(triton.testing, "do_bench", fake)
    timing = common.bench(lambda: None, device="cuda")
    assert tuple(timing) == (1.0, 1.0, 1.0) and timing.runs is None and len(calls) == 2


def test_cuda_rep_budget():
    assert common.cuda_rep_ms(1.0) == 100.0  # fast calls: do_bench's default budget
    assert common.cuda_rep_ms(200.0) >= common.MIN_CUDA_RUNS * 200.0
    assert common.cuda_rep_ms(1e6) == common.MAX_CUDA_REP_MS


def test_fill_speedups_updates_the_recorded_rows():
    common.ROWS_MADE.clear()
    fast = common.row("t", "op", "fast", "s", "float32", "fwd", (0.5, 0.5, 0.5), baseline="base")
    skipped = common.row("t", "op", "skipped", "s", "float32", "fwd", (math.nan,) * 3, baseline="base")
    base = common.row("t", "op", "base", "s", "float32", "fwd", (1.0, 1.0, 1.0))  # names no baseline: left alone
    assert fast["speedup_vs_baseline"] == ""
    common.fill_speedups([fast, skipped, base], 1.0)
    assert common.ROWS_MADE[0]["speedup_vs_baseline"] == 2.0  # the same dict a partial write reads
    assert skipped["speedup_vs_baseline"] == "" and base["speedup_vs_baseline"] == ""
    common.fill_speedups([fast], math.nan)  # a failed baseline changes nothing
    assert fast["speedup_vs_baseline"] == 2.0
    common.ROWS_MADE.clear()
