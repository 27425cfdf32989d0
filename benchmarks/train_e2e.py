"""End to end: the training step fed by its data pipeline from TIFF files (bench_train's `ssl_step+data` rows).

The step rows of bench_train hand every provider one batch already on the device; these rows add what a real run
also waits for: decoding 16-bit fields and cutting 2 global + N local crops. Same files (synthetic 4-channel
uint16 fields, uncompressed TIFF, read through the celldino dataset code), same model, device and number of
DataLoader workers for every provider:

- `celldino+fused_aug`: the celldino trainer's step as `celldino train` feeds it with
  train.augmentation=fused_device: the workers decode and draw crop parameters, the fused op cuts the crops on
  the device (the CUDA kernel on a GPU);
- `celldino+torch_aug`: the same trainer fed by train.augmentation=torch (per-sample CellAugmentationDINO in the
  workers);
- `reference-style+data` (the baseline): bench_train's reference-style step fed the way the reference feeds it:
  per-sample reference Cell-DINO transforms (bench_data.ReferenceStyleCellAugmentation) in the workers, fp16
  collate.

Timing: the batches the workers prefetch while they start are drained first (workers x prefetch + 2 steps), then
`steps` consecutive steps (each `next(loader)` + step) are timed as one span, synchronised at its end: the mean is
the steady-state rate, min(data rate, step rate), and goes in the median_ms column (p20 = p80 = mean); the note
says how long the step waited for data on average.
"""
import copy
import math
import os
import shutil
import tempfile
import time

import torch

from . import common

PREFETCH = 2
NAN = (math.nan, math.nan, math.nan)


def default_workers(on_gpu):
    """The reference's train.num_workers (10), bounded by the cores left beside the main process; 0 on CPU."""
    return min(10, max((os.cpu_count() or 2) - 2, 1)) if on_gpu else 0


def write_dataset(directory, n_fields, size, channels):
    """n_fields channels x size x size uint16 TIFFs in `directory`; returns the celldino dataset spec."""
    from .bench_data import write_fields

    os.makedirs(directory, exist_ok=True)
    write_fields(directory, channels, "none", n_fields, size)
    return f"Folder:root={directory}:labels=false"


class _ReferencePipeline(torch.utils.data.Dataset):
    """dataset[i] -> (reference-style crops dict, 0), as a dinov2 DataLoader worker makes them."""

    def __init__(self, dataset, augmentation):
        self.dataset, self.augmentation = dataset, augmentation

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, _ = self.dataset[index]
        return self.augmentation(image), 0


def reference_loader(cfg, dataset, workers, dtype, pin):
    from functools import partial

    from celldino.data.collate import collate_data_and_cast
    from celldino.data.masking import MaskingGenerator, training_max_num_patches

    from .bench_data import ReferenceStyleCellAugmentation

    crops = cfg.crops
    augmentation = ReferenceStyleCellAugmentation(
        global_size=crops.global_crops_size, local_size=crops.local_crops_size, n_local=crops.local_crops_number,
        global_scale=crops.global_crops_scale, local_scale=crops.local_crops_scale)
    side = crops.global_crops_size // cfg.student.patch_size
    collate = partial(collate_data_and_cast, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                      mask_probability=cfg.ibot.mask_sample_probability, dtype=dtype, n_tokens=side * side,
                      mask_generator=MaskingGenerator((side, side), max_num_patches=training_max_num_patches(
                          crops.global_crops_size, cfg.student.patch_size)))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
    extra = dict(prefetch_factor=PREFETCH) if workers else {}
    return torch.utils.data.DataLoader(_ReferencePipeline(dataset, augmentation),
                                       batch_size=int(cfg.train.batch_size_per_gpu), sampler=sampler,
                                       num_workers=workers, collate_fn=collate, pin_memory=pin, drop_last=True,
                                       **extra)


def time_stream(step, loader, finish, workers, steps, device):
    """(mean ms per step, mean ms waiting for the loader) over `steps` steps after the start-up drain."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = iter(loader)
    try:
        drain = workers * PREFETCH + 2
        for i in range(drain):
            step(finish(next(it)), i)
        sync()
        start, waited = time.perf_counter(), 0.0
        for i in range(steps):
            t = time.perf_counter()
            batch = next(it)
            waited += time.perf_counter() - t
            step(finish(batch), drain + i)
        sync()
        return (time.perf_counter() - start) / steps * 1e3, waited / steps * 1e3
    finally:
        del it  # stops the workers


def _to_device(device):
    def finish(batch):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return finish


PROVIDERS = ("reference-style+data", "celldino+fused_aug", "celldino+torch_aug")  # row order; the first is the baseline


def measure(cfg_for, reference_step, device, batch_size, steps, workers, n_fields, field_size, on_result=None):
    """{provider: (mean ms, ms waiting for data) or (None, why skipped)} for the three providers (module doc).

    cfg_for(overrides): the benchmark config of this batch size with extra overrides; reference_step(cfg, device):
    bench_train's ReferenceStyleStep; on_result(provider, result): called as soon as each provider is measured
    (celldino's two first, the baseline last), so its row can be made before the next one runs (RowMaker)."""
    from celldino.data import build_dataset, fused_augment
    from celldino.train.data import augment_on_device, build_train_loader
    from celldino.train.trainer import Trainer

    results = {}

    def done(provider, result):
        results[provider] = result
        if on_result is not None:
            on_result(provider, result)

    tmp = tempfile.mkdtemp(prefix="bench_train_e2e_")
    try:
        spec = write_dataset(os.path.join(tmp, "fields"), n_fields, field_size, channels=4)
        cfg = cfg_for([f"train.dataset_path={spec}", f"train.num_workers={workers}", "train.cell_augmentation=true",
                       "student.in_chans=4", "teacher.in_chans=4"])
        trainer = Trainer(cfg, os.path.join(tmp, "run"), resume=False)
        try:
            dtype = trainer.plan.input_dtype
            has_fused = (fused_augment.cuda_extension_available() if device.type == "cuda"
                         else fused_augment.extension_available())
            for provider, mode in (("celldino+fused_aug", "fused_device"), ("celldino+torch_aug", "torch")):
                if mode == "fused_device" and not has_fused:
                    done(provider, (None, "skipped: celldino._C built without "
                                          + ("CUDA" if device.type == "cuda" else "its CPU op")))
                    continue
                run_cfg = copy.deepcopy(trainer.cfg)
                run_cfg.train.augmentation = mode
                loader = build_train_loader(run_cfg, 0, device=device, dtype=dtype)
                done(provider, time_stream(trainer.train_step, loader, lambda b: augment_on_device(b, device, dtype),
                                           workers, steps, device))
        finally:
            trainer.close()
            del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref = reference_step(cfg, device)
        ref_dtype = torch.float16 if device.type == "cuda" else torch.float32
        loader = reference_loader(cfg, build_dataset(spec), workers, ref_dtype, pin=device.type == "cuda")
        done("reference-style+data", time_stream(ref.train_step, loader, _to_device(device), workers, steps, device))
        del ref
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


class RowMaker:
    """The `ssl_step+data` rows, each made (common.row) as soon as `measure` reports its provider (pass the maker as
    on_result), so a stop keeps the providers already measured; the baseline, measured last, fills in the others'
    speed-ups. rows(): all three in PROVIDERS order ("not run" rows for providers never reported)."""

    def __init__(self, shape, flops, batch_size, peak, device, workers, field_size, n_fields, on_gpu, note_suffix=""):
        self.shape, self.flops, self.batch_size, self.peak, self.device = shape, flops, batch_size, peak, device
        self.setting = (f"{workers} DataLoader workers; {n_fields} 4-channel {field_size}x{field_size} uint16 TIFFs; "
                        "mean of a steady-state span")
        self.on_gpu, self.note_suffix = on_gpu, note_suffix
        self.made = {}

    def __call__(self, provider, result):
        ms, extra = result
        if ms is None:
            made = common.row("train", "ssl_step+data", provider, self.shape, "", "end to end", NAN,
                              device=self.device, note=f"{extra}; {self.setting}{self.note_suffix}")
        else:
            is_base = provider == PROVIDERS[0]
            mfu = f"MFU {self.flops / ms / 1e9 / self.peak:.1%}" if self.peak else "MFU n/a"
            made = common.row(
                "train", "ssl_step+data", provider, self.shape, "", "end to end (decode + augment + step)",
                (ms, ms, ms), flops=self.flops, items=self.batch_size, device=self.device,
                baseline="" if is_base else PROVIDERS[0],
                note=f"{1e3 / ms:.2f} steps/s; {mfu}; waits {extra:.1f} ms/step for data; {self.setting}"
                     f"{self.note_suffix}" + ("" if self.on_gpu else "; CPU smoke size"))
            if is_base:  # measured last: the others' speed-ups
                common.fill_speedups(self.made.values(), ms)
            elif PROVIDERS[0] in self.made:
                common.fill_speedups([made], self.made[PROVIDERS[0]]["median_ms"])
        self.made[provider] = made
        return made

    def rows(self):
        for provider in PROVIDERS:
            if provider not in self.made:
                self(provider, (None, "not run"))
        return [self.made[p] for p in PROVIDERS]
