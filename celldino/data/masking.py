"""BEiT-style block masking for iBOT (reference `dinov2/data/masking.py`), with the placement loop compiled by
numba.

Statistics are the reference's: blocks are added until the requested patch count is reached or a block adds
nothing; each block makes up to 10 attempts with area U(min_num_patches, remaining budget capped at
max_num_patches), log-uniform aspect ratio in [min_aspect, max_aspect], h = round(sqrt(area * r)),
w = round(sqrt(area / r)) (half to even), position uniform; an attempt is kept when it adds between 1 and the
remaining budget of new patches.

All random numbers come from one numpy buffer drawn up front, so the numba loop and its pure-Python twin
(used when numba is missing, or with backend="python") give bit-identical masks for the same generator state.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np

from .rng import ProcessLocalRNG

logger = logging.getLogger("celldino")

__all__ = ["MaskingGenerator", "NUMBA_AVAILABLE"]

_ATTEMPTS = 10  # reference: attempts per block
_DRAWS_PER_ATTEMPT = 4  # area, aspect, top, left


def _place_blocks(mask, num_masking_patches, min_num_patches, max_num_patches, log_lo, log_hi, u):
    """Fill `mask` (bool H x W, modified in place) with blocks; returns the number of masked patches.
    `u` holds uniforms in [0, 1), at least (num_masking_patches + 1) * 40 of them."""
    height, width = mask.shape
    k = 0
    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
        delta = 0
        for _ in range(10):
            target_area = min_num_patches + (max_mask_patches - min_num_patches) * u[k]
            aspect_ratio = math.exp(log_lo + (log_hi - log_lo) * u[k + 1])
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = int(u[k + 2] * (height - h + 1))
                left = int(u[k + 3] * (width - w + 1))
                num_masked = 0
                for i in range(top, top + h):
                    for j in range(left, left + w):
                        if mask[i, j]:
                            num_masked += 1
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            k += 4
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask_count


try:
    import numba

    _place_blocks_numba = numba.njit(cache=True, nogil=True)(_place_blocks)
    NUMBA_AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a declared dependency
    _place_blocks_numba = None
    NUMBA_AVAILABLE = False


def _numba_ready() -> bool:
    """Compile (or load from numba's cache) the placement loop in this process, once. Done when a generator is
    built, before DataLoader workers fork: a worker that compiles on its first batch imports numba's and scipy's
    modules after fork, and that import deadlocked in bench_data's workers (its process had run DALI pipelines and
    thread pools before forking); forked workers also skip the compile. False (and a warning) when numba cannot
    compile here."""
    global _NUMBA_STATE
    if _NUMBA_STATE is None:
        try:
            _place_blocks_numba(np.zeros((2, 2), dtype=np.bool_), 1, 1.0, 1.0, 0.0, 0.0, np.zeros(80))
            _NUMBA_STATE = True
        except Exception as e:  # e.g. no writable numba cache dir: the twin gives the same masks
            logger.warning("numba masking unavailable (%s: %s); using the pure-Python twin", type(e).__name__, e)
            _NUMBA_STATE = False
    return _NUMBA_STATE


_NUMBA_STATE = None  # None: not tried yet in this process


def training_max_num_patches(crop_size: int, patch_size: int) -> float:
    """max_num_patches of the training mask generator, exactly as the reference trainer writes it:
    `0.5 * crop_size // patch_size * crop_size // patch_size`, evaluated left to right. That is half the patch grid
    (98 at 224 / 16) when (crop_size / 2) is a multiple of patch_size, and less otherwise (21, not 24.5, at 112 / 16)."""
    return 0.5 * crop_size // patch_size * crop_size // patch_size


class MaskingGenerator:
    """Callable: `gen(num_masking_patches)` -> bool array (H, W) with (at most) that many True patches.

    input_size: grid side or (H, W). max_num_patches: cap on one block's new patches (reference default:
    num_masking_patches; the trainer passes 0.5 * H * W). backend: "auto" (numba when installed), "numba",
    "python". seed: see ProcessLocalRNG (each DataLoader worker gets its own stream); `rng=` on a call
    overrides it.
    """

    def __init__(
        self,
        input_size,
        num_masking_patches: Optional[int] = None,
        min_num_patches: int = 4,
        max_num_patches: Optional[float] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        seed: Optional[int] = None,
        backend: str = "auto",
    ):
        if not isinstance(input_size, (tuple, list)):
            input_size = (input_size,) * 2
        self.height, self.width = (int(v) for v in input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            self.max_num_patches = self.num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        if backend not in ("auto", "numba", "python"):
            raise ValueError(f"backend={backend!r}: expected auto, numba or python")
        if backend == "numba" and not NUMBA_AVAILABLE:
            raise RuntimeError("backend='numba' requested but numba is not installed")
        self.backend = "numba" if backend == "auto" and NUMBA_AVAILABLE else ("python" if backend == "auto" else backend)
        if self.backend == "numba" and not _numba_ready():
            self.backend = "python"
        self.rng = ProcessLocalRNG(seed)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, min {self.min_num_patches}, max {self.max_num_patches}, "
            f"log aspect {self.log_aspect_ratio[0]:.3f}..{self.log_aspect_ratio[1]:.3f}, {self.backend})"
        )

    def get_shape(self):
        return self.height, self.width

    def __call__(self, num_masking_patches: int = 0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=np.bool_)
        n = int(num_masking_patches)
        if n <= 0:
            return mask
        rng = self.rng.get() if rng is None else rng
        u = rng.random((n + 1) * _ATTEMPTS * _DRAWS_PER_ATTEMPT)
        args = (n, float(self.min_num_patches), float(self.max_num_patches), self.log_aspect_ratio[0],
                self.log_aspect_ratio[1], u)
        if self.backend == "numba":
            try:
                _place_blocks_numba(mask, *args)
                return mask
            except Exception as e:  # e.g. no writable numba cache dir: the twin gives the same masks
                logger.warning("numba masking failed (%s: %s); using the pure-Python twin", type(e).__name__, e)
                self.backend = "python"
                mask[:] = False
        _place_blocks(mask, *args)
        return mask
