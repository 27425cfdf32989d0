"""Per-process random streams for code that runs inside DataLoader workers."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

__all__ = ["ProcessLocalRNG"]


class ProcessLocalRNG:
    """A numpy Generator that is re-created in every process (DataLoader worker) that uses it.

    A Generator built in the main process and copied into forked workers would make every worker draw the
    same numbers (the problem the reference has with np.random in workers). Each process gets its own
    stream: seeded from (seed, worker seed) when a seed is given - reproducible, since torch derives worker
    seeds from the loader's generator, which our loaders seed - and from the worker seed alone (or fresh OS
    entropy in the main process) otherwise."""

    def __init__(self, seed: Optional[int] = None):
        self.seed = seed
        self._pid = None
        self._rng = None

    def get(self) -> np.random.Generator:
        pid = os.getpid()
        if self._rng is None or self._pid != pid:
            info = torch.utils.data.get_worker_info()
            worker_seed = [] if info is None else [int(info.seed) % (2**63)]
            if self.seed is not None:
                entropy = [int(self.seed)] + worker_seed
            else:
                entropy = worker_seed or None
            self._rng = np.random.default_rng(entropy)
            self._pid = pid
        return self._rng

    def reseed(self, seed: Optional[int]) -> None:
        self.seed, self._rng, self._pid = seed, None, None

    def __getstate__(self):  # a pickled copy (spawned worker) starts its own stream
        return {"seed": self.seed, "_pid": None, "_rng": None}
