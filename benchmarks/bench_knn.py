"""kNN search benchmark: celldino's chunked exact search vs the reference-style loop, a naive full-matrix search
and faiss flat search (when installed), same run, same device.

Providers (all exact cosine top-k on L2-normalised features):
  celldino        celldino.eval.knn.knn_search: train-major chunks through the device, running top-k with
                  deterministic ties, chunk sizes from free memory (fp32, and bf16 matmul on GPU)
  reference_loop  the DINOv2 / Cell-DINO KnnModule pattern: batches of 256 queries, each `mm` against the whole
                  train matrix then `topk(k)` (fp32) -- the baseline
  naive_full      one full [queries, train] similarity matrix then `topk` (skipped when it does not fit)
  faiss_flat      faiss IndexFlatIP / GpuIndexFlatIP (skipped when faiss is not installed)
Shapes: GPU 1M train x 100k queries x 1024 (the issue's target) and 1M x 8k x 1024 (all providers);
CPU (--quick) 20k x 1k x 256. Timing rows: median / p20 / p80 ms, TFLOP/s of the similarity matmul
(2 N M D), queries/s; the note holds the recall of each provider's neighbours vs celldino fp32.

    python -m benchmarks.run_all knn              # CSV -> benchmarks/results/knn.csv
"""
import torch
import torch.nn.functional as F

from . import common


def add_arguments(parser):
    parser.add_argument("--knn-shapes", nargs="*", default=None,
                        help="NxMxD[xK] train x queries x dim x k (GPU default, in this order: "
                             "1000000x8192x1024x20 1000000x100000x1024x20)")


def _shapes(args, on_gpu):
    given = getattr(args, "knn_shapes", None)
    if given:
        out = []
        for s in given:
            parts = [int(p) for p in s.lower().split("x")]
            out.append(tuple(parts) if len(parts) == 4 else tuple(parts) + (20,))
        return out
    if not on_gpu or getattr(args, "quick", False):
        return [(20_000, 1_000, 256, 20)]
    return [(1_000_000, 8_192, 1024, 20), (1_000_000, 100_000, 1024, 20)]


def _reference_loop(train, queries, k, batch=256):
    train_t = train.T
    vals, idx = [], []
    for q0 in range(0, queries.shape[0], batch):
        sims = queries[q0:q0 + batch] @ train_t
        v, i = sims.topk(k, dim=1, largest=True, sorted=True)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _naive_full(train, queries, k):
    return (queries @ train.T).topk(k, dim=1, largest=True, sorted=True)


def _faiss_provider(device):
    try:
        import faiss
    except ImportError:
        return None

    def search(train, queries, k):
        xb = train.float().cpu().numpy()
        xq = queries.float().cpu().numpy()
        index = faiss.IndexFlatIP(xb.shape[1])
        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
        index.add(xb)
        d, i = index.search(xq, k)
        return torch.from_numpy(d), torch.from_numpy(i)
    return search


def _recall(ref_idx, idx):
    ref_idx, idx = ref_idx.cpu(), idx.cpu()
    hits = (ref_idx.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean().item()
    return hits


def _fits(device, nbytes):
    if device.type != "cuda":
        return nbytes < 2 * 2**30
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes * 1.3 < free


def run(args):
    from celldino.eval.knn import knn_search

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    reps = 3  # each GPU call of the target shape takes seconds; the rows' notes say 3 timed runs
    rows = []
    faiss_search = _faiss_provider(device)
    for n_train, n_query, dim, k in _shapes(args, on_gpu):
        g = torch.Generator(device=device).manual_seed(0)
        train = F.normalize(torch.randn(n_train, dim, device=device, generator=g), dim=1)
        queries = F.normalize(torch.randn(n_query, dim, device=device, generator=g), dim=1)
        shape = f"{n_train}x{n_query}x{dim}xk{k}"
        flops = 2.0 * n_train * n_query * dim
        providers = [("celldino", torch.float32,
                      lambda: knn_search(train, queries, k, device=device, normalize=False))]
        if on_gpu:
            providers.append(("celldino", torch.bfloat16,
                              lambda: knn_search(train, queries, k, device=device, dtype=torch.bfloat16,
                                                 normalize=False)))
        providers.append(("reference_loop", torch.float32, lambda: _reference_loop(train, queries, k)))
        full_bytes = 4 * n_train * n_query
        if _fits(device, full_bytes):
            providers.append(("naive_full", torch.float32, lambda: _naive_full(train, queries, k)))
        else:
            print(f"  knn {shape}: naive_full skipped (the {full_bytes / 2**30:.0f} GiB similarity matrix does not "
                  "fit)", flush=True)
        if faiss_search is not None:
            providers.append(("faiss_flat", torch.float32, lambda: faiss_search(train, queries, k)))
        else:
            print("  knn: faiss not installed, faiss_flat skipped", flush=True)

        ref_idx = None
        baseline_ms = None
        shape_rows = []
        for name, dtype, fn in providers:
            try:
                _, idx = fn()
                # wall clock: each GPU call of the target shape takes seconds (no do_bench re-runs)
                timing = common.wall_timing(fn, reps, sync=device.type == "cuda")
                peak = common.peak_extra_memory_mb(fn, device)
            except torch.cuda.OutOfMemoryError as exc:  # report, keep going
                print(f"  knn {shape} {name}: out of memory ({exc})", flush=True)
                torch.cuda.empty_cache()
                continue
            if ref_idx is None:
                ref_idx = idx
            note = f"recall@{k} vs celldino fp32 {_recall(ref_idx, idx):.4f}"
            # the row now, so a stop (SIGTERM) keeps it; its speed-up is filled in when the baseline is measured
            shape_rows.append(common.row("knn", "knn_search", name, shape, dtype, "search", timing, flops=flops,
                                         items=n_query, peak_mem_mb=peak, baseline="reference_loop",
                                         baseline_ms=baseline_ms, device=device, note=note))
            if name == "reference_loop":
                baseline_ms = timing[0]
                common.fill_speedups(shape_rows, baseline_ms)
            print(f"  knn {shape} {name} {str(dtype).replace('torch.', '')}: {timing[0]:.1f} ms, "
                  f"{flops / timing[0] / 1e9:.3f} TFLOP/s, {note}", flush=True)
        rows += shape_rows
        train = queries = idx = ref_idx = None  # frees this shape's tensors before the next (the lambdas see these)
        if on_gpu:
            torch.cuda.empty_cache()
    return rows
