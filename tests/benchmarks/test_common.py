"""benchmarks.common: medians and percentiles from the data (no extrapolation), slow GPU calls still get several
timed runs (do_bench replaced by a fake that counts runs the way do_bench does), few runs are said in the note,
speed-ups filled in once a baseline arrives; the shared helpers of the bench_*.py modules (thread count, wall-clock
timing, printed rows, the provider loop of the kernel benchmarks)."""
import math

import pytest
import torch
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


def test_num_threads_sets_and_restores_the_count_even_on_an_error():
    before = torch.get_num_threads()
    with common.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), common.num_threads(1):
        raise RuntimeError("a failing row")
    assert torch.get_num_threads() == before
    with common.num_threads(None):  # None: left as it is
        assert torch.get_num_threads() == before


def test_wall_timing_warms_up_once_and_takes_the_true_median():
    now = [0.0]
    durations = iter([0.009, 0.004, 0.001, 0.003, 0.002])  # s: one warm-up call, then four timed ones

    def fn():
        now[0] += next(durations)

    timing = common.wall_timing(fn, 4, clock=lambda: now[0])
    assert timing[0] == pytest.approx(2.5) and timing.runs == 4  # the warm-up's 9 ms is not counted
    assert (timing[1], timing[2]) == pytest.approx((1.6, 3.4))


def test_printed_row_prints_its_line_and_rate_line_reads_the_row(capsys):
    common.ROWS_MADE.clear()
    made = common.printed_row(lambda r: common.rate_line("t s p", r, "1 thread"), "t", "op", "p", "s", "uint16", "m",
                              (250.0, 250.0, 250.0), items=2, baseline="p", baseline_ms=500.0)
    assert common.ROWS_MADE == [made]
    assert capsys.readouterr().out == "  t s p: 8.0 img/s x2.0 1 thread\n"
    skipped = common.row("t", "op", "p", "s", "uint16", "m", (math.nan,) * 3, note="skipped: no GPU")
    assert common.rate_line("t s p", skipped, "skipped: no GPU") == "  t s p: skipped img/s  skipped: no GPU"
    common.ROWS_MADE.clear()


def test_time_providers_speedups_vs_the_named_baseline_wherever_it_runs(monkeypatch, capsys):
    medians = {"fast": 1.0, "base": 4.0, "slow": 8.0}
    monkeypatch.setattr(common, "bench", lambda call, device=None, **reps: common.Timing(*[call()] * 3, runs=10))
    monkeypatch.setattr(common, "peak_extra_memory_mb", lambda call, device=None: 3.0)
    providers = [(name, lambda name=name: medians[name]) for name in ("fast", "base", "slow")]
    rows = common.time_providers("t 4x4 float32", providers, lambda fn: fn, "cpu", bench_name="t", op="op",
                                 shape="4x4", dtype=torch.float32, mode="fwd", baseline="base", flops=8e9, note="n")
    assert [r["provider"] for r in rows] == ["fast", "base", "slow"]
    assert [r["speedup_vs_baseline"] for r in rows] == [4.0, 1.0, 0.5]  # "fast" ran before its baseline
    assert all(r["baseline"] == "base" and r["peak_mem_mb"] == 3.0 and r["note"] == "n" for r in rows)
    assert [r["tflops"] for r in rows] == [8.0, 2.0, 1.0] and rows[0]["dtype"] == "float32"
    assert capsys.readouterr().out == "  t 4x4 float32: fast 1.0 ms, base 4.0 ms, slow 8.0 ms\n"
    common.ROWS_MADE.clear()
