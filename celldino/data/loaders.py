"""Samplers and the DataLoader factory (reference `dinov2/data/{loaders,samplers}.py` semantics).

Samplers yield dataset indices for one rank. `start`/`step` are the rank and world size (default: from
torch.distributed when initialised, else 0 / 1). `advance` skips that many of this rank's samples (resume).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import re
from enum import Enum
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

logger = logging.getLogger("celldino")

__all__ = [
    "SamplerType",
    "InfiniteSampler",
    "ShardedInfiniteSampler",
    "EpochSampler",
    "make_data_loader",
    "seed_worker",
]


class SamplerType(Enum):
    DISTRIBUTED = 0
    EPOCH = 1
    INFINITE = 2
    SHARDED_INFINITE = 3
    SHARDED_INFINITE_NEW = 4


def _rank_world(start, step):
    if start is None or step is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        start = rank if start is None else start
        step = world if step is None else step
    if step < 1 or not 0 <= start < step:
        raise ValueError(f"sampler: need 0 <= start < step, got start={start} step={step}")
    return int(start), int(step)


def _perm_dtype(n: int):
    return torch.int32 if n <= 2**31 - 1 else torch.int64


class _EndlessSampler(Sampler):
    """Arguments shared by the endless samplers: sample_count, shuffle, seed, start / step (rank / world),
    advance (this rank's samples to skip)."""

    def __init__(self, *, sample_count: int, shuffle: bool = False, seed: int = 0, start=None, step=None,
                 advance: int = 0):
        if sample_count < 1:
            raise ValueError(f"{type(self).__name__}: sample_count must be >= 1, got {sample_count}")
        self._sample_count = int(sample_count)
        self._seed = int(seed)
        self._shuffle = shuffle
        self._start, self._step = _rank_world(start, step)
        self._advance = int(advance)


class InfiniteSampler(_EndlessSampler):
    """Endless stream: epoch after epoch over range(sample_count) (shuffled: a new permutation per epoch from
    one torch generator seeded with `seed`), this rank taking every `step`-th element from `start`."""

    def _per_epoch(self) -> int:
        return len(range(self._start, self._sample_count, self._step))

    def __iter__(self):
        per_epoch = self._per_epoch()
        skip_epochs, skip = divmod(self._advance, per_epoch) if per_epoch else (0, 0)
        if not self._shuffle:
            it = itertools.chain.from_iterable(
                itertools.repeat(range(self._start, self._sample_count, self._step))
            )
            yield from itertools.islice(it, skip, None)
            return
        generator = torch.Generator().manual_seed(self._seed)
        for _ in range(skip_epochs):  # keep the generator in step with an unskipped run
            torch.randperm(self._sample_count, generator=generator, dtype=_perm_dtype(self._sample_count))
        first = True
        while True:
            perm = torch.randperm(self._sample_count, generator=generator, dtype=_perm_dtype(self._sample_count))
            part = perm[self._start :: self._step].tolist()
            yield from (part[skip:] if first else part)
            first = False


def _epoch_seed(seed: int, start: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{start}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ShardedInfiniteSampler(_EndlessSampler):
    """Endless stream where every rank owns a fixed shard: one global permutation (seeded with `seed`) is
    split as perm[start::step]; each epoch the rank visits its shard in a new order seeded by
    (seed, rank, epoch). Advancing is O(1) in the number of skipped epochs.

    use_new_shuffle_tensor_slice: accepted for the reference's signature and ignored: the reference's two
    shuffle implementations are one here (SHARDED_INFINITE and SHARDED_INFINITE_NEW give the same stream)."""

    def __init__(self, *, sample_count: int, shuffle: bool = False, seed: int = 0, start=None, step=None,
                 advance: int = 0, use_new_shuffle_tensor_slice: bool = False):
        super().__init__(sample_count=sample_count, shuffle=shuffle, seed=seed, start=start, step=step,
                         advance=advance)

    def __iter__(self):
        if self._shuffle:
            g = torch.Generator().manual_seed(self._seed)
            shard = torch.randperm(self._sample_count, generator=g, dtype=_perm_dtype(self._sample_count))
            shard = shard[self._start :: self._step]
        else:
            shard = torch.arange(self._start, self._sample_count, self._step)
        n = shard.numel()
        if n == 0:
            return
        epoch, skip = divmod(self._advance, n)
        while True:
            if self._shuffle:
                g = torch.Generator().manual_seed(_epoch_seed(self._seed, self._start, epoch))
                order = shard[torch.randperm(n, generator=g)].tolist()
            else:
                order = shard.tolist()
            yield from order[skip:]
            skip = 0
            epoch += 1


class EpochSampler(Sampler):
    """Finite: `size` indices per epoch (range(sample_count) tiled as needed; shuffled without replacement
    with a seed derived from (seed, epoch)), this rank taking every `step`-th. Call set_epoch each epoch."""

    def __init__(self, *, size: int, sample_count: int, shuffle: bool = False, seed: int = 0, start=None,
                 step=None):
        self._size = int(size)
        self._sample_count = int(sample_count)
        self._shuffle = shuffle
        self._seed = int(seed)
        self._start, self._step = _rank_world(start, step)
        self._epoch = 0

    def __iter__(self):
        count = -(-self._size // self._sample_count)
        tiled = np.tile(np.arange(self._sample_count), count)
        if self._shuffle:
            rng = np.random.default_rng([self._seed, self._epoch])
            order = rng.choice(tiled, self._size, replace=False)
        else:
            order = tiled[: self._size]
        yield from order[self._start :: self._step].tolist()

    def __len__(self) -> int:
        return len(range(self._start, self._size, self._step))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed numpy's and Python's global RNGs from this worker's torch seed (distinct per
    worker, derived from the loader's seeded generator), and keep intra-op threads and TIFF decode threads at 1
    in workers (the workers are the parallelism). Workers ignore SIGTERM / SIGUSR1 / SIGUSR2: a scheduler signals
    the whole process group on preemption, and the training process must outlive its workers to checkpoint
    (a worker killed first ends the run with "DataLoader worker is killed"); the loader stops them itself."""
    import signal

    from .io import set_decode_threads

    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)
    set_decode_threads(1)


def _make_sampler(dataset, sampler_type, shuffle, seed, size, advance):
    n = len(dataset)
    if sampler_type == SamplerType.INFINITE:
        return InfiniteSampler(sample_count=n, shuffle=shuffle, seed=seed, advance=advance)
    if sampler_type in (SamplerType.SHARDED_INFINITE, SamplerType.SHARDED_INFINITE_NEW):
        return ShardedInfiniteSampler(sample_count=n, shuffle=shuffle, seed=seed, advance=advance,
                                      use_new_shuffle_tensor_slice=sampler_type == SamplerType.SHARDED_INFINITE_NEW)
    if sampler_type == SamplerType.EPOCH:
        if advance:
            raise ValueError("sampler advance is not supported for the EPOCH sampler")
        return EpochSampler(size=size if size > 0 else n, sample_count=n, shuffle=shuffle, seed=seed)
    if sampler_type == SamplerType.DISTRIBUTED:
        if advance:
            raise ValueError("sampler advance is not supported for the DISTRIBUTED sampler")
        return torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    if sampler_type is None:
        return None
    raise ValueError(f"unknown sampler_type {sampler_type!r}")


def make_data_loader(
    *,
    dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = True,
    seed: int = 0,
    sampler_type: Optional[SamplerType] = SamplerType.INFINITE,
    sampler_size: int = -1,
    sampler_advance: int = 0,
    drop_last: bool = True,
    persistent_workers: bool = False,
    collate_fn: Optional[Callable] = None,
    pin_memory: Optional[bool] = None,
    prefetch_factor: Optional[int] = None,
    worker_init_fn: Optional[Callable] = seed_worker,
) -> DataLoader:
    """DataLoader over `dataset` with one of our samplers (None -> torch's sequential / random sampling).

    pin_memory defaults to True when CUDA is available. Workers are seeded deterministically from `seed`
    (loader generator) and `worker_init_fn` re-seeds numpy / random per worker."""
    if isinstance(sampler_type, str):
        sampler_type = SamplerType[sampler_type.upper()]
    if len(dataset) == 0:
        raise ValueError("make_data_loader: the dataset is empty")
    sampler = _make_sampler(dataset, sampler_type, shuffle, seed, sampler_size, sampler_advance)
    generator = torch.Generator().manual_seed(int(seed))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        extra["prefetch_factor"] = prefetch_factor if prefetch_factor is not None else 2
        extra["worker_init_fn"] = worker_init_fn
    logger.info("data loader: %d samples, batch %d, %d workers, sampler %s", len(dataset), batch_size, num_workers,
                type(sampler).__name__ if sampler is not None else "default")
    return DataLoader(
        dataset,
        sampler=sampler,
        shuffle=shuffle if sampler is None else None,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_fn,
        generator=generator,
        **extra,
    )


# ---- errors raised inside DataLoader workers ---------------------------------------------------------------------

_WORKER_HEADER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+")


def _user_error_names():
    """Class names of the errors that describe bad input (a file, a key) rather than a bug."""
    from celldino.data.datasets.base import DatasetError
    from celldino.data.io import ImageReadError
    names, todo = set(), [DatasetError, ImageReadError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def worker_error_message(exc) -> Optional[str]:
    """The original one-line message of a bad-input error (ImageReadError, DatasetError) raised in a DataLoader
    worker, which torch re-raises in the main process wrapped with the worker's whole traceback; None for any other
    exception (a bug keeps its traceback)."""
    text = str(exc)
    match = _WORKER_HEADER.match(text)
    if match is None or match.group(1) not in _user_error_names():
        return None
    lines = text.rstrip().splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith("  ")), default=0)
    message = "\n".join(lines[last_frame + 1:])
    return re.sub(r"^[\w.]*" + match.group(1) + r": ", "", message)

