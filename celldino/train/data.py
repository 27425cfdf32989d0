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
from torch.utils.data import Dataset, Sampler, default_collate

from celldino.data import DatasetError, build_dataset
from celldino.data.collate import collate_data_and_cast, collate_masks
from celldino.data.loaders import ShardedInfiniteSampler, seed_worker
from celldino.data.masking import MaskingGenerator, training_max_num_patches

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


class SampledCropsDataset(SeededAugmentedDataset):
    """For the fused augmentation: dataset[(position, index)] -> ((raw image, its CropParams), position).

    The crop parameters are drawn with the same (seed, rank, position) generator as CellAugmentationDINO in
    SeededAugmentedDataset, so the fused path cuts the same crops as the torch path (to fp32 rounding); the pixels
    are left to the fused op (in the collate, or on the training device)."""

    def __getitem__(self, item):
        position, index = item
        image, _ = self.dataset[index]
        if image.ndim != 3:
            raise ValueError(f"sample {index}: expected a C x H x W image, got shape {tuple(image.shape)}")
        generator = np.random.default_rng(derive_seed("sample", self.seed, self.rank, position))
        return (image, self.augmentation.sample_params([tuple(image.shape)], generator)), position


class SeededCollate:
    """collate_data_and_cast with per-batch mask streams; adds batch["iteration"] (= position // batch size).

    fused: None (samples carry their crops), or the FusedCellAugmentation of the fused path, whose samples are
    (raw image, CropParams): with on_device=False the crops are cut here (the C++ op, in the DataLoader worker);
    with on_device=True the batch carries "raw_images" and "crop_params" for `augment_on_device`."""

    def __init__(self, batch_size, seed, rank, mask_ratio_tuple, mask_probability, n_tokens, mask_generator, dtype,
                 fused=None, on_device=False):
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)
        self.kwargs = dict(mask_ratio_tuple=tuple(mask_ratio_tuple), mask_probability=mask_probability,
                           n_tokens=n_tokens, mask_generator=mask_generator, dtype=dtype)
        self.fused, self.on_device = fused, bool(on_device)

    def __call__(self, samples):
        first = samples[0][1]
        iteration = first // self.batch_size
        if first % self.batch_size:
            raise RuntimeError(f"batch starts at sample position {first}, not a multiple of {self.batch_size}")
        streams = dict(random_module=random.Random(derive_seed("mask-ratios", self.seed, self.rank, iteration)),
                       mask_rng=np.random.default_rng(derive_seed("mask-blocks", self.seed, self.rank, iteration)))
        if self.fused is None:
            batch = collate_data_and_cast(samples, **streams, **self.kwargs)
        else:  # the same masks (same draws), crops from the fused op
            kwargs = {k: v for k, v in self.kwargs.items() if k != "dtype"}
            batch = collate_masks(self.fused.n_global_crops * len(samples), **streams, **kwargs)
            batch.update(_pending_crops(samples, stack=self.on_device))
            if not self.on_device:
                augment_on_device(batch, torch.device("cpu"), self.kwargs["dtype"], self.fused.intensity_scale)
            else:
                batch["intensity_scale"] = self.fused.intensity_scale
        batch["iteration"] = iteration
        return batch


def _pending_crops(samples, stack):
    """{"raw_images": the list of images, or with `stack` one B x C x H x W tensor when all images match (one
    pinned copy to the GPU; the C++ op reads the list in place, so it is not stacked for it); "crop_params": the
    batch's CropParams}."""
    from celldino.data.crop_params import concat_crop_params

    images = [s[0][0] for s in samples]
    same = stack and len({(tuple(img.shape), img.dtype) for img in images}) == 1
    # default_collate stacks straight into shared memory inside a DataLoader worker (saves a copy of the batch
    # when it is sent to the training process); elsewhere it is torch.stack
    return {"raw_images": default_collate(images) if same else images,
            "crop_params": concat_crop_params([s[0][1] for s in samples])}


def augment_on_device(batch, device, dtype, intensity_scale=None):
    """Cut the crops of a fused-path batch (raw_images + crop_params) with the fused op on `device` (the CUDA
    kernel on a GPU, the C++ op on CPU) into collated_global_crops / collated_local_crops; a batch that already
    has its crops is returned unchanged."""
    if "crop_params" not in batch:
        return batch
    from celldino.data.fused_augment import fused_multicrop

    images = batch.pop("raw_images")
    params = batch.pop("crop_params")
    intensity_scale = batch.pop("intensity_scale", intensity_scale)
    if isinstance(images, torch.Tensor):
        images = images.to(device, non_blocking=True)
    else:
        images = [img.to(device, non_blocking=True) for img in images]
    batch["collated_global_crops"], batch["collated_local_crops"] = fused_multicrop(
        images, params, out_dtype=dtype, intensity_scale=intensity_scale, device=device)
    return batch


AUGMENTATIONS = ("auto", "torch", "fused_cpu", "fused_device")


def augmentation_mode(cfg, device):
    """train.augmentation resolved for `device`: torch (per sample, in the DataLoader workers) | fused_cpu (the C++
    op per batch, in the workers) | fused_device (the fused op per batch on the training device, in the main
    process: the CUDA kernel on a GPU). auto: fused_device on a GPU when celldino._C has its CUDA kernel and
    train.cell_augmentation is on, else torch."""
    mode = str(cfg.train.get("augmentation", "auto")).lower()
    if mode not in AUGMENTATIONS:
        raise ValueError(f"train.augmentation: expected one of {', '.join(AUGMENTATIONS)}, got {mode!r}")
    from celldino.data import fused_augment
    if mode == "auto":
        usable = (cfg.train.cell_augmentation and device.type == "cuda"
                  and fused_augment.cuda_extension_available())
        return "fused_device" if usable else "torch"
    if mode != "torch":
        if not cfg.train.cell_augmentation:
            raise ValueError(f"train.augmentation={mode} is the Cell-DINO multi-channel augmentation: it needs "
                             "train.cell_augmentation=true")
        if not fused_augment.extension_available():
            raise fused_augment.ExtensionNotBuiltError(
                f"train.augmentation={mode} needs the celldino._C extension. {fused_augment.BUILD_HINT}")
        if mode == "fused_device" and device.type == "cuda" and not fused_augment.cuda_extension_available():
            raise fused_augment.ExtensionNotBuiltError(
                f"train.augmentation=fused_device on {device} needs celldino._C built with CUDA. "
                f"{fused_augment.BUILD_HINT}")
    return mode


def build_augmentation(cfg, mode="torch"):
    crops = cfg.crops
    if mode != "torch":
        from celldino.data.fused_augment import FusedCellAugmentation
        return FusedCellAugmentation(crops.global_crops_scale, crops.local_crops_scale, crops.local_crops_number,
                                     global_crops_size=crops.global_crops_size,
                                     local_crops_size=crops.local_crops_size)
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


def open_train_dataset(cfg):
    """cfg.train.dataset_path, opened and checked before the model is built: a bad dataset string or path names the
    key, and the first image's channel count must equal student.in_chans (otherwise the mismatch surfaces inside
    the patch embedding, naming neither the file nor the key)."""
    spec = str(cfg.train.dataset_path)
    try:
        dataset = build_dataset(spec)
    except DatasetError as exc:
        raise DatasetError(f"train.dataset_path: {exc}") from exc
    image, _ = dataset[0]
    expected, found = int(cfg.student.in_chans), int(image.shape[0])
    if found != expected:
        where = dataset.image_path(0) if hasattr(dataset, "image_path") else f"{spec} item 0"
        raise DatasetError(f"train.dataset_path: {where} has {found} channel(s) (after any channels= selection) but "
                           f"student.in_chans={expected}: set student.in_chans={found}, or select "
                           f"{expected} channel(s) with :channels=... in the dataset string")
    return dataset


def build_train_loader(cfg, start_iter=0, rank=0, world_size=1, dtype=torch.float32, dataset=None,
                       device=torch.device("cpu")):
    """The infinite training DataLoader of this rank, positioned at iteration `start_iter`. With
    train.augmentation resolved to fused_device, its batches still need `augment_on_device(batch, device, dtype)`
    (the trainer does it)."""
    batch_size = int(cfg.train.batch_size_per_gpu)
    seed = int(cfg.train.seed)
    mode = augmentation_mode(cfg, device)
    if dataset is None:
        dataset = build_dataset(cfg.train.dataset_path)
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    mask_generator = MaskingGenerator(input_size=(side, side), max_num_patches=training_max_num_patches(
        cfg.crops.global_crops_size, cfg.student.patch_size))
    augmentation = build_augmentation(cfg, mode)
    fused = augmentation if mode != "torch" else None
    collate = SeededCollate(batch_size, seed, rank, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability,
                            side * side, mask_generator, dtype, fused=fused, on_device=mode == "fused_device")
    wrapped = (SampledCropsDataset if fused is not None else SeededAugmentedDataset)(dataset, augmentation, seed, rank)
    sampler = PositionedSampler(len(dataset), seed, rank, world_size, advance=start_iter * batch_size)
    num_workers = int(cfg.train.num_workers)
    extra = dict(prefetch_factor=2, worker_init_fn=seed_worker, persistent_workers=False) if num_workers else {}
    logger.info("training data: %s (%d images), batch %d per rank, %d workers, augmentation %s%s, starting at "
                "iteration %d", cfg.train.dataset_path, len(dataset), batch_size, num_workers, mode,
                f" on {device}" if mode == "fused_device" else "", start_iter)
    return torch.utils.data.DataLoader(wrapped, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True,
                                       **extra)
