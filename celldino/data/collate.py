"""Batch collation for DINO/iBOT pretraining (reference `dinov2/data/collate.py`).

Crops are stacked crop-major (global crop 0 of every sample, then global crop 1, ...). Of the 2B global crops,
int(2B * mask_probability) get iBOT masks: the ratio range is cut at int(2B * p) + 1 float32 linspace edges and
masked crop i asks for int(N * U(edge_i, edge_i+1)) patches; the rest get empty masks; the list is shuffled.
`upperbound` = sum of int(N * edge_i+1). Ratio arithmetic is done on float32 tensors exactly as the reference
does, so the patch counts match it draw for draw.
"""

from __future__ import annotations

import random as _random
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["collate_data_and_cast", "collate_masks", "stack_crops"]

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected a torch dtype or one of {sorted(_DTYPES)}") from None


def stack_crops(samples_list: Sequence, key: str) -> Optional[torch.Tensor]:
    """Crop-major stack of samples_list[b][0][key][i] -> [n_crops * B, C, S, S], None when there are no crops."""
    n = len(samples_list[0][0][key])
    if n == 0:
        return None
    for b, s in enumerate(samples_list):
        if len(s[0][key]) != n:
            raise ValueError(f"sample {b} has {len(s[0][key])} {key}, sample 0 has {n}")
    return torch.stack([s[0][key][i] for i in range(n) for s in samples_list])


def collate_data_and_cast(
    samples_list: Sequence,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    dtype,
    n_tokens: Optional[int] = None,
    mask_generator=None,
    random_module=None,
    mask_rng: Optional[np.random.Generator] = None,
) -> dict:
    """samples_list: [(augmentation dict, target), ...] as produced by a dataset with CellAugmentationDINO /
    DataAugmentationDINO as transform. Targets are ignored (pretraining).

    random_module: source of the ratio draws and the shuffle (default: Python's `random`, as the reference;
    pass a random.Random for a private stream). mask_rng: numpy Generator for the block placement (default:
    the mask generator's own per-process stream).
    Returns collated_global_crops (2B, C, G, G), collated_local_crops (nB, C, L, L) in `dtype`;
    collated_masks (2B, N) bool; mask_indices_list (flat indices of True); masks_weight (1 / masked count of
    the crop, per masked patch); upperbound (int); n_masked_patches (long [1]).
    """
    if not samples_list:
        raise ValueError("collate_data_and_cast: empty batch")
    if mask_generator is None:
        raise ValueError("collate_data_and_cast needs a mask_generator (celldino.data.masking.MaskingGenerator)")
    dtype = _as_dtype(dtype)
    collated_global_crops = stack_crops(samples_list, "global_crops")
    if collated_global_crops is None:
        raise ValueError("collate_data_and_cast: samples have no global crops")
    collated_local_crops = stack_crops(samples_list, "local_crops")
    if collated_local_crops is None:
        collated_local_crops = collated_global_crops.new_empty((0,) + tuple(collated_global_crops.shape[1:2]) + (0, 0))
    masks = collate_masks(len(collated_global_crops), mask_ratio_tuple, mask_probability, mask_generator,
                          n_tokens=n_tokens, random_module=random_module, mask_rng=mask_rng)
    return {"collated_global_crops": collated_global_crops.to(dtype),
            "collated_local_crops": collated_local_crops.to(dtype), **masks}


def collate_masks(n_global_crops, mask_ratio_tuple, mask_probability, mask_generator, n_tokens=None,
                  random_module=None, mask_rng=None) -> dict:
    """The iBOT masks of a batch with `n_global_crops` global crops (2B), as collate_data_and_cast makes them
    (same draws from the same streams): collated_masks, mask_indices_list, masks_weight, upperbound,
    n_masked_patches. The fused augmentation's collates call it directly (their crops come from the fused op)."""
    if mask_generator is None:
        raise ValueError("collate_masks needs a mask_generator (celldino.data.masking.MaskingGenerator)")
    rnd = _random if random_module is None else random_module
    B = int(n_global_crops)
    N = int(n_tokens) if n_tokens is not None else int(mask_generator.num_patches)
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)  # float32 edges, as the reference
    upperbound = 0
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        ratio = prob_min + (prob_max - prob_min) * rnd.random()  # == random.uniform on float32 tensors
        n_masked = int(N * ratio)
        mask = mask_generator(n_masked) if mask_rng is None else mask_generator(n_masked, rng=mask_rng)
        masks_list.append(torch.as_tensor(np.asarray(mask, dtype=bool)))
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(torch.as_tensor(np.asarray(mask_generator(0), dtype=bool)))
    rnd.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    if collated_masks.shape[1] != N:
        raise ValueError(f"mask generator grid has {collated_masks.shape[1]} patches, n_tokens is {N}")
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
