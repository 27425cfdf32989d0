"""Linear probes on a frozen backbone (reference `eval/cell_dino/linear.py`, reference_spec.md §6.1).

The reference protocol: a grid of linear heads (learning rates x weight decays; weights N(0, 0.01), bias 0)
trained jointly on the same frozen features, each lr scaled by batch x world / 256, AdamW with per-head weight
decay, CosineAnnealingLR over epochs x epoch_length iterations (eta_min 0), BCE-with-logits on multi-hot targets
(protein localisation) or cross-entropy (cell type). Input: CLS tokens of the last n blocks (+ avg-pooled patch
tokens with avgpool; x C in bag of channels). The best head is the one with the highest validation metric; with
test datasets the best head's score on each is reported, otherwise the validation score is reported (the
reference's default: the model is then selected on the evaluation set; the output says so).

Training inputs, `mode`:
  "augment"   the reference: every iteration a batch of randomly cropped and flipped images goes through the
              frozen backbone (exact protocol, as slow as a forward pass per step)
  "features"  features are extracted once (center crop) and the heads train on them (fast; no augmentation)

All heads live in one [H, C, F] tensor and one AdamW with per-head lr / weight decay (`GridAdamW`, the same
update as torch.optim.AdamW on each head separately); the forward is one batched matmul.

Also here: CHAMMI leave-one-out (`linear_leave_one_out`) and scikit-learn logistic regression as a second probe
(`logistic_regression_probe`).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from celldino.files import atomic_torch_save

from celldino import dist as _dist
from .knn import (_leave_one_out_folds, _leave_one_out_inputs, infer_num_classes, labels_to_tensor,
                  read_leave_one_out_groups, require_group_count)
from .metrics import compute_metric, default_metric_and_loss, parse_metric_type

logger = logging.getLogger("celldino")

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_WEIGHT_DECAYS",
    "LOSS_TYPES",
    "scale_lr",
    "head_name",
    "LinearHeadGrid",
    "GridAdamW",
    "cosine_lr_factor",
    "train_linear_heads",
    "evaluate_heads",
    "select_best_head",
    "linear_probe_on_features",
    "linear_leave_one_out",
    "logistic_regression_probe",
    "read_leave_one_out_groups",
    "evaluate_linear",
]

DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-5)
LOSS_TYPES = ("cross_entropy", "binary_cross_entropy")


def scale_lr(lr: float, batch_size: int, world_size: int = 1) -> float:
    """Reference scaling: lr x (batch per rank x ranks) / 256."""
    return lr * batch_size * world_size / 256.0


def head_name(n_last_blocks: int, avgpool: bool, lr: float, wd: float) -> str:
    """The reference classifier name, e.g. classifier_4_blocks_avgpool_True_lr_0_00025_wd_0_00E+00."""
    return f"classifier_{n_last_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}_wd_{wd:.2E}".replace(".", "_")


def _unique_head_names(grid, n_last_blocks, avgpool) -> List[str]:
    """Reference names; where the reference's 5-decimal lr collides (e.g. lrs 1e-5 and 2e-5 at batch 64 both
    print as 0_00000 / 0_00001, and the reference then silently drops heads from its ModuleDict) those heads get
    the lr in scientific notation instead."""
    names = [head_name(n_last_blocks, avgpool, lr, wd) for lr, wd in grid]
    counts = {n: names.count(n) for n in names}
    for i, (lr, wd) in enumerate(grid):
        if counts[names[i]] > 1:
            names[i] = f"classifier_{n_last_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.4e}_wd_{wd:.2E}".replace(".", "_")
    if len(set(names)) != len(names):
        raise ValueError("the learning-rate / weight-decay grid has duplicate entries")
    return names


class LinearHeadGrid(nn.Module):
    """H independent linear heads on the same input: x [B, F] -> logits [H, B, C]."""

    def __init__(self, in_dim: int, num_classes: int, learning_rates: Sequence[float],
                 weight_decays: Sequence[float], *, n_last_blocks: int = 1, avgpool: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        grid = [(lr, wd) for lr in learning_rates for wd in weight_decays]  # reference order: lr-major
        self.lrs = torch.tensor([g[0] for g in grid], dtype=torch.float64)
        self.wds = torch.tensor([g[1] for g in grid], dtype=torch.float64)
        self.names = _unique_head_names(grid, n_last_blocks, avgpool)
        h = len(grid)
        self.weight = nn.Parameter(torch.empty(h, num_classes, in_dim).normal_(0.0, 0.01, generator=generator))
        self.bias = nn.Parameter(torch.zeros(h, num_classes))

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bf,hcf->hbc", x, self.weight) + self.bias[:, None, :]


class GridAdamW:
    """AdamW (torch.optim.AdamW semantics: decoupled decay p *= 1 - lr wd, bias-corrected moments) with a
    learning rate and a weight decay per head (dimension 0 of every parameter)."""

    def __init__(self, params: Sequence[torch.Tensor], lrs: torch.Tensor, wds: torch.Tensor,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.base_lrs = lrs.double()
        self.wds = wds.double()
        self.betas, self.eps = betas, eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def _per_head(self, values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return values.to(device=p.device, dtype=p.dtype).view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bc1 = 1 - beta1 ** self.step_count
        bc2 = 1 - beta2 ** self.step_count
        lrs = self.base_lrs * lr_factor
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            lr = self._per_head(lrs, p)
            p.mul_(1 - lr * self._per_head(self.wds, p))
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            p.addcdiv_(m * (lr / bc1), denom, value=-1.0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"step": self.step_count, "exp_avg": [t.cpu() for t in self.exp_avg],
                "exp_avg_sq": [t.cpu() for t in self.exp_avg_sq]}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            dst.copy_(src)


def cosine_lr_factor(iteration: int, max_iter: int) -> float:
    """CosineAnnealingLR(T_max=max_iter, eta_min=0) factor of the base lr used at `iteration` (0-based)."""
    return 0.5 * (1.0 + math.cos(math.pi * iteration / max_iter)) if max_iter > 0 else 1.0


def _loss(logits: torch.Tensor, labels: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Sum over heads of each head's mean loss (the reference sums the per-classifier losses)."""
    h, b, c = logits.shape
    if loss_type == "binary_cross_entropy":
        target = labels.float().unsqueeze(0).expand(h, b, c)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2)).sum()
    per = F.cross_entropy(logits.reshape(h * b, c), labels.repeat(h), reduction="none")
    return per.view(h, b).mean(dim=1).sum()


def _all_reduce_grads(params, group) -> None:
    _, world = _dist.rank_world(group)
    if world == 1:
        return
    import torch.distributed as dist
    for p in params:
        if p.grad is not None:
            g = p.grad.to(_dist.comm_device(group))
            dist.all_reduce(g, group=group)
            p.grad.copy_(g.to(p.grad.device) / world)


def train_linear_heads(heads: LinearHeadGrid, batches: Callable[[int], Iterator[Tuple[torch.Tensor, torch.Tensor]]],
                       *, max_iter: int, loss_type: str = "cross_entropy", device=None,
                       checkpoint_path: Optional[str] = None, checkpoint_period: int = 0, resume: bool = True,
                       eval_period: int = 0, on_eval: Optional[Callable[[int], None]] = None,
                       progress: bool = True, group=None) -> LinearHeadGrid:
    """Train the grid for max_iter steps. `batches(start_iter)` yields (features [B, F], labels) from that
    iteration on; gradients are averaged over ranks. With checkpoint_path, the heads and optimizer are saved
    every checkpoint_period iterations (atomically) and a rerun resumes from the file."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    device = torch.device(device) if device is not None else heads.weight.device
    heads.to(device)
    opt = GridAdamW([heads.weight, heads.bias], heads.lrs, heads.wds)
    start = 0
    if checkpoint_path and resume and os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("names") != heads.names or tuple(state["weight"].shape) != tuple(heads.weight.shape):
            raise ValueError(f"{checkpoint_path}: the saved linear heads do not match this grid / feature size; "
                             "delete it or pass --no-resume")
        with torch.no_grad():
            heads.weight.copy_(state["weight"])
            heads.bias.copy_(state["bias"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        logger.info("linear: resuming from iteration %d (%s)", start, checkpoint_path)

    def save(iteration):
        if checkpoint_path and _dist.is_main_process(group):
            atomic_torch_save({"iteration": iteration, "names": heads.names, "weight": heads.weight.detach().cpu(),
                               "bias": heads.bias.detach().cpu(), "optimizer": opt.state_dict()}, checkpoint_path)

    pbar = None
    if progress and _dist.is_main_process(group) and start < max_iter:
        from tqdm.auto import tqdm
        pbar = tqdm(total=max_iter, initial=start, desc="linear heads", unit="it")
    try:
        stream = batches(start)
        for it in range(start, max_iter):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
            loss = _loss(heads(x), y, loss_type)
            opt.zero_grad()
            loss.backward()
            _all_reduce_grads([heads.weight, heads.bias], group)
            opt.step(cosine_lr_factor(it, max_iter))
            if pbar is not None:
                pbar.update(1)
                if it % 10 == 0:  # the loss minimised: every head's mean loss, summed (as the reference)
                    pbar.set_postfix({f"loss(sum of {heads.num_heads} heads)": f"{loss.item():.4f}"})
            if checkpoint_period and (it + 1) % checkpoint_period == 0 and it + 1 < max_iter:
                save(it + 1)
            if eval_period and on_eval is not None and (it + 1) % eval_period == 0 and it + 1 < max_iter:
                on_eval(it)
    finally:
        if pbar is not None:
            pbar.close()
    if start < max_iter:
        save(max_iter)
    return heads


@torch.no_grad()
def evaluate_heads(heads: LinearHeadGrid, features: torch.Tensor, labels, metric, num_classes: int,
                   chunk: int = 8192) -> torch.Tensor:
    """Every head's metric (fraction) on pre-extracted features: [H] float64."""
    m = parse_metric_type(metric)
    device = heads.weight.device
    logits = torch.cat([heads(features[i:i + chunk].to(device).float()).cpu()
                        for i in range(0, len(features), chunk)], dim=1) if len(features) else None
    if logits is None:
        raise ValueError("evaluate_heads: no samples")
    return torch.tensor([compute_metric(m, logits[h], labels, num_classes, logits=True)
                         for h in range(heads.num_heads)], dtype=torch.float64)


def select_best_head(values: torch.Tensor) -> int:
    """Highest value; on ties the first head in grid order."""
    return int(torch.argmax(values).item())  # torch.argmax returns the first maximal index


def _infinite_feature_batches(n: int, batch_size: int, seed: int, group, start_iter: int):
    """Reference INFINITE sampler over pre-extracted rows (seeded permutations, rank r takes every world-th
    index), in batches; resumable by skipping start_iter batches."""
    from celldino.data.loaders import InfiniteSampler

    rank, world = _dist.rank_world(group)
    sampler = InfiniteSampler(sample_count=n, shuffle=True, seed=seed, start=rank, step=world,
                              advance=start_iter * batch_size)
    it = iter(sampler)
    while True:
        yield torch.tensor(list(itertools.islice(it, batch_size)), dtype=torch.long)


def linear_probe_on_features(train_features, train_labels, val_features, val_labels, *, test_sets=None,
                             metric=None, loss_type=None, learning_rates=DEFAULT_LEARNING_RATES,
                             weight_decays=DEFAULT_WEIGHT_DECAYS, batch_size: int = 64, epochs: int = 30,
                             epoch_length: int = 145, n_last_blocks: int = 1, avgpool: bool = False,
                             num_classes: Optional[int] = None, device=None, seed: int = 0,
                             checkpoint_path=None, checkpoint_period: int = 0, resume: bool = True,
                             eval_period: int = 0, log: Optional[Callable[[dict], None]] = None,
                             progress: bool = True, group=None) -> Dict:
    """The linear protocol on pre-extracted features. test_sets: {name: (features, labels)}.

    Returns {"best_classifier": name, "val": best val metric (fraction), "val_metrics": {head: value},
    "test": {name: value}, "heads": the trained LinearHeadGrid, "num_classes": C}."""
    from .inputs import require_several_classes

    train_labels = labels_to_tensor(train_labels)
    val_labels = labels_to_tensor(val_labels)
    require_several_classes(train_labels)
    metric, loss_type = default_metric_and_loss(train_labels, metric, loss_type)
    if num_classes is None:
        num_classes = max(infer_num_classes(train_labels), infer_num_classes(val_labels))
    heads = _head_grid(train_features.shape[1], num_classes, learning_rates, weight_decays, batch_size,
                       n_last_blocks, avgpool, seed, group)
    device = torch.device(device) if device is not None else torch.device("cpu")

    def batches(start_iter):
        for idx in _infinite_feature_batches(len(train_features), batch_size, seed, group, start_iter):
            yield train_features[idx], train_labels[idx]

    return _train_and_select(heads, batches, val_features, val_labels, test_sets, metric=metric,
                             num_classes=num_classes, loss_type=loss_type, max_iter=epochs * epoch_length,
                             device=device, checkpoint_path=checkpoint_path, checkpoint_period=checkpoint_period,
                             resume=resume, eval_period=eval_period, log=log, progress=progress, group=group)


def _head_grid(in_dim, num_classes, learning_rates, weight_decays, batch_size, n_last_blocks, avgpool, seed,
               group) -> LinearHeadGrid:
    """The grid of heads with every learning rate scaled to the global batch (batch x world / 256), seeded.
    Shared by the feature and the augment protocols, which must build the same grid."""
    _, world = _dist.rank_world(group)
    lrs = [scale_lr(lr, batch_size, world) for lr in learning_rates]
    return LinearHeadGrid(in_dim, num_classes, lrs, weight_decays, n_last_blocks=n_last_blocks, avgpool=avgpool,
                          generator=torch.Generator().manual_seed(seed))


def _train_and_select(heads, batches, val_features, val_labels, test_sets, *, metric, num_classes, loss_type,
                      max_iter, device, checkpoint_path, checkpoint_period, resume, eval_period, log, progress,
                      group) -> Dict:
    """Train `heads` on `batches` (logging the best head on val every eval_period), then pick the best head on
    val and score it on the test sets. Shared by the feature and the augment protocols: they differ only in
    where the training batches come from."""

    def on_eval(it):
        vals = evaluate_heads(heads, val_features, val_labels, metric, num_classes)
        best = select_best_head(vals)
        if log is not None:
            log({"iter": it, "best_classifier": {"name": heads.names[best], "accuracy": float(vals[best])}})

    train_linear_heads(heads, batches, max_iter=max_iter, loss_type=loss_type, device=device,
                       checkpoint_path=checkpoint_path, checkpoint_period=checkpoint_period, resume=resume,
                       eval_period=eval_period, on_eval=on_eval, progress=progress, group=group)
    return _select_and_test(heads, val_features, val_labels, test_sets, metric, num_classes, loss_type)


def _select_and_test(heads, val_features, val_labels, test_sets, metric, num_classes, loss_type) -> Dict:
    """Best head on val; its score on every test set."""
    vals = evaluate_heads(heads, val_features, val_labels, metric, num_classes)
    best = select_best_head(vals)
    out = {"best_classifier": heads.names[best], "val": float(vals[best]),
           "val_metrics": dict(zip(heads.names, vals.tolist())), "test": {}, "heads": heads,
           "num_classes": num_classes, "metric": str(metric), "loss_type": loss_type}
    for name, (tf, ty) in (test_sets or {}).items():
        out["test"][name] = float(evaluate_heads(heads, tf, labels_to_tensor(ty), metric, num_classes)[best])
    return out


# ---- CHAMMI leave-one-out --------------------------------------------------------------------------------------

def linear_leave_one_out(train_features, train_labels, test_features, test_labels, groups, *,
                         score_labels: Optional[Sequence[int]] = (4, 5, 6), num_classes: Optional[int] = None,
                         **probe_kwargs) -> Dict:
    """Reference leave-one-out: for each group g of the test set, heads are trained on train + the other
    groups and predict g; each head's argmax predictions over all groups are scored with scikit-learn macro
    F1 over `score_labels`; the best head is reported (selected on this same score, as the reference)."""
    from sklearn.metrics import f1_score

    train_labels, test_labels, groups, num_classes = _leave_one_out_inputs(train_labels, test_labels, groups,
                                                                           num_classes)
    preds, targets, names = None, [], None
    for fold_features, fold_labels, held in _leave_one_out_folds(train_features, train_labels, test_features,
                                                                 test_labels, groups):
        out = linear_probe_on_features(fold_features, fold_labels, test_features[held], test_labels[held],
                                       num_classes=num_classes, **probe_kwargs)
        heads = out["heads"]
        with torch.no_grad():
            logits = heads(test_features[held].to(heads.weight.device).float()).cpu()
        p = logits.argmax(-1)  # [H, n_g]
        preds = p if preds is None else torch.cat([preds, p], dim=1)
        targets.append(test_labels[held])
        names = heads.names
    y = torch.cat(targets).numpy()
    labels = list(score_labels) if score_labels is not None else list(range(num_classes))
    scores = {n: float(f1_score(y, preds[h].numpy(), average="macro", labels=labels, zero_division=0))
              for h, n in enumerate(names)}
    best = max(scores, key=scores.get)
    return {"best_classifier": best, "f1": scores[best], "head_f1": scores}


# ---- scikit-learn logistic regression ---------------------------------------------------------------------------

def logistic_regression_probe(train_features, train_labels, val_features, val_labels, *, test_sets=None,
                              metric=None, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), max_iter: int = 1000,
                              num_classes: Optional[int] = None, seed: int = 0) -> Dict:
    """Standardised features -> scikit-learn LogisticRegression (one-vs-rest for multi-hot labels), C chosen
    on val, scored on each test set. Returns {"best_C", "val", "val_metrics": {C: value}, "test": {...}}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ytr, yva = labels_to_tensor(train_labels).numpy(), labels_to_tensor(val_labels).numpy()
    multilabel = ytr.ndim == 2
    metric, _ = default_metric_and_loss(ytr, metric)
    if num_classes is None:
        num_classes = max(infer_num_classes(torch.from_numpy(ytr)), infer_num_classes(torch.from_numpy(yva)))
    xtr = np.asarray(train_features, dtype=np.float64)

    def scores_of(model, x):
        x = np.asarray(x, dtype=np.float64)
        if multilabel:
            return model.predict_proba(x)
        proba = np.zeros((len(x), num_classes))
        proba[:, model.classes_] = model.predict_proba(x)  # classes missing from train keep score 0
        return proba

    fitted, vals = {}, {}
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        model = make_pipeline(StandardScaler(), OneVsRestClassifier(clf) if multilabel else clf)
        model.fit(xtr, ytr)
        fitted[C] = model
        vals[C] = compute_metric(metric, scores_of(model, val_features), yva, num_classes)
    best = max(Cs, key=lambda c: (vals[c], -Cs.index(c)))
    out = {"best_C": best, "val": vals[best], "val_metrics": vals, "test": {}, "metric": str(metric)}
    for name, (tf, ty) in (test_sets or {}).items():
        out["test"][name] = compute_metric(metric, scores_of(fitted[best], tf), labels_to_tensor(ty).numpy(),
                                           num_classes)
    return out


# ---- end to end on a model -----------------------------------------------------------------------------------------

def _append_jsonl(path: Optional[str], record: dict, group=None) -> None:
    if path is None or not _dist.is_main_process(group):
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate_linear(model, train_dataset, val_dataset, *, test_datasets=None, mode: str = "augment",
                    metric=None, loss_type=None, learning_rates=DEFAULT_LEARNING_RATES,
                    weight_decays=DEFAULT_WEIGHT_DECAYS, batch_size: int = 64, epochs: int = 30,
                    epoch_length: int = 145, n_last_blocks: int = 4, avgpool: bool = False,
                    bag_of_channels: bool = False, crop_size: int = 384, resize_size: int = 0,
                    num_workers: int = 0, device=None, autocast_dtype="auto", output_dir: Optional[str] = None,
                    resume: bool = True, save_checkpoint_frequency: int = 1250, eval_period_iterations: int = 1250,
                    leave_one_out_dataset: Optional[str] = None, sklearn_probe: bool = False,
                    dataset_names: Optional[Dict[str, str]] = None, seed: int = 0, cache_dir: Optional[str] = None,
                    progress: bool = True, group=None) -> Dict:
    """Linear-probe an in-memory backbone. Datasets: objects with (image, target) items already transformed, or
    `Name:key=value` strings (train built with the random-crop + flip transform in augment mode, the center crop
    otherwise). Returns the reference-named results {"<val>_accuracy": x100, "best_classifier": name,
    "<test>_accuracy": x100, ...} plus "note" when val = test; with output_dir also appends them to
    results_eval_linear.json (JSON lines)."""
    from .features import extract_features, resolve_device
    from .inputs import make_eval_dataset, prepare_eval_datasets

    if mode not in ("augment", "features"):
        raise ValueError(f"mode {mode!r}: expected augment or features")
    device = resolve_device(device)
    tests = {f"test{i}": ds for i, ds in enumerate(test_datasets or [])}
    prepared = prepare_eval_datasets({"train": train_dataset, "val": val_dataset, **tests}, crop_size=crop_size,
                                     resize_size=resize_size, names=dataset_names, model=model, group=group)
    names, built = prepared.names, prepared.datasets
    train_eval, val_ds = built["train"], built["val"]
    results_path = os.path.join(output_dir, "results_eval_linear.json") if output_dir else None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)

    opts = dict(kind="linear", n_last_blocks=n_last_blocks, avgpool=avgpool, bag_of_channels=bag_of_channels,
                batch_size=batch_size, num_workers=num_workers, device=device, autocast_dtype=autocast_dtype,
                progress=progress, group=group)

    def feats(ds, key):
        sub = None if cache_dir is None else os.path.join(cache_dir, key)
        f = extract_features(model, ds, cache_dir=sub, desc=f"features {key}", **opts)
        return f.features, f.labels

    # the leave-one-out metadata is read before the long part: a bad file fails at once
    groups = read_leave_one_out_groups(leave_one_out_dataset) if leave_one_out_dataset else None
    val_f, val_y = feats(val_ds, "val")
    test_sets = {names[key]: feats(built[key], key) for key in tests if key in built}

    if leave_one_out_dataset:
        train_f, train_y = feats(train_eval, "train")
        require_group_count(groups, len(val_y), leave_one_out_dataset)
        loo = linear_leave_one_out(train_f, train_y, val_f, val_y, groups, learning_rates=learning_rates,
                                   weight_decays=weight_decays, batch_size=batch_size, epochs=epochs,
                                   epoch_length=epoch_length, n_last_blocks=n_last_blocks, avgpool=avgpool,
                                   device=device, seed=seed, progress=progress, group=group,
                                   num_classes=max(infer_num_classes(train_y), infer_num_classes(val_y)))
        results = {f"{names['val']}_leave_one_out_f1": 100.0 * loo["f1"], "best_classifier": loo["best_classifier"],
                   "note": "leave-one-out: heads selected on the same groups they are scored on (as the reference)"}
        for k, v in results.items():
            _append_jsonl(results_path, {k: v}, group)
        return {**results, "head_f1": loo["head_f1"]}

    ckpt = os.path.join(output_dir, "linear_heads_checkpoint.pth") if output_dir else None
    log = (lambda rec: _append_jsonl(results_path, rec, group)) if results_path else None
    common = dict(metric=metric, loss_type=loss_type, learning_rates=learning_rates, weight_decays=weight_decays,
                  batch_size=batch_size, epochs=epochs, epoch_length=epoch_length, n_last_blocks=n_last_blocks,
                  avgpool=avgpool, device=device, seed=seed, checkpoint_path=ckpt,
                  checkpoint_period=save_checkpoint_frequency, resume=resume, eval_period=eval_period_iterations,
                  log=log, progress=progress, group=group)
    if mode == "features":
        train_f, train_y = feats(train_eval, "train")
        out = linear_probe_on_features(train_f, train_y, val_f, val_y, test_sets=test_sets, **common)
    else:
        train_aug = (make_eval_dataset(train_dataset, crop_size=crop_size, resize_size=resize_size, augment=True)
                     if isinstance(train_dataset, str) else train_dataset)
        out = _linear_probe_augment(model, train_aug, val_f, val_y, test_sets, num_workers=num_workers,
                                    autocast_dtype=autocast_dtype, bag_of_channels=bag_of_channels, **common)

    results = {f"{names['val']}_accuracy": 100.0 * out["val"], "best_classifier": out["best_classifier"]}
    for name, value in out["test"].items():
        results[f"{name}_accuracy"] = 100.0 * value
    if not out["test"]:  # said once: the CLI prints it with the results
        results["note"] = ("no test dataset: the reported score is on the validation set that also chose the best "
                           "head (as the reference does)")
    _append_jsonl(results_path, {"iter": epochs * epoch_length}, group)
    _append_jsonl(results_path, {"best_classifier": {"name": out["best_classifier"], "accuracy": out["val"]}}, group)
    for k, v in results.items():
        if k != "best_classifier":  # written just above in the reference's {"name", "accuracy"} form
            _append_jsonl(results_path, {k: v}, group)
    if sklearn_probe:
        train_f, train_y = feats(train_eval, "train")
        lr = logistic_regression_probe(train_f, train_y, val_f, val_y, test_sets=test_sets, metric=out["metric"],
                                       num_classes=out["num_classes"], seed=seed)
        results[f"{names['val']}_logistic_regression"] = 100.0 * lr["val"]
        for name, value in lr["test"].items():
            results[f"{name}_logistic_regression"] = 100.0 * value
        results["logistic_regression_C"] = lr["best_C"]
        for k in [k for k in results if "logistic_regression" in k]:
            _append_jsonl(results_path, {k: results[k]}, group)
    return {**results, "val_metrics": out["val_metrics"], "metric": out["metric"]}


def _linear_probe_augment(model, train_dataset, val_f, val_y, test_sets, *, num_workers, autocast_dtype,
                          bag_of_channels, metric, loss_type, learning_rates, weight_decays, batch_size, epochs,
                          epoch_length, n_last_blocks, avgpool, device, seed, checkpoint_path, checkpoint_period,
                          resume, eval_period, log, progress, group):
    """The reference protocol: augmented images through the frozen backbone every iteration."""
    from celldino.data.loaders import SamplerType, make_data_loader

    from .features import FeatureModel, FeatureOptions, autocast_dtype_for

    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    options = FeatureOptions(kind="linear", n_last_blocks=n_last_blocks, avgpool=avgpool,
                             bag_of_channels=bag_of_channels)
    fm = FeatureModel(model, options, autocast_dtype_for(device, autocast_dtype))
    val_y = labels_to_tensor(val_y)
    probe = next(iter(torch.utils.data.DataLoader(train_dataset, batch_size=1)))
    train_y_sample = labels_to_tensor(probe[1])
    multilabel = train_y_sample.dim() == 2
    metric, loss_type = default_metric_and_loss(train_y_sample, metric, loss_type)
    with torch.no_grad():
        in_dim = fm(probe[0].to(device).float()).shape[1]
    if multilabel:
        num_classes = int(train_y_sample.shape[1])
    else:
        targets = getattr(train_dataset, "get_targets", None)
        num_classes = infer_num_classes(torch.as_tensor(np.asarray(targets()))) if targets else None
        num_classes = max(num_classes or 0, infer_num_classes(val_y))
    heads = _head_grid(in_dim, num_classes, learning_rates, weight_decays, batch_size, n_last_blocks, avgpool, seed,
                       group)

    def batches(start_iter):
        loader = make_data_loader(dataset=train_dataset, batch_size=batch_size, num_workers=num_workers,
                                  shuffle=True, seed=seed, sampler_type=SamplerType.INFINITE,
                                  sampler_advance=start_iter * batch_size, drop_last=True)
        for images, labels in loader:
            with torch.no_grad():
                x = fm(images.to(device, non_blocking=True).float())
            yield x, labels_to_tensor(labels)

    return _train_and_select(heads, batches, val_f, val_y, test_sets, metric=metric, num_classes=num_classes,
                             loss_type=loss_type, max_iter=epochs * epoch_length, device=device,
                             checkpoint_path=checkpoint_path, checkpoint_period=checkpoint_period, resume=resume,
                             eval_period=eval_period, log=log, progress=progress, group=group)
