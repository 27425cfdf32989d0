"""Where a training step's time goes: a few steps under torch.profiler, summarised (`bench_train --train-profile DIR`).

`profile_steps(step, batch, ...)` runs `warmup` + `active` more steps of `step(batch, iteration)` under
`torch.profiler.profile` (CPU activity, plus CUDA on a GPU; no shapes, no stacks, so the files stay small) and writes
into DIR, for one `tag` such as `celldino_B32`:

- `<tag>_trace.json.gz`: the Chrome trace of the active steps (open in https://ui.perfetto.dev or chrome://tracing);
  not written, with a message, when it is over `max_trace_mb` gzipped (a ViT-L step makes big traces);
- `<tag>_top.txt`: the key_averages table, top 40 rows by self device time (self CPU time on CPU);
- `<tag>_breakdown.csv`: `category, ms_per_step, percent` over the categories of `CATEGORIES`.

The breakdown counts each piece of work once: on a GPU the self time of every device-side event (kernels, memcpy,
memset; GPU user annotations such as `ProfilerStep#` excluded), on CPU the self CPU time of every op (so on CPU a
torch-written attention shows up as its matmuls and softmax, and Python overhead between ops as `other`).
"""
import csv
import gzip
import io
import os
from pathlib import Path

import torch

from celldino.files import atomic_write, atomic_write_text

# Kernel / op name -> coarse category. Ordered: the first category with a substring in the lower-cased name wins, so
# the specific entries come before the generic ones (celldino's Triton kernels and attention before the GEMMs, the
# inductor matmul templates `triton_tem_` before the other inductor kernels `triton_poi_/red_/per_`, copies before
# eager aten). To extend: add a substring (lower case) or a category here; `other` takes the rest.
CATEGORIES = (
    ("communication", ("nccl", "all_gather", "allgather", "reduce_scatter", "reducescatter", "all_reduce",
                       "allreduce", "c10d::")),
    ("celldino sinkhorn/koleo", ("_sk_", "_koleo_", "sinkhorn", "koleo")),  # kernels/sinkhorn.py, kernels/koleo.py
    ("attention", ("_attn_", "flash", "fmha", "sdpa", "scaled_dot_product", "attention")),  # _attn_: kernels/attention
    ("optimizer/EMA (foreach)", ("adam", "foreach", "multi_tensor_apply")),  # fused AdamW, foreach EMA, clipping, amp
    ("matmul/GEMM", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "triton_tem_", "aten::mm", "aten::addmm",
                     "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "convolution", "cudnn")),
    ("triton fused elementwise/norm", ("triton_",)),  # torch.compile (inductor) kernels
    ("copies/memset", ("memcpy", "memset", "copy", "aten::cat", "fill", "aten::zero_", "aten::clone")),
    ("eager elementwise/norm/reduction", ("at::native", "aten::", "elementwise", "reduce_kernel", "layer_norm",
                                          "softmax")),
)
OTHER = "other"
CATEGORY_NAMES = tuple(name for name, _ in CATEGORIES) + (OTHER,)
TOP_ROWS = 40


def classify(name):
    """The category of a kernel or op name (first match in CATEGORIES, else `other`)."""
    lowered = name.lower()
    for category, substrings in CATEGORIES:
        if any(s in lowered for s in substrings):
            return category
    return OTHER


def _is_device_event(evt):
    return evt.device_type != torch.autograd.DeviceType.CPU and not getattr(evt, "is_user_annotation", False)


def self_times_us(events, on_gpu):
    """[(name, self microseconds summed over the profiled steps)] counting each piece of work once (see module doc)."""
    if on_gpu:
        return [(e.key, e.self_device_time_total) for e in events if _is_device_event(e)]
    return [(e.key, e.self_cpu_time_total) for e in events if e.device_type == torch.autograd.DeviceType.CPU]


def breakdown(times_us, n_steps):
    """[(category, ms per step, percent)] for every category, largest first; percents sum to 100 (0 when idle)."""
    totals = dict.fromkeys(CATEGORY_NAMES, 0.0)
    for name, us in times_us:
        totals[classify(name)] += us
    grand = sum(totals.values())
    rows = [(c, us / 1e3 / n_steps, 100.0 * us / grand if grand > 0 else 0.0) for c, us in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def _write_trace(prof, path, max_trace_mb):
    """Chrome trace gzipped to `path`; None (and the file not written) when it is over max_trace_mb gzipped."""
    raw = f"{path}.tmp.json"
    try:
        prof.export_chrome_trace(raw)
        if hasattr(prof, "wait_for_exports"):  # newer torch may finish the export asynchronously
            prof.wait_for_exports()
        with open(raw, "rb") as fin:
            gzipped = gzip.compress(fin.read())
    finally:
        if os.path.exists(raw):
            os.remove(raw)
    size_mb = len(gzipped) / 2**20
    if max_trace_mb and size_mb > max_trace_mb:
        print(f"[train profile] {os.path.basename(path)} not written: {size_mb:.1f} MB gzipped > {max_trace_mb} MB "
              "(top/breakdown files written; raise --train-profile-trace-mb, 0 = no limit)", flush=True)
        return None
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(gzipped))


def _step_wall_ms(prof):
    """Mean wall time of the profiled steps (their ProfilerStep ranges on the host, each ending in a sync)."""
    spans = [e.cpu_time_total for e in prof.events()
             if e.name.startswith("ProfilerStep") and e.device_type == torch.autograd.DeviceType.CPU]
    return sum(spans) / len(spans) / 1e3 if spans else float("nan")


def profile_steps(step, batch, first_iteration, device, out_dir, tag, warmup=1, active=3, max_trace_mb=10.0):
    """Run warmup + active steps under the profiler, write the three files; returns a summary dict (see module doc)."""
    from torch.profiler import ProfilerActivity, profile, schedule
    on_gpu = device.type == "cuda"
    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
                 record_shapes=False, with_stack=False, profile_memory=False) as prof:
        for i in range(warmup + active):
            step(batch, first_iteration + i)
            if on_gpu:  # every step's kernels land inside its own ProfilerStep range
                torch.cuda.synchronize(device)
            prof.step()
    events = prof.key_averages()
    times = self_times_us(events, on_gpu)
    if not times:
        raise RuntimeError(f"profiler recorded no {'device' if on_gpu else 'CPU'} events for {tag}")
    rows = breakdown(times, active)
    wall_ms = _step_wall_ms(prof)
    kind = "self device" if on_gpu else "self CPU"
    busy_ms = sum(r[1] for r in rows)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["category", "ms_per_step", "percent"])
    writer.writerows([c, f"{ms:.4f}", f"{pct:.2f}"] for c, ms, pct in rows)
    breakdown_path = atomic_write_text(os.path.join(out_dir, f"{tag}_breakdown.csv"), buf.getvalue())

    header = (f"{tag} on {device}: {active} profiled step(s) after {warmup} warm-up; wall {wall_ms:.2f} ms/step; "
              f"{kind} time {busy_ms:.2f} ms/step\n")
    table = events.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=TOP_ROWS,
                         max_name_column_width=100)
    top_path = atomic_write_text(os.path.join(out_dir, f"{tag}_top.txt"), header + table)
    trace_path = _write_trace(prof, os.path.join(out_dir, f"{tag}_trace.json.gz"), max_trace_mb)
    return {"tag": tag, "breakdown": rows, "wall_ms": wall_ms, "busy_ms": busy_ms, "kind": kind,
            "files": [p for p in (trace_path, top_path, breakdown_path) if p]}


def summary_line(result):
    """One line: the top 3 categories with their share of the self time."""
    top = ", ".join(f"{c} {pct:.1f}%" for c, _, pct in result["breakdown"][:3])
    return (f"[train profile] {result['tag']}: {top} (of {result['busy_ms']:.2f} ms/step {result['kind']} time; "
            f"wall {result['wall_ms']:.2f} ms/step)")
