"""Frozen-backbone features for embeddings, kNN and linear probes (reference_spec.md §6.1, §6.2).

Feature kinds (`FeatureOptions.kind`):
  "cls"     the final-norm CLS token, `model(x)` (what the hub models return); with bag of channels the
            channel-concatenated last-block CLS tokens (+ per-channel patch means with avgpool)
  "knn"     "cls", L2-normalised (reference ModelWithNormalize / BagOfChannelsModelWithNormalize)
  "linear"  the linear-probe input: CLS tokens of the last n blocks concatenated, plus with avgpool the mean of
            the last block's patch tokens (reference create_linear_input); with bag of channels every term is
            concatenated over the C channels (x C dimensions)
Bag of channels: each channel is encoded as its own one-channel image (the model's channel_adaptive mode, or
done here for a one-channel model that was loaded without that flag).

`extract_features(model, dataset, ...)` runs the backbone under autocast (GPU; fp16 by default as the
reference), batched, with a progress bar; with a process group each rank encodes its share and everybody gets
everything back; with `cache_dir` the work is cut into chunks written atomically to disk and a rerun skips the
chunks already there (large sets, preemption).

Images of different sizes: a batch is split into runs of equal shape and each run is one forward pass (batch
size 1 at worst); give a crop size to get full batches. Channel counts must match the model's in_chans
(bag of channels: be the same for every image, since the feature size is C x D).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from celldino.files import atomic_torch_save, atomic_write_text

from celldino import dist as _dist
from .inputs import (ImageFileDataset, build_input_dataset, dataset_spec, make_eval_dataset,  # noqa: F401 - public
                     make_eval_transform, require_several_classes, share_label_space, warn_if_crop_pads)

logger = logging.getLogger("celldino")

__all__ = [
    "FeatureOptions",
    "Features",
    "FeatureModel",
    "linear_input",
    "extract_features",
    "make_eval_transform",
    "make_eval_dataset",
    "build_input_dataset",
    "ImageFileDataset",
    "dataset_spec",
    "describe_item",
    "require_several_classes",
    "warn_if_crop_pads",
    "dataset_ids",
    "patch_size_of",
    "share_label_space",
    "parse_dtype",
    "autocast_dtype_for",
    "resolve_device",
]

KINDS = ("cls", "knn", "linear")


def parse_dtype(value) -> Optional[torch.dtype]:
    """'fp16' | 'float16' | 'bf16' | 'bfloat16' | 'fp32' | 'float32' | torch.dtype | None -> torch.dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    s = str(value).lower().replace("torch.", "")
    table = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if s not in table:
        raise ValueError(f"dtype {value!r}: expected fp16, bf16 or fp32")
    return table[s]


def autocast_dtype_for(device, autocast_dtype="auto") -> Optional[torch.dtype]:
    """The backbone's autocast dtype: "auto" is fp16 on GPU (the reference's eval dtype) and none (fp32) on CPU;
    anything else goes through parse_dtype. One rule, so that extracted features and the linear protocol's
    augmented batches are encoded alike."""
    if autocast_dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    return parse_dtype(autocast_dtype)


def resolve_device(device=None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class FeatureOptions:
    kind: str = "cls"
    n_last_blocks: int = 1
    avgpool: bool = False
    bag_of_channels: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"feature kind {self.kind!r}: expected one of {KINDS}")
        if int(self.n_last_blocks) < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {self.n_last_blocks}")


def linear_input(layers, n_last_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
    """Reference create_linear_input on get_intermediate_layers(..., return_class_token=True) output: a
    sequence of (patch tokens, CLS) pairs (patch tokens [B, N, D], or [B, C, N, D] with CLS [B, C*D] in bag of
    channels). Returns float32 [B, n*D (+D)] (x C in bag of channels)."""
    taken = list(layers)[-n_last_blocks:]
    out = torch.cat([cls for _, cls in taken], dim=-1)
    if avgpool:
        patches = taken[-1][0]
        pooled = patches.mean(dim=-2).reshape(patches.shape[0], -1)  # mean over tokens, then over channels concat
        out = torch.cat((out, pooled), dim=-1)
    return out.reshape(out.shape[0], -1).float()


def patch_size_of(model) -> Optional[tuple]:
    """(height, width) of the backbone's patches, None when it has no patch embedding."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if size is None:
        size = getattr(model, "patch_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)


def _in_chans(model) -> Optional[int]:
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "in_chans" in config:
        return int(config["in_chans"])
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return int(proj.in_channels) if proj is not None else None


class FeatureModel(nn.Module):
    """Wraps a backbone: images [B, C, H, W] (float, self-normalised) -> features [B, F] float32."""

    def __init__(self, model: nn.Module, options: FeatureOptions = FeatureOptions(), autocast_dtype=None):
        super().__init__()
        self.model = model
        self.options = options
        self.autocast_dtype = parse_dtype(autocast_dtype)
        self.model_bag_of_channels = bool(getattr(model, "bag_of_channels", getattr(model, "channel_adaptive", False)))
        # a channel-adaptive model only accepts bag-of-channels inputs
        self.bag_of_channels = options.bag_of_channels or self.model_bag_of_channels
        self.in_chans = _in_chans(model)
        self.patch_size = patch_size_of(model)
        if self.bag_of_channels and not self.model_bag_of_channels and self.in_chans not in (None, 1):
            raise ValueError(f"bag of channels needs a one-channel backbone (in_chans 1); this one has "
                             f"in_chans {self.in_chans}")

    def _autocast(self, device: torch.device):
        dtype = self.autocast_dtype
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _layers(self, x, n):
        if self.bag_of_channels and not self.model_bag_of_channels:
            b, c, h, w = x.shape
            layers = self.model.get_intermediate_layers(x.reshape(b * c, 1, h, w), n, return_class_token=True)
            return [(p.reshape(b, c, *p.shape[1:]), cls.reshape(b, -1)) for p, cls in layers]
        return self.model.get_intermediate_layers(x, n, return_class_token=True)

    def check_input(self, x: torch.Tensor, where: str = "input") -> None:
        if x.dim() != 4:
            raise ValueError(f"{where}: expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if not self.bag_of_channels and self.in_chans is not None and x.shape[1] != self.in_chans:
            raise ValueError(f"{where}: the image has {x.shape[1]} channels but the model expects "
                             f"{self.in_chans} (in_chans); use --bag-of-channels with a one-channel model, or select "
                             "channels in the dataset string (channels=...)")
        if self.patch_size is not None and (x.shape[-2] % self.patch_size[0] or x.shape[-1] % self.patch_size[1]):
            ph, pw = self.patch_size
            patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
            raise ValueError(f"{where}: image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the model's patch "
                             f"size {patch}: crop the images to a multiple of it, e.g. --crop-size "
                             f"{max(ph, (min(x.shape[-2:]) // ph) * ph)} (crop_size=... in Python; smaller images "
                             "are zero-padded; --resize-size N scales the images first)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        opts = self.options
        with self._autocast(x.device):
            if opts.kind == "linear":
                out = linear_input(self._layers(x, opts.n_last_blocks), opts.n_last_blocks, opts.avgpool)
            elif self.bag_of_channels or opts.avgpool or opts.n_last_blocks > 1:
                n = opts.n_last_blocks
                out = linear_input(self._layers(x, n), n, opts.avgpool)
            else:
                out = self.model(x).float()
        out = out.float()
        if opts.kind == "knn":
            out = F.normalize(out, dim=1, p=2)
        return out


@dataclass
class Features:
    features: torch.Tensor          # [N, F] float32, CPU
    labels: Optional[torch.Tensor]  # [N] class indices or [N, L] multi-hot (int64), None if unlabelled
    options: FeatureOptions

    def __len__(self):
        return int(self.features.shape[0])


def _id_of_path(path: str, root: Optional[str]) -> str:
    """The path relative to root when the file lies under it, else the absolute path (why: a CSV listing files
    elsewhere gave ids like '../../work/...', which depend on where the CSV sits and name no file)."""
    if root:
        try:
            rel = os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            rel = os.pardir
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return rel
    return os.path.abspath(path)


def dataset_ids(dataset) -> List[str]:
    """One id per item: the image path relative to the dataset root when it lies under it, else its absolute
    path (+ '#c<k>' per channel in bag of channels datasets); the index for datasets without image paths."""
    n = len(dataset)
    if not hasattr(dataset, "image_path"):
        return [str(i) for i in range(n)]
    root = getattr(dataset, "root", None)
    ids = []
    for i in range(n):
        path = _id_of_path(dataset.image_path(i), root)
        if getattr(dataset, "separate_channels", False) and hasattr(dataset, "locate"):
            path = f"{path}#c{dataset.locate(i)[1]}"
        ids.append(path)
    return ids


# ---- extraction -------------------------------------------------------------------------------------------------

def _collate_list(batch):
    return batch


def _target_array(target) -> np.ndarray:
    if isinstance(target, torch.Tensor):
        return target.detach().cpu().numpy()
    return np.asarray(target)


def _fingerprint(model, dataset, options, n, autocast_dtype) -> dict:
    """What a cached chunk depends on (a mismatch means the cache belongs to another run)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if p.is_floating_point() and p.numel():
                flat = p.detach().reshape(-1)
                h.update(name.encode())
                h.update(np.float64(flat.double().sum().item()).tobytes())
                h.update(np.float64(flat[:: max(1, flat.numel() // 64)].double().sum().item()).tobytes())
    ids = dataset_ids(dataset) if hasattr(dataset, "image_path") else []
    return {"n": int(n), "options": asdict(options), "autocast_dtype": str(autocast_dtype),
            "model": h.hexdigest(), "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None,
            "transform": repr(getattr(dataset, "transform", None)),
            "classes": list(map(str, dataset.classes)) if getattr(dataset, "classes", None) is not None else None}


def _chunk_path(cache_dir, start, end):
    return os.path.join(cache_dir, f"chunk_{start:010d}_{end:010d}.pt")


def _prepare_cache(cache_dir, fingerprint, group):
    os.makedirs(cache_dir, exist_ok=True)
    meta_path = os.path.join(cache_dir, "meta.json")
    if _dist.is_main_process(group):
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise ValueError(f"feature cache {cache_dir} holds features of another run (differs in {diff}); "
                                 "delete it or choose another cache directory")
        else:
            atomic_write_text(meta_path, json.dumps(fingerprint, indent=1))
    _dist.barrier(group)


def describe_item(dataset, index: int, where: Optional[str] = None) -> str:
    """'<where> item <index> (<file>)' for error messages: the file when the dataset knows it."""
    text = f"{where or getattr(dataset, 'name', type(dataset).__name__)} item {index}"
    try:
        return f"{text} ({dataset.image_path(index)})" if hasattr(dataset, "image_path") else text
    except Exception:  # an error message must not fail on a dataset that cannot name the file
        return text


def _encode_range(feature_model, dataset, start, end, *, batch_size, num_workers, device, pbar, where):
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, range(start, end)), batch_size=batch_size, num_workers=num_workers,
                        shuffle=False, collate_fn=_collate_list, pin_memory=device.type == "cuda")
    feats: Optional[torch.Tensor] = None
    labels: List[np.ndarray] = []
    pos = 0
    for batch in loader:
        images = [item[0] for item in batch]
        labels.extend(_target_array(item[1]) for item in batch)
        # runs of equal shape (all of the batch when the transform crops to a fixed size)
        groups: dict = {}
        for j, img in enumerate(images):
            if not isinstance(img, torch.Tensor):
                raise TypeError(f"{describe_item(dataset, start + pos + j, where)} is a {type(img).__name__}, "
                                "expected a tensor (does the dataset have a transform?)")
            groups.setdefault(tuple(img.shape), []).append(j)
        for shape, members in groups.items():
            x = torch.stack([images[j] for j in members]).to(device, non_blocking=True).float()
            feature_model.check_input(x, describe_item(dataset, start + pos + members[0], where))
            out = feature_model(x).cpu()
            if feats is None:
                feats = torch.empty(end - start, out.shape[1], dtype=torch.float32)
            if out.shape[1] != feats.shape[1]:
                raise ValueError(f"{describe_item(dataset, start + pos + members[0], where)} gives {out.shape[1]} "
                                 f"features but earlier items {feats.shape[1]} (bag of channels with different "
                                 "channel counts?)")
            feats[pos + torch.tensor(members)] = out
        pos += len(batch)
        if pbar is not None:
            pbar.update(1)
    return feats, labels


def _labels_tensor(labels: List[np.ndarray]) -> Optional[torch.Tensor]:
    if not labels:
        return None
    try:
        arr = np.stack(labels)
    except ValueError:  # ragged / composite targets (e.g. (protein, cell) pairs): not usable as labels
        logger.warning("targets are not class indices or equal-length multi-hot vectors; labels left out")
        return None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        return None
    return torch.from_numpy(np.ascontiguousarray(arr)).long()


@torch.inference_mode()
def extract_features(model: nn.Module, dataset, *, kind: str = "cls", n_last_blocks: int = 1,
                     avgpool: bool = False, bag_of_channels: bool = False, batch_size: int = 64,
                     num_workers: int = 0, device=None, autocast_dtype="auto", cache_dir: Optional[str] = None,
                     chunk_size: Optional[int] = None, progress: bool = True, group=None,
                     desc: str = "features") -> Features:
    """Features of every item of `dataset` (items (image, target) with image a transformed float tensor),
    in dataset order, float32 on CPU, on every rank.

    autocast_dtype: "auto" = fp16 on GPU (the reference's eval dtype) and fp32 on CPU; or fp16 / bf16 / fp32.
    cache_dir: resumable mode (chunks of `chunk_size` items, default 64 batches, saved atomically; a rerun
    skips finished chunks; with several ranks, the directory must be shared by them).
    """
    options = FeatureOptions(kind=kind, n_last_blocks=n_last_blocks, avgpool=avgpool, bag_of_channels=bag_of_channels)
    device = resolve_device(device)
    autocast_dtype = autocast_dtype_for(device, autocast_dtype)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{desc}: the dataset is empty")
    model = model.to(device).eval()
    feature_model = FeatureModel(model, options, autocast_dtype)
    rank, world = _dist.rank_world(group)
    where = getattr(dataset, "name", type(dataset).__name__)

    if cache_dir is None:
        bounds = [int(b) for b in np.linspace(0, n, world + 1).round()] if world > 1 else [0, n]
        chunks = list(zip(bounds[:-1], bounds[1:]))
        mine = [chunks[rank]]
    else:
        chunk_size = int(chunk_size or 64 * batch_size)
        chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        mine = [c for i, c in enumerate(chunks) if i % world == rank]
        _prepare_cache(cache_dir, _fingerprint(model, dataset, options, n, autocast_dtype), group)
        todo = [c for c in mine if not os.path.exists(_chunk_path(cache_dir, *c))]
        if len(todo) < len(mine):
            logger.info("%s: %d / %d chunks already in %s", desc, len(mine) - len(todo), len(mine), cache_dir)
        mine = todo

    pbar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        pbar = tqdm(total=sum(math.ceil((e - s) / batch_size) for s, e in mine), desc=desc, unit="batch")
    computed = {}
    try:
        for start, end in mine:
            if end <= start:
                continue
            feats, labels = _encode_range(feature_model, dataset, start, end, batch_size=batch_size,
                                          num_workers=num_workers, device=device, pbar=pbar, where=where)
            labels_t = _labels_tensor(labels)
            if cache_dir is not None:
                atomic_torch_save({"features": feats, "labels": labels_t, "start": start, "end": end},
                                  _chunk_path(cache_dir, start, end))
            else:
                computed[(start, end)] = (feats, labels_t)
    finally:
        if pbar is not None:
            pbar.close()

    if cache_dir is not None:
        _dist.barrier(group)
        parts = []
        for start, end in chunks:
            path = _chunk_path(cache_dir, start, end)
            if not os.path.exists(path):
                raise RuntimeError(f"{desc}: chunk {path} is missing after extraction (is {cache_dir} shared by all "
                                   "ranks?)")
            parts.append(torch.load(path, map_location="cpu", weights_only=True))
        features = torch.cat([p["features"] for p in parts])
        labels = None if any(p["labels"] is None for p in parts) else torch.cat([p["labels"] for p in parts])
    elif world == 1:
        features, labels = computed[(0, n)]
    else:
        features, labels = _gather_chunks(computed, chunks, rank, group)
    return Features(features=features, labels=labels, options=options)


def _gather_chunks(computed, chunks, rank, group):
    """Every rank gets every rank's chunk (broadcast from its owner, rank order = dataset order)."""
    mine = computed.get(chunks[rank])
    dims = _dist.all_gather_objects(None if mine is None or mine[0] is None else int(mine[0].shape[1]), group)
    dim = next(d for d in dims if d is not None)
    feats, labels = [], []
    for src, (start, end) in enumerate(chunks):
        if end <= start:
            continue
        local = computed[chunks[src]][0] if src == rank else None
        feats.append(_dist.broadcast_tensor(local, src, (end - start, dim), torch.float32, group).cpu())
        labels.append(_dist.broadcast_object(computed[chunks[src]][1] if src == rank else None, src, group))
    features = torch.cat(feats)
    labels = None if any(lab is None for lab in labels) else torch.cat(labels)
    return features, labels
