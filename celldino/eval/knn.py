"""k-nearest-neighbour classification on frozen features (reference `eval/cell_dino/knn.py`, spec §6.2).

    knn_scores(train_features, train_labels, test_features, nb_knn, T, num_classes) -> {k: [n_test, C] scores}

Search: cosine similarity by chunked matrix products with a running top-k, on GPU or CPU. The train set is
streamed through the device in chunks (train-major order, each chunk moved once), the queries and the running
top-k buffers stay on the device, chunk sizes come from the free memory, so 1M train x 100k queries x 1024
fits one H100. With a process group the train set is split over the ranks (`tensor_split`: always one piece per
rank, unlike the reference's `chunk`); each rank's queries are broadcast in turn, every rank searches its piece
and the candidates are gathered to the query's owner for a second top-k, as in the reference.

Ties are deterministic: among equal similarities the lower train index wins, whatever the chunking, the
sharding or the device (the reference leaves this to `torch.topk`).

Voting: weights softmax(sim / T) (T = 0.07) times one-hot labels (or multi-hot vectors, multi-label), summed over
the first k neighbours. The reference takes the softmax over the top max(nb_knn) once and then sums the first k,
so with nb_knn = [1, 10, 20] the k = 1 vote mass is ~0.3, not 1 (spec §12). The argmax (multiclass) is the same
either way, but the multi-label 0.5 threshold then depends on the other k's asked for. Default
`voting="per_k"` fixes this (softmax over the first k for each k: vote mass sums to 1);
`voting="reference"` reproduces the reference exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from celldino import dist as _dist
from .metrics import compute_metric, parse_metric_type

logger = logging.getLogger("celldino")

__all__ = [
    "knn_scores",
    "knn_search",
    "knn_vote",
    "topk_merge",
    "labels_to_tensor",
    "infer_num_classes",
    "class_indices_mapping",
    "few_shot_subsets",
    "knn_leave_one_out",
    "read_leave_one_out_groups",
    "evaluate_knn",
    "VOTING",
]

VOTING = ("per_k", "reference")
_CPU_BLOCK_BYTES = 64 * 2**20  # similarity block on CPU: big enough for BLAS, small enough for the caches


# ---- labels -------------------------------------------------------------------------------------------------

def labels_to_tensor(labels) -> torch.Tensor:
    """Integer class labels [N] or multi-hot labels [N, L] as an int64 tensor."""
    if isinstance(labels, torch.Tensor):
        t = labels
    else:
        a = np.asarray(labels)
        if a.dtype == object:
            a = np.stack([np.asarray(v) for v in labels])
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError("labels must be integers (class indices) or 0/1 multi-hot vectors")
    if t.dim() not in (1, 2):
        raise ValueError(f"labels must be [N] class indices or [N, L] multi-hot, got shape {tuple(t.shape)}")
    return t.long()


def infer_num_classes(labels: torch.Tensor) -> int:
    """Reference `get_num_classes`: multi-hot -> L; class indices -> max + 1."""
    labels = labels_to_tensor(labels)
    if labels.dim() == 2:
        return int(labels.shape[1])
    return int(labels.max().item()) + 1 if labels.numel() else 0


# ---- search -------------------------------------------------------------------------------------------------

def _sort_desc_then_index(vals: torch.Tensor, idx: torch.Tensor):
    """Order each row by (value descending, index ascending)."""
    idx_sorted, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx_sorted.gather(1, order)


def _block_topk(sims: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of `sims` with ties broken by the lower column; sorted (value desc, column asc).
    Returns min(k, n_cols) columns."""
    n_cols = sims.shape[1]
    kk = min(k, n_cols)
    if kk == 0:
        return sims.new_empty(sims.shape[0], 0), torch.empty(sims.shape[0], 0, dtype=torch.long, device=sims.device)
    if kk < n_cols:
        vals, idx = sims.topk(kk + 1, dim=1, largest=True, sorted=True)
        tie_rows = (vals[:, kk - 1] == vals[:, kk]).nonzero().squeeze(1)
        vals, idx = _sort_desc_then_index(vals[:, :kk], idx[:, :kk])
        if tie_rows.numel():
            # a tie straddles the top-k boundary: which of the tied columns get in must not depend on topk's
            # internals, so these (rare) rows are fully sorted; the stable sort keeps the lower column first
            v, i = sims[tie_rows].sort(dim=1, descending=True, stable=True)
            vals[tie_rows] = v[:, :kk]
            idx[tie_rows] = i[:, :kk]
    else:
        vals, idx = sims.sort(dim=1, descending=True, stable=True)
    return vals, idx


def topk_merge(vals_a, idx_a, vals_b, idx_b, k: int):
    """Merge two candidate lists, each sorted (value desc, index asc) with every index of `a` below every index
    of `b` (padding: value -inf, index -1, at the end), into the top k with the same order."""
    vals = torch.cat([vals_a, vals_b], dim=1)
    idx = torch.cat([idx_a, idx_b], dim=1)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals[:, :k], idx.gather(1, order[:, :k])


def _pad_candidates(vals, idx, k):
    missing = k - vals.shape[1]
    if missing <= 0:
        return vals, idx
    vals = F.pad(vals, (0, missing), value=-math.inf)
    idx = F.pad(idx, (0, missing), value=-1)
    return vals, idx


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return 8 * _CPU_BLOCK_BYTES


def _chunk_sizes(n_train: int, n_query: int, device: torch.device, train_chunk: Optional[int],
                 query_chunk: Optional[int], block_bytes: Optional[int]):
    """Rows per train chunk and per query chunk so that one [query_chunk, train_chunk] fp32 similarity block
    (plus topk / sort temporaries, ~3x) fits the budget."""
    if block_bytes is None:
        block_bytes = _free_bytes(device) // 6 if device.type == "cuda" else _CPU_BLOCK_BYTES
    block_bytes = max(int(block_bytes), 1 << 16)
    if train_chunk is None:
        # long rows amortise the top-k; keep the train chunk itself (dtype copy) modest
        train_chunk = min(max(n_train, 1), 1 << 20 if device.type == "cuda" else 1 << 15)
    train_chunk = max(1, int(train_chunk))
    if query_chunk is None:
        query_chunk = block_bytes // (4 * train_chunk)
        query_chunk = max(1, min(query_chunk, max(n_query, 1), 1 << 16))
    return train_chunk, max(1, int(query_chunk))


def _similarities(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """fp32 similarity block. bf16 / fp16 inputs on GPU accumulate and write fp32 (torch.mm out_dtype), so the
    similarities are not rounded to 8 / 11 bits, which would create spurious top-k ties."""
    if queries.dtype != torch.float32 and queries.is_cuda:
        try:
            return torch.mm(queries, train.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch: no mm.dtype overload
            pass
    return (queries @ train.T).float()


def _prepare(x: torch.Tensor, device, dtype, normalize: bool) -> torch.Tensor:
    x = x.to(device=device, non_blocking=True)
    if normalize:
        x = F.normalize(x.float(), dim=1, p=2)
    return x.to(dtype)


def _local_search(train_local: torch.Tensor, index_offset: int, queries: torch.Tensor, k: int, *,
                  device, dtype, normalize, train_chunk, query_chunk, block_bytes, progress=False):
    """Top-k of `queries` (already on device, prepared) among `train_local` (any device), global indices."""
    n_q = queries.shape[0]
    n_t = train_local.shape[0]
    best_v = torch.full((n_q, 0), -math.inf, device=device)
    best_i = torch.full((n_q, 0), -1, dtype=torch.long, device=device)
    if n_t == 0 or n_q == 0 or k == 0:
        return _pad_candidates(best_v, best_i, k)
    tc, qc = _chunk_sizes(n_t, n_q, device, train_chunk, query_chunk, block_bytes)
    starts = range(0, n_t, tc)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="knn search", unit="chunk", total=math.ceil(n_t / tc))
    for t0 in starts:
        t_chunk = _prepare(train_local[t0:t0 + tc], device, dtype, normalize)
        vs, is_ = [], []
        for q0 in range(0, n_q, qc):
            sims = _similarities(queries[q0:q0 + qc], t_chunk)
            v, i = _block_topk(sims, k)
            vs.append(v)
            is_.append(i + (index_offset + t0))
        best_v, best_i = topk_merge(best_v, best_i, torch.cat(vs), torch.cat(is_), k)
    return _pad_candidates(best_v, best_i, k)


def _resolve_device(device) -> torch.device:
    from .features import resolve_device
    return resolve_device(device)


def _shard_bounds(n: int, world: int) -> List[int]:
    """Row offsets of `torch.tensor_split(x, world)`: one piece per rank, sizes differ by at most 1."""
    base, extra = divmod(n, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


@torch.no_grad()
def knn_search(train_features: torch.Tensor, test_features: torch.Tensor, k: int, *, device=None,
               dtype: torch.dtype = torch.float32, normalize: bool = True, train_is_sharded: bool = False,
               group=None, train_chunk: Optional[int] = None, query_chunk: Optional[int] = None,
               block_bytes: Optional[int] = None, progress: bool = False):
    """Exact cosine top-k. Returns (similarities [n_test, k] fp32 descending, global train indices [n_test, k]
    int64) for this rank's `test_features`; with fewer than k train samples the tail is (-inf, -1).

    dtype: matmul precision (fp32 default; bf16 / fp16 are faster on GPU, similarities are rounded first).
    With a process group: `train_features` is the full train set (each rank uses its `tensor_split` piece) or,
    with train_is_sharded=True, this rank's piece already (pieces in rank order); `test_features` are this
    rank's own queries (they may differ in number between ranks).
    """
    device = _resolve_device(device)
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError(f"features must be 2-D, got train {tuple(train_features.shape)} and test "
                         f"{tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have dimension {train_features.shape[1]} but test features "
                         f"{test_features.shape[1]}")
    rank, world = _dist.rank_world(group)
    if world > 1 and not train_is_sharded:
        bounds = _shard_bounds(train_features.shape[0], world)
        train_local, offset = train_features[bounds[rank]:bounds[rank + 1]], bounds[rank]
    elif world > 1:
        sizes = _dist.all_gather_objects(int(train_features.shape[0]), group)
        train_local, offset = train_features, int(sum(sizes[:rank]))
    else:
        train_local, offset = train_features, 0
    kw = dict(device=device, dtype=dtype, normalize=normalize, train_chunk=train_chunk, query_chunk=query_chunk,
              block_bytes=block_bytes)
    if world == 1:
        queries = _prepare(test_features, device, dtype, normalize)
        return _local_search(train_local, offset, queries, k, progress=progress, **kw)

    dim = test_features.shape[1]
    n_queries = _dist.all_gather_objects(int(test_features.shape[0]), group)
    result = None
    for src in range(world):
        q = _dist.broadcast_tensor(test_features if rank == src else None, src, (n_queries[src], dim),
                                   test_features.dtype, group)
        queries = _prepare(q, device, dtype, normalize)
        v, i = _local_search(train_local, offset, queries, k, progress=progress and rank == src, **kw)
        gv = _dist.gather_tensors(v, src, group)
        gi = _dist.gather_tensors(i, src, group)
        if rank == src:
            # rank order = increasing train index, so merging in that order keeps the tie rule
            bv, bi = gv[0], gi[0]
            for r in range(1, world):
                bv, bi = topk_merge(bv, bi, gv[r], gi[r], k)
            result = (bv, bi)
    return result


# ---- voting -------------------------------------------------------------------------------------------------

def knn_vote(topk_sims: torch.Tensor, neighbor_labels: torch.Tensor, nb_knn: Sequence[int], T: float,
             num_classes: int, voting: str = "per_k") -> Dict[int, torch.Tensor]:
    """Soft votes from sorted neighbour similarities [n, K] and their labels ([n, K] class indices or
    [n, K, L] multi-hot). Entries with similarity -inf (fewer train samples than K) get weight 0."""
    if voting not in VOTING:
        raise ValueError(f"voting={voting!r}: expected one of {VOTING}")
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    n, max_k = topk_sims.shape
    if any(k > max_k for k in nb_knn):
        raise ValueError(f"nb_knn {list(nb_knn)} exceeds the {max_k} neighbours searched")
    valid = torch.isfinite(topk_sims)
    scaled = (topk_sims / T).masked_fill(~valid, -math.inf)
    multilabel = neighbor_labels.dim() == 3
    if multilabel:
        onehot = neighbor_labels.to(topk_sims.dtype) * valid.unsqueeze(-1)
    else:
        safe = neighbor_labels.clamp_min(0)
    out = {}
    full_w = torch.softmax(scaled, dim=1) if voting == "reference" else None
    for k in nb_knn:
        w = full_w[:, :k] if voting == "reference" else torch.softmax(scaled[:, :k], dim=1)
        w = torch.nan_to_num(w, nan=0.0) * valid[:, :k]  # rows without any valid neighbour vote nothing
        if multilabel:
            out[k] = torch.bmm(w.unsqueeze(1), onehot[:, :k]).squeeze(1)
        else:
            out[k] = torch.zeros(n, num_classes, dtype=w.dtype, device=w.device).scatter_add_(1, safe[:, :k], w)
    return out


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, nb_knn, T: float = 0.07,
               num_classes: Optional[int] = None, *, voting: str = "per_k", device=None,
               dtype: torch.dtype = torch.float32, normalize: bool = True, train_is_sharded: bool = False,
               group=None, train_chunk: Optional[int] = None, query_chunk: Optional[int] = None,
               block_bytes: Optional[int] = None, progress: bool = False) -> Dict[int, torch.Tensor]:
    """kNN class scores {k: [n_test, num_classes] float32 on CPU} for this rank's test features.

    train_labels: [N] class indices or [N, L] multi-hot (multi-label: the score is the vote mass per label,
    thresholded at 0.5 by the metric). k larger than the train set uses the whole train set. Features are
    L2-normalised here (normalize=False if they already are). See knn_search for the other options.
    """
    nb_knn = sorted({int(k) for k in (nb_knn if isinstance(nb_knn, Iterable) else [nb_knn])})
    if not nb_knn or nb_knn[0] < 1:
        raise ValueError(f"nb_knn must be positive integers, got {nb_knn}")
    train_features = torch.as_tensor(train_features)
    test_features = torch.as_tensor(test_features)
    labels = labels_to_tensor(train_labels)
    if labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features but {labels.shape[0]} train labels")
    for name, x in (("train", train_features), ("test", test_features)):
        if x.is_floating_point() and x.numel() and not torch.isfinite(x).all():
            raise ValueError(f"{name} features contain NaN or inf")
    rank, world = _dist.rank_world(group)
    if world > 1 and train_is_sharded:
        labels = torch.cat(_dist_all_gather_labels(labels, group))
    if num_classes is None:
        num_classes = _global_num_classes(labels, group)
    if labels.dim() == 1 and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    max_k = nb_knn[-1]
    sims, idx = knn_search(train_features, test_features, max_k, device=device, dtype=dtype, normalize=normalize,
                           train_is_sharded=train_is_sharded, group=group, train_chunk=train_chunk,
                           query_chunk=query_chunk, block_bytes=block_bytes, progress=progress)
    sims, idx = sims.cpu(), idx.cpu()
    votes = {k: [] for k in nb_knn}
    rows = max(1, (1 << 24) // max(1, max_k * (labels.shape[1] if labels.dim() == 2 else 1)))
    for r0 in range(0, sims.shape[0], rows):  # bounded memory for the [rows, k, L] multi-hot gather
        part = knn_vote(sims[r0:r0 + rows], labels[idx[r0:r0 + rows].clamp_min(0)], nb_knn, T, num_classes, voting)
        for k in nb_knn:
            votes[k].append(part[k])
    return {k: (torch.cat(v) if v else torch.zeros(0, num_classes)).float() for k, v in votes.items()}


def _dist_all_gather_labels(labels, group):
    return [torch.as_tensor(x) for x in _dist.all_gather_objects(labels.cpu(), group)]


def _global_num_classes(labels, group) -> int:
    n = infer_num_classes(labels)
    return max(_dist.all_gather_objects(n, group))


# ---- few-shot subsets (reference create_train_dataset_dict) ----------------------------------------------------

def class_indices_mapping(labels) -> Dict[int, torch.Tensor]:
    """label -> indices of the samples that carry it (sorted labels; multi-hot: a sample under every label)."""
    labels = labels_to_tensor(labels)
    if labels.dim() == 2:
        sorted_labels, indices = torch.nonzero(labels.T, as_tuple=True)
    else:
        sorted_labels, indices = torch.sort(labels, stable=True)
    unique, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    return dict(zip(unique.tolist(), torch.split(indices, counts.tolist())))


def _subset_per_class(mapping, n_or_percent, size, seed, is_percent):
    gen = torch.Generator().manual_seed(int(seed))
    keep = torch.zeros(size, dtype=torch.bool)
    for idx in mapping.values():
        n = max(int(len(idx) * n_or_percent), 1) if is_percent else int(n_or_percent)
        keep[idx[torch.randperm(len(idx), generator=gen)[:n]]] = True
    return keep


def few_shot_subsets(train_labels, n_or_percent_per_class, n_tries: int = 1) -> List[torch.Tensor]:
    """Indices of the few-shot train subset of each try (try t uses seed t, as the reference): n samples per
    class (n >= 1) or that fraction of each class (0 < n < 1; multi-label fractions are re-balanced so that the
    number of selected labels approaches the fraction, as the reference does)."""
    labels = labels_to_tensor(train_labels)
    mapping = class_indices_mapping(labels)
    is_percent = n_or_percent_per_class < 1
    if n_or_percent_per_class <= 0:
        raise ValueError(f"n_per_class must be > 0, got {n_or_percent_per_class}")
    value = n_or_percent_per_class if is_percent else int(n_or_percent_per_class)
    out = []
    for t in range(n_tries):
        keep = _subset_per_class(mapping, value, len(labels), t, is_percent)
        if labels.dim() == 2 and is_percent:
            wanted = int(labels.sum() * value)
            selected = int((labels[keep] > 0).sum())
            if selected and wanted:
                keep = _subset_per_class(mapping, value / (selected / wanted), len(labels), t, True)
        out.append(keep.nonzero().squeeze(1))
    return out


# ---- leave-one-out (CHAMMI HPA task 3 / CP task 4) ---------------------------------------------------------

def read_leave_one_out_groups(csv_path: str, n_test: Optional[int] = None) -> np.ndarray:
    """Group id of each test sample from CHAMMI's enriched_meta.csv, as the reference: a path containing "HPA"
    -> rows with Task_three true, grouped by cell_type; otherwise rows with Task_four true, grouped by Plate. The
    rows (in file order) must line up with the test dataset."""
    import pandas as pd

    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"leave-one-out metadata {csv_path} does not exist")
    meta = pd.read_csv(csv_path)
    task, column = ("Task_three", "cell_type") if "HPA" in os.path.basename(csv_path) or "HPA" in csv_path else \
        ("Task_four", "Plate")
    for c in (task, column):
        if c not in meta.columns:
            raise ValueError(f"{csv_path}: no {c!r} column (columns are {list(meta.columns)})")
    flags = meta[task]
    if flags.dtype != bool:
        flags = flags.astype(str).str.lower().isin(["true", "1", "yes"])
    groups = meta.loc[flags.values, column].astype(str).to_numpy()
    if n_test is not None:
        require_group_count(groups, n_test, csv_path)
    return groups


def require_group_count(groups, n_test: int, csv_path: str) -> None:
    """The leave-one-out groups (read before the features, so a bad file fails before hours of extraction) must
    line up with the test features."""
    if len(groups) != n_test:
        raise ValueError(f"{csv_path}: {len(groups)} leave-one-out rows (Task_three / Task_four true) but the test set "
                         f"has {n_test} samples")


def knn_leave_one_out(train_features, train_labels, test_features, test_labels, groups, nb_knn, T=0.07,
                      num_classes: Optional[int] = None, score_labels: Optional[Sequence[int]] = None,
                      **kw) -> Dict[int, float]:
    """For each group g of test samples: train = train + the test samples outside g, predict g. Returns
    {k: macro F1 of the argmax predictions over all groups, restricted to `score_labels`} (scikit-learn
    f1_score(..., labels=score_labels, average="macro"), as the reference; score_labels None = all classes)."""
    from sklearn.metrics import f1_score

    train_features = torch.as_tensor(train_features)
    test_features = torch.as_tensor(test_features)
    train_labels, test_labels, groups, num_classes = _leave_one_out_inputs(train_labels, test_labels, groups,
                                                                           num_classes)
    preds = {k: [] for k in nb_knn}
    targets = []
    for fold_features, fold_labels, held in _leave_one_out_folds(train_features, train_labels, test_features,
                                                                 test_labels, groups):
        scores = knn_scores(fold_features, fold_labels, test_features[held], nb_knn, T, num_classes, **kw)
        for k in nb_knn:
            preds[k].append(scores[k].argmax(1))
        targets.append(test_labels[held])
    y = torch.cat(targets).numpy()
    labels = list(score_labels) if score_labels is not None else list(range(num_classes))
    return {k: float(f1_score(y, torch.cat(preds[k]).numpy(), average="macro", labels=labels, zero_division=0))
            for k in nb_knn}


def _leave_one_out_inputs(train_labels, test_labels, groups, num_classes: Optional[int]):
    """(train labels, test labels) as tensors, the groups as an array (one per test sample, checked) and
    num_classes (inferred from both label sets when None). Shared by knn_leave_one_out and
    celldino.eval.linear.linear_leave_one_out: the same leave-one-out protocol with another classifier."""
    train_labels, test_labels = labels_to_tensor(train_labels), labels_to_tensor(test_labels)
    groups = np.asarray(groups)
    if len(groups) != len(test_labels):
        raise ValueError(f"{len(groups)} leave-one-out groups for {len(test_labels)} test samples")
    if num_classes is None:
        num_classes = max(infer_num_classes(train_labels), infer_num_classes(test_labels))
    return train_labels, test_labels, groups, num_classes


def _leave_one_out_folds(train_features, train_labels, test_features, test_labels, groups: np.ndarray):
    """For each test group g in first-seen order: (features, labels) of train + the test samples outside g, and
    the boolean mask of g's test samples. Shared by the kNN and linear leave-one-out protocols."""
    for g in _unique_in_order(groups):
        held = torch.from_numpy(groups == g)
        yield (torch.cat([train_features, test_features[~held]]), torch.cat([train_labels, test_labels[~held]]),
               held)


def _unique_in_order(values):
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


# ---- end to end on a model ----------------------------------------------------------------------------------

LEAVE_ONE_OUT_METRIC = "leave-one-out macro F1 over labels 4, 5, 6"


def evaluate_knn(model, train_dataset, val_dataset, *, test_dataset=None, nb_knn=(10, 20), temperature=0.07,
                 metric="mean_per_class_multiclass_f1", batch_size: int = 256, num_workers: int = 0,
                 device=None, autocast_dtype="auto", bag_of_channels: bool = False, avgpool: bool = False,
                 crop_size: int = 384, resize_size: int = 0, n_per_class_list=(-1,), n_tries: int = 1,
                 voting: str = "per_k", dataset_names: Optional[Dict[str, str]] = None,
                 cache_dir: Optional[str] = None, progress: bool = True, group=None,
                 class_names: Optional[Sequence[str]] = None, leave_one_out_dataset: Optional[str] = None,
                 output_dir: Optional[str] = None) -> Dict:
    """kNN-evaluate an in-memory backbone (random init or trained) on datasets (objects whose items are
    (image, target), or `Name:key=value` strings built with the center-crop eval transform).

    Returns {"metric", "results": {"<dataset>_<k> Top 1": value x 100, ...} (reference names),
    "scores": {split: {k: value x 100}}, "report": {split: per-class rows of the largest k}}.
    metric=None: from the train labels (multilabel F1 for multi-hot labels, multiclass F1 otherwise).
    Few-shot: n_per_class_list entries > 0 evaluate on n_tries random class-balanced train subsets; the
    results are then "<dataset>_<k> Top 1" (mean over tries, key suffix "_n<n>") and "... std".
    autocast_dtype: "auto" (fp16 on a GPU as the reference, none on CPU; as extract_features and evaluate_linear),
    None (fp32), or a dtype.
    leave_one_out_dataset (CHAMMI enriched_meta.csv): the leave-one-out protocol on train + val instead, results
    "<val>_<k> Top 1" = macro F1 over labels 4, 5, 6 x 100 (as the reference; the test split is not scored).
    output_dir: created once the inputs are checked; the main rank appends the results to
    results_eval_knn.json there (JSON lines {name: value}).
    """
    from .features import extract_features
    from .inputs import prepare_eval_datasets

    metric_t = None if metric is None else parse_metric_type(metric)  # a misspelt metric fails before any work
    prepared = prepare_eval_datasets({"train": train_dataset, "val": val_dataset, "test": test_dataset},
                                     crop_size=crop_size, resize_size=resize_size, names=dataset_names, model=model,
                                     group=group)
    if output_dir:  # before the long part: a path that cannot be created fails early
        os.makedirs(output_dir, exist_ok=True)
    # the leave-one-out protocol reads train + val only, and its metadata before the long part
    groups = read_leave_one_out_groups(leave_one_out_dataset) if leave_one_out_dataset else None
    splits = ("train", "val") if leave_one_out_dataset else tuple(prepared.datasets)
    feats = {}
    for split in splits:
        sub_cache = None if cache_dir is None else f"{cache_dir}/{split}"
        feats[split] = extract_features(model, prepared.datasets[split], kind="knn", bag_of_channels=bag_of_channels,
                                        avgpool=avgpool, batch_size=batch_size, num_workers=num_workers,
                                        device=device, autocast_dtype=autocast_dtype, cache_dir=sub_cache,
                                        progress=progress, group=group, desc=f"features {split}")
    if leave_one_out_dataset:
        out = _leave_one_out_results(feats, groups, leave_one_out_dataset, prepared.names["val"], nb_knn,
                                     temperature, voting, device)
    else:
        out = _scored_splits(feats, prepared, metric_t, class_names, nb_knn=nb_knn, temperature=temperature,
                             n_per_class_list=n_per_class_list, n_tries=n_tries, voting=voting, device=device,
                             group=group)
    if output_dir and _dist.is_main_process(group):
        with open(os.path.join(output_dir, "results_eval_knn.json"), "a") as f:
            for k, v in out["results"].items():
                f.write(json.dumps({k: v}) + "\n")
    return out


def _leave_one_out_results(feats, groups, groups_csv: str, val_name: str, nb_knn, temperature, voting,
                           device) -> Dict:
    """evaluate_knn's CHAMMI leave-one-out (HPA task 3 / CP task 4) on the extracted train + val features."""
    train, val = feats["train"], feats["val"]
    require_group_count(groups, len(val), groups_csv)
    scores = knn_leave_one_out(train.features, train.labels, val.features, val.labels, groups, nb_knn, temperature,
                               score_labels=[4, 5, 6], voting=voting, device=device, normalize=False)
    return {"metric": LEAVE_ONE_OUT_METRIC, "results": {f"{val_name}_{k} Top 1": 100.0 * v for k, v in scores.items()},
            "scores": {"val": {str(k): 100.0 * v for k, v in scores.items()}}, "report": {},
            "n_train": int(len(train.features))}


def _scored_splits(feats, prepared, metric, class_names, **knn) -> Dict:
    """evaluate_knn's standard protocol on the extracted features: every evaluated split (val, test) scored with
    the train split (or its few-shot subsets) as the neighbours, plus a per-class report of the largest k."""
    from .inputs import require_several_classes
    from .metrics import default_metric_and_loss, per_class_report

    train_f, train_y = feats["train"].features, labels_to_tensor(feats["train"].labels)
    require_several_classes(train_y, prepared.train_where)  # objects without get_targets are checked only here
    num_classes = infer_num_classes(train_y)
    metric, _ = default_metric_and_loss(train_y, metric)
    if metric.multilabel != (train_y.dim() == 2):
        raise ValueError(f"metric {metric} does not fit {'multi-hot' if train_y.dim() == 2 else 'class-index'} "
                         "labels")
    class_names = prepared.class_names if class_names is None else class_names
    results, scores_out, report = {}, {}, {}
    for split in [s for s in ("val", "test") if s in feats]:
        test_y = labels_to_tensor(feats[split].labels)
        num_c = max(num_classes, infer_num_classes(test_y))
        values, last_scores = _split_values(train_f, train_y, feats[split].features, test_y, num_c, metric, **knn)
        scores_out[split] = {key: float(np.mean(v)) for key, v in values.items()}
        for key, v in values.items():
            name = f"{prepared.names[split]}_{key} Top 1"
            results[name] = float(np.mean(v))
            if len(v) > 1:
                results[name + " std"] = float(np.std(v, ddof=1))
        report[split] = per_class_report(last_scores, test_y, multilabel=metric.multilabel, num_classes=num_c,
                                         class_names=class_names)
    return {"metric": str(metric), "results": results, "scores": scores_out, "report": report,
            "num_classes": num_classes, "n_train": int(len(train_f))}


def _split_values(train_f, train_y, test_f, test_y, num_classes, metric, *, nb_knn, temperature, n_per_class_list,
                  n_tries, voting, device, group):
    """One evaluated split: {"<k><suffix>": [metric x 100 of each try]} (suffix "_n<n>" for few-shot subsets of n
    per class, "" for the whole train split), and the vote scores of the largest k in the last try."""
    rank, world = _dist.rank_world(group)
    # every rank holds all features after extraction: each searches its share of the queries
    bounds = _shard_bounds(len(test_f), world)
    my_queries = test_f[bounds[rank]:bounds[rank + 1]]
    values, sc = {}, None
    for n_per_class in n_per_class_list:
        whole = n_per_class is None or n_per_class <= 0
        subsets = [None] if whole else few_shot_subsets(train_y, n_per_class, n_tries)
        per_try = {k: [] for k in nb_knn}
        for subset in subsets:
            tf, ty = (train_f, train_y) if subset is None else (train_f[subset], train_y[subset])
            sc = knn_scores(tf, ty, my_queries, nb_knn, temperature, num_classes, voting=voting, device=device,
                            normalize=False, group=group)
            if world > 1:
                sc = {k: torch.cat([torch.as_tensor(x) for x in _dist.all_gather_objects(v, group)])
                      for k, v in sc.items()}
            for k in nb_knn:
                per_try[k].append(100.0 * compute_metric(metric, sc[k], test_y, num_classes))
        suffix = "" if whole else f"_n{n_per_class}"
        values.update({f"{k}{suffix}": per_try[k] for k in nb_knn})
    return values, sc[max(nb_knn)]
