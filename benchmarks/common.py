"""Shared benchmark harness: timing, environment facts, CSV rows.

Every bench_*.py module exposes `run(args) -> list[dict]` where each dict is one measured row built with `row()`,
and `add_arguments(parser)` for its own options. `run_all.py` runs them, writes
`benchmarks/results/<name>.csv` and the markdown report. Baselines are always timed in the same run as the
thing they are compared with; speed-ups are ratios of those same-run medians.
"""
import csv
import datetime as _dt
import math
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from celldino.files import atomic_write
from celldino.hardware import device_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = ["bench", "op", "provider", "shape", "dtype", "mode", "median_ms", "p20_ms", "p80_ms",
           "tflops", "gbps", "items_per_s", "peak_mem_mb", "speedup_vs_baseline", "baseline", "device",
           "torch", "triton", "commit", "date", "note"]

def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:  # noqa: BLE001 - benchmarks also run outside a checkout
        return "unknown"


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001
        return "none"


TRITON_UNAVAILABLE = "triton needs CUDA (or TRITON_INTERPRET=1 set before import)"


def triton_kernels_run_on(device):
    """Whether celldino's Triton kernels can run on `device`: triton imports, and the device is CUDA or the Triton
    CPU interpreter was enabled (TRITON_INTERPRET=1 before celldino.kernels is imported). Else: TRITON_UNAVAILABLE."""
    from celldino.kernels import _dispatch
    return _dispatch.triton_available() and (torch.device(device).type == "cuda" or _dispatch.interpreting())


def with_triton_provider(references, triton_fn, device):
    """(providers, note) of a kernel benchmark: the plain-torch `references` [(name, fn)], then ("triton",
    triton_fn) when `triton_kernels_run_on(device)`; note is "" then, else why the rows are references only.
    Shared by bench_koleo and bench_sinkhorn so both pick and label their providers the same way."""
    providers = list(references)
    if triton_kernels_run_on(device):
        return providers + [("triton", triton_fn)], ""
    only = "reference only" if len(providers) == 1 else "references only"
    return providers, f"{TRITON_UNAVAILABLE}; {only}"


def reps_for(device):
    """bench() repetitions: the defaults on a GPU, a cheap smoke run (1 warm-up, 3 timed) on the CPU."""
    return {} if torch.device(device).type == "cuda" else {"warmup": 1, "rep": 3}


# a timing from fewer runs than this says how many in its row's note
FEW_RUNS = 5
# on a GPU every bench() call gets at least this many timed runs while that fits in MAX_CUDA_REP_MS of timed calls
MIN_CUDA_RUNS = 10
MAX_CUDA_REP_MS = 10_000.0


class Timing(tuple):
    """(median, p20, p80) ms; unpacks and indexes like the plain triple. `.runs`: how many timed runs the
    numbers come from (None: not known)."""

    def __new__(cls, median, p20, p80, runs=None):
        made = super().__new__(cls, (median, p20, p80))
        made.runs = runs
        return made


def summarize(times_ms):
    """Timing of a list of per-run times: the true median (mean of the two middle runs for an even count) and
    p20 / p80 interpolated inside the data (statistics' inclusive method: the default exclusive one extrapolates
    beyond the fastest / slowest run when there are few)."""
    times = sorted(float(t) for t in times_ms)
    if not times:
        raise ValueError("no timed runs")
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7], len(times))


def cuda_rep_ms(estimate_ms, rep_ms=100.0, min_runs=MIN_CUDA_RUNS, max_rep_ms=MAX_CUDA_REP_MS):
    """do_bench's time budget for the timed runs (`rep`, ms) of a call taking about `estimate_ms`: its default
    (100 ms) for fast calls; for slow ones enough for `min_runs` runs (do_bench makes int(rep / its own estimate)
    runs: one run of a call over 100 ms), but no more than `max_rep_ms` (then fewer runs, noted in the row)."""
    wanted = (min_runs + 0.5) * max(float(estimate_ms), 0.0)  # + 0.5: do_bench's estimate also clears L2
    return max(rep_ms, min(wanted, max_rep_ms))


def _cuda_estimate_ms(fn):
    """One call's CUDA-event time, after one untimed call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _cuda_bench(fn):
    import triton.testing
    rep = cuda_rep_ms(_cuda_estimate_ms(fn))
    try:
        times = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="all")
    except AssertionError:  # an older Triton without return_mode="all": its quantiles, run count not known
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    return summarize(times)


def bench(fn, warmup=3, rep=10, device=None):
    """Timing (median / p20 / p80 wall time in ms, and the number of timed runs) of `fn()`: on a GPU CUDA events
    through triton's do_bench (L2 cleared before each run) with at least MIN_CUDA_RUNS runs where they fit in
    MAX_CUDA_REP_MS (`warmup` / `rep` are for the CPU); on the CPU `warmup` untimed then `rep` timed calls."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return _cuda_bench(fn)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


def wall_timing(fn, rep, sync=False, clock=time.perf_counter):
    """Timing of `rep` wall-clock timed calls of fn() after one warm-up call, CUDA synchronised around each call when
    `sync`. For calls whose host work is part of the cost (a DALI pipeline, a data loader) or that take seconds
    (kNN at full size): do_bench's CUDA events, L2 clearing and extra runs do not fit those. `clock` is for tests."""
    fn()
    times = []
    for _ in range(rep):
        if sync:
            torch.cuda.synchronize()
        start = clock()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((clock() - start) * 1e3)
    return summarize(times)


@contextmanager
def num_threads(n):
    """torch's intra-op thread count set to `n` inside the block (None: left as it is), the previous count restored
    after it, even on an error: a 1-thread row (one DataLoader worker's core) must not leave the next on 1 thread."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def cpu_denormals_flushed(device):
    """On the CPU, float denormals flushed to zero inside the block, and not after it (the default; torch has no
    getter to read the previous setting). Tiny LayerScale (1e-5) gradients and updates underflow to fp32
    denormals, which x86 CPUs process ~100x slower (GPUs do not): flushed, CPU rows time the code, not denormal
    stalls, for every provider alike."""
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on_cpu:
            torch.set_flush_denormal(False)


def peak_extra_memory_mb(fn, device=None):
    """Peak extra CUDA memory of one `fn()` call in MB (None on CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# every row made since the last reset, so run_all can still write what a benchmark measured when it is stopped
# (a time limit's SIGTERM) or fails part-way
ROWS_MADE = []


def row(bench_name, op, provider, shape, dtype, mode, timing, *, flops=None, bytes_moved=None, items=None,
        peak_mem_mb=None, baseline=None, baseline_ms=None, device=None, note=""):
    """One CSV row (also recorded in ROWS_MADE); throughput columns are derived from the median time. A Timing
    from fewer than FEW_RUNS runs says how many in the note. Make each row as soon as its provider is measured (a
    stop then keeps it); speed-ups of rows made before their baseline: fill_speedups."""
    med, p20, p80 = timing
    runs = getattr(timing, "runs", None)
    if runs is not None and runs < FEW_RUNS:
        note = "; ".join(x for x in (note, f"{runs} timed run{'s' if runs != 1 else ''}") if x)
    made = {
        "bench": bench_name, "op": op, "provider": provider, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "mode": mode, "median_ms": round(med, 4), "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
        "tflops": round(flops / med / 1e9, 3) if flops else "",
        "gbps": round(bytes_moved / med / 1e6, 3) if bytes_moved else "",
        "items_per_s": round(items / med * 1e3, 2) if items else "",
        "peak_mem_mb": round(peak_mem_mb, 1) if peak_mem_mb is not None else "",
        "speedup_vs_baseline": round(baseline_ms / med, 3) if baseline_ms else "",
        "baseline": baseline or "",
        "device": device_name(device), "torch": torch.__version__, "triton": _triton_version(),
        "commit": _git_commit(), "date": _dt.datetime.now().isoformat(timespec="seconds"), "note": note,
    }
    ROWS_MADE.append(made)
    return made


def printed_row(line, *args, **kwargs):
    """row(*args, **kwargs), printed at once as `line(row)`: the console shows each row as soon as it is measured,
    so a long run's log tells how far it got."""
    made = row(*args, **kwargs)
    print(line(made), flush=True)
    return made


def rate_line(label, made, note=""):
    """'  <label>: <images/s or skipped> img/s [x<speed-up>] <note>': the console line of a throughput row
    (bench_augment, bench_data); `note` is the caller's own part of the row's note."""
    speedup = f"x{made['speedup_vs_baseline']}" if made["speedup_vs_baseline"] else ""
    return f"  {label}: {made['items_per_s'] or 'skipped'} img/s {speedup} {note}"


def time_providers(label, providers, call_of, device, *, bench_name, op, shape, dtype, mode, baseline, **row_kwargs):
    """The rows of one shape of a kernel benchmark (bench_koleo, bench_sinkhorn): each (name, fn) of `providers`
    timed on `call_of(fn)` (bench with reps_for(device)) and its peak extra memory measured, its row made at once
    (a stop keeps it); speed-ups vs the median of the provider named `baseline`, filled in for rows made before it.
    `row_kwargs` go to every row (flops, bytes_moved, note). Prints '  <label>: <provider> <median> ms, ...'."""
    rows, baseline_ms, before_baseline = [], None, []
    for name, fn in providers:
        call = call_of(fn)
        timing = bench(call, device=device, **reps_for(device))
        peak = peak_extra_memory_mb(call, device)
        if name == baseline:
            baseline_ms = timing[0]
            fill_speedups(before_baseline, baseline_ms)
        rows.append(row(bench_name, op, name, shape, dtype, mode, timing, peak_mem_mb=peak, baseline=baseline,
                        baseline_ms=baseline_ms, device=device, **row_kwargs))
        if baseline_ms is None:
            before_baseline.append(rows[-1])
    print(f"  {label}: " + ", ".join(f"{r['provider']} {r['median_ms']} ms" for r in rows), flush=True)
    return rows


def fill_speedups(rows, baseline_ms):
    """Set the speed-up of every row of `rows` that names a baseline, once that baseline's median is known (rows
    made before it was measured). The dicts are the ones ROWS_MADE holds, so a partial write has them too.
    Rows without a finite median (skipped) and a missing / non-finite baseline are left alone."""
    if not isinstance(baseline_ms, (int, float)) or not math.isfinite(baseline_ms) or baseline_ms <= 0:
        return rows
    for made in rows:
        med = made["median_ms"]
        if made.get("baseline") and isinstance(med, (int, float)) and math.isfinite(med) and med > 0:
            made["speedup_vs_baseline"] = round(baseline_ms / med, 3)
    return rows


def write_csv(name, rows, results_dir=None):
    """Write rows to <results_dir>/<name>.csv atomically; returns the path."""
    path = Path(results_dir or RESULTS_DIR) / f"{name}.csv"  # atomic_write creates the directory

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for item in rows:
                writer.writerow({key: item.get(key, "") for key in COLUMNS})
    return atomic_write(path, write)
