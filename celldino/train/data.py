"""The pretraining data stream: dataset -> multi-crop augmentation -> masks -> collated batches.

Every random draw is a function of (train.seed, rank, position): sample k of this rank is augmented with a numpy
Generator seeded by (seed, rank, k) and batch i gets its masks from streams seeded by (seed, rank, i). So the
batch of iteration i is the same whatever the number of DataLoader workers and whether the run was interrupted
and resumed: a resumed run sees exactly the batches an uninterrupted one would (the reference reseeds its sampler
with start_iter instead, so its resumed runs see other data).
"""
import hashlib
import logging
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from celldino.data import build_dataset
from celldino.data.collate import collate_data_and_cast
from celldino.data.loaders import ShardedInfiniteSampler, seed_worker
from celldino.data.masking import MaskingGenerator

logger = logging.getLogger("celldino")


def derive_seed(*parts):
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class PositionedSampler(Sampler):
    """Yields (position, dataset index): position counts this rank's samples from 0 (resume: start at `advance`)."""

    def __init__(self, sample_count, seed, rank, world_size, advance=0):
        self.advance = int(advance)
        self.sampler = ShardedInfiniteSampler(sample_count=sample_count, shuffle=True, seed=seed, start=rank,
                                              step=world_size, advance=self.advance)

    def __iter__(self):
        for position, index in enumerate(self.sampler, start=self.advance):
            yield position, index


class SeededAugmentedDataset(Dataset):
    """dataset[(position, index)] -> (crops dict, position), the augmentation seeded by (seed, rank, position)."""

    def __init__(self, dataset, augmentation, seed, rank):
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed, self.rank = int(seed), int(rank)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        position, index = item
        image, _ = self.dataset[index]
        sample_seed = derive_seed("sample", self.seed, self.rank, position)
        if hasattr(self.augmentation, "sample_params"):  # CellAugmentationDINO takes a numpy generator
            crops = self.augmentation(image, generator=np.random.default_rng(sample_seed))
        else:  # the RGB augmentation draws from torch's global RNG (torchvision): fork it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                crops = self.augmentation(_to_pil(image))
        return crops, position


def _to_pil(image):
    from torchvision.transforms.functional import to_pil_image
    if image.dtype != torch.uint8 or image.shape[0] not in (1, 3):
        raise ValueError(f"train.cell_augmentation=false (the reference RGB augmentation) needs 8-bit 1- or "
                         f"3-channel images; got {image.dtype} with {image.shape[0]} channels: set "
                         "train.cell_augmentation=true for multi-channel / 16-bit microscopy")
    return to_pil_image(image)


class SeededCollate:
    """collate_data_and_cast with per-batch mask streams; adds batch["iteration"] (= position // batch size)."""

    def __init__(self, batch_size, seed, rank, mask_ratio_tuple, mask_probability, n_tokens, mask_generator, dtype):
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)
        self.kwargs = dict(mask_ratio_tuple=tuple(mask_ratio_tuple), mask_probability=mask_probability,
                           n_tokens=n_tokens, mask_generator=mask_generator, dtype=dtype)

    def __call__(self, samples):
        first = samples[0][1]
        iteration = first // self.batch_size
        if first % self.batch_size:
            raise RuntimeError(f"batch starts at sample position {first}, not a multiple of {self.batch_size}")
        batch = collate_data_and_cast(
            samples, random_module=random.Random(derive_seed("mask-ratios", self.seed, self.rank, iteration)),
            mask_rng=np.random.default_rng(derive_seed("mask-blocks", self.seed, self.rank, iteration)),
            **self.kwargs)
        batch["iteration"] = iteration
        return batch


def build_augmentation(cfg):
    crops = cfg.crops
    if cfg.train.cell_augmentation:
        from celldino.data.augment import CellAugmentationDINO
        return CellAugmentationDINO(crops.global_crops_scale, crops.local_crops_scale, crops.local_crops_number,
                                    global_crops_size=crops.global_crops_size,
                                    local_crops_size=crops.local_crops_size)
    from celldino.data.augment import DataAugmentationDINO
    return DataAugmentationDINO(crops.global_crops_scale, crops.local_crops_scale, crops.local_crops_number,
                                global_crops_size=crops.global_crops_size, local_crops_size=crops.local_crops_size)


def n_patch_tokens(cfg):
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    return side * side


def build_train_loader(cfg, start_iter=0, rank=0, world_size=1, dtype=torch.float32, dataset=None):
    """The infinite training DataLoader of this rank, positioned at iteration `start_iter`."""
    batch_size = int(cfg.train.batch_size_per_gpu)
    seed = int(cfg.train.seed)
    if dataset is None:
        dataset = build_dataset(cfg.train.dataset_path)
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    mask_generator = MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)
    collate = SeededCollate(batch_size, seed, rank, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                            side * side, mask_generator, dtype)
    wrapped = SeededAugmentedDataset(dataset, build_augmentation(cfg), seed, rank)
    sampler = PositionedSampler(len(dataset), seed, rank, world_size, advance=start_iter * batch_size)
    num_workers = int(cfg.train.num_workers)
    extra = dict(prefetch_factor=2, worker_init_fn=seed_worker, persistent_workers=False) if num_workers else {}
    logger.info("training data: %s (%d images), batch %d per rank, %d workers, starting at iteration %d",
                cfg.train.dataset_path, len(dataset), batch_size, num_workers, start_iter)
    return torch.utils.data.DataLoader(wrapped, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True,
                                       **extra)
