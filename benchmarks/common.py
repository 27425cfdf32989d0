"""Shared benchmark harness: timing, environment facts, CSV rows.

Every bench_*.py module exposes `run(args) -> list[dict]` where each dict is one measured row built with `row()`,
and `add_arguments(parser)` for its own options. `run_all.py` runs them, writes
`benchmarks/results/<name>.csv` and the markdown report. Baselines are always timed in the same run as the
thing they are compared with; speed-ups are ratios of those same-run medians.
"""
import csv
import datetime as _dt
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from celldino.files import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = ["bench", "op", "provider", "shape", "dtype", "mode", "median_ms", "p20_ms", "p80_ms",
           "tflops", "gbps", "items_per_s", "peak_mem_mb", "speedup_vs_baseline", "baseline", "device",
           "torch", "triton", "commit", "date", "note"]

# bf16 dense peak TFLOP/s, torchtitan's table (tools/utils.py get_peak_flops), for MFU.
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0}


def device_name(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_tflops(device=None):
    """bf16 dense peak of this GPU per the torchtitan table; None on CPU or an unknown GPU."""
    name = device_name(device)
    if name.startswith("cpu"):
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name and (key != "H100" or "PCIe" not in name):
            return PEAK_BF16_TFLOPS[key]
    return None


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


def bench(fn, warmup=3, rep=10, device=None):
    """Median / p20 / p80 wall time in ms of `fn()` (CUDA-synchronised on GPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def peak_memory_mb(fn, device=None):
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
    """One CSV row (also recorded in ROWS_MADE); throughput columns are derived from the median time."""
    med, p20, p80 = timing
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
