"""Fused Cell-DINO multi-crop augmentation: the whole batch's 2 global + N local crops in one call of the C++/CUDA
extension `celldino._C` (op `torch.ops.celldino.fused_multicrop`), CPU (OpenMP) or CUDA (one kernel launch for
the crops, plus one small launch for the per-channel maxima of the protein step when needed).

It computes exactly what `celldino.data.augment.CellAugmentationDINO` computes, crop by crop, from the same
`celldino.data.crop_params.CropParams` (to fp32 rounding; tested against an independent torchvision composition):
intensity scaling -> channel drop -> protein-channel contrast (factor / max of the whole image after the drop) ->
bilinear resized crop (antialias=False) -> h / v flips -> per-channel brightness and contrast with clamping ->
per-channel self-normalisation. See docs/fused_augment.md.

    from celldino.data.fused_augment import FusedCellAugmentation
    aug = FusedCellAugmentation((0.4, 1.0), (0.005, 0.4), 8, out_dtype=torch.bfloat16, seed=0)
    batch = aug(images)             # list of C x H x W uint16 tensors (CPU or CUDA)
    batch["collated_global_crops"]  # [2B, C, 224, 224], crop-major; batch["collated_local_crops"]: [8B, C, 96, 96]
"""

from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .crop_params import CellCropSampler, CropParams
from .intensity import IntensityScale, parse_intensity_scale, scale_intensity

__all__ = [
    "ExtensionNotBuiltError",
    "extension_available",
    "cuda_extension_available",
    "pack_crop_params",
    "fused_multicrop",
    "apply_crop_params",
    "FusedCellAugmentation",
    "benchmark_fused_augment",
]

BUILD_HINT = (
    "Build it from the source checkout with\n"
    "    pip install --no-build-isolation -e .        (or: python setup.py build_ext --inplace)\n"
    "with torch installed first; for the CUDA kernel also set CUDA_HOME (e.g. /usr/local/cuda) and "
    "TORCH_CUDA_ARCH_LIST (e.g. 9.0). `celldino info` shows what was built."
)

_NATIVE_DTYPES = (torch.uint8, torch.uint16, torch.float32)
_OUT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}

_ext = None
_ext_error: Optional[BaseException] = None


class ExtensionNotBuiltError(RuntimeError):
    """celldino._C (or its CUDA part) is not available in this install."""


def _load():
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            import celldino._C as ext  # noqa: F401 - registers torch.ops.celldino.fused_multicrop

            _ext = ext
            _register_fake()
        except ImportError as exc:
            _ext_error = exc
    if _ext is None:
        raise ExtensionNotBuiltError(f"celldino._C is not built ({_ext_error}). {BUILD_HINT}")
    return _ext


def _register_fake():
    """Shape-only implementation so torch.compile / FakeTensor can trace through the op."""
    try:
        @torch.library.register_fake("celldino::fused_multicrop")
        def _fake(images, crop_int, crop_float, channel_max, n_global_rows, global_size, local_size,
                  protein_channel, divisor, out_dtype):
            c = images[0].shape[0]
            n = crop_int.shape[0]
            g = images[0].new_empty((n_global_rows, c, global_size, global_size), dtype=out_dtype)
            l = images[0].new_empty((n - n_global_rows, c, local_size, local_size), dtype=out_dtype)
            return g, l
    except RuntimeError:  # already registered (module reloaded)
        pass


def extension_available() -> bool:
    """True when celldino._C (the CPU implementation at least) is importable."""
    try:
        _load()
        return True
    except ExtensionNotBuiltError:
        return False


def cuda_extension_available() -> bool:
    """True when celldino._C was compiled with its CUDA implementation (it still needs a GPU to run)."""
    return extension_available() and bool(_ext.has_cuda())


def _as_out_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"out_dtype {dtype}: expected float32, bfloat16 or float16")
        return dtype
    try:
        return _OUT_DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"out_dtype {dtype!r}: expected a torch dtype or one of {sorted(_OUT_DTYPES)}") from None


def _as_image_list(images) -> list:
    """A list of C x H x W tensors (views, no copies) from a list / tuple of arrays or tensors or a 4-D tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            return list(images.unbind(0))
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"images: expected a B x C x H x W tensor or a list of C x H x W images, "
                         f"got shape {tuple(images.shape)}")
    out = []
    for k, img in enumerate(images):
        if isinstance(img, np.ndarray):
            img = torch.from_numpy(np.ascontiguousarray(img))
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"images[{k}]: expected a tensor or numpy array, got {type(img).__name__}")
        out.append(img)
    if not out:
        raise ValueError("images is empty")
    return out


def _prepare_images(images: list, scale: IntensityScale, device: torch.device):
    """(images ready for the op: 3-D, contiguous, one native dtype, on `device`; the op's divisor; the divisors
    already applied here per image, or None when the images go to the op in their own dtype)."""
    images = [img[None] if img.ndim == 2 else img for img in images]
    for k, img in enumerate(images):
        if img.ndim != 3:
            raise ValueError(f"images[{k}]: expected C x H x W, got shape {tuple(img.shape)}")
    dtypes = {img.dtype for img in images}
    dtype = next(iter(dtypes))
    if len(dtypes) == 1 and dtype in _NATIVE_DTYPES:
        divisor = scale.divisor_for(dtype)
        divisor = 1.0 if divisor is None else float(divisor)
        prescaled = None
    else:
        # other dtypes (int16, float16, float64, ...) or a mixed batch: scale each image to float32 here,
        # exactly as CellAugmentationDINO's scale_intensity does.
        prescaled = [scale.divisor_for(img.dtype) for img in images]
        images = [scale_intensity(img, scale) for img in images]
        divisor = 1.0
    moved = []
    for img in images:
        if img.device != device:
            if device.type == "cuda" and img.device.type == "cpu":
                img = img.contiguous().pin_memory().to(device, non_blocking=True)
            else:
                img = img.to(device)
        moved.append(img.contiguous())
    return moved, divisor, prescaled


def pack_crop_params(params: CropParams, channels: int):
    """CropParams -> (crop_int int32 [N, 8], crop_float float32 [N, 1 + 2C]) CPU tensors, the op's layout."""
    n = len(params)
    if params.brightness.shape != (n, params.brightness.shape[1]) or params.brightness.shape[1] < channels:
        raise ValueError(f"params.brightness has shape {params.brightness.shape}; need [N={n}, >= C={channels}]")
    if params.contrast.shape != params.brightness.shape:
        raise ValueError(f"params.contrast shape {params.contrast.shape} != brightness {params.brightness.shape}")
    crop_int = np.empty((n, 8), dtype=np.int32)
    crop_int[:, 0] = params.image_index
    crop_int[:, 1:5] = params.box
    crop_int[:, 5:7] = params.flip
    crop_int[:, 7] = params.drop_channel
    crop_float = np.empty((n, 1 + 2 * channels), dtype=np.float32)
    crop_float[:, 0] = params.protein_factor
    crop_float[:, 1:1 + channels] = params.brightness[:, :channels]
    crop_float[:, 1 + channels:] = params.contrast[:, :channels]
    return torch.from_numpy(crop_int), torch.from_numpy(crop_float)


def _group_size(params: CropParams, rows: slice, what: str) -> int:
    sizes = np.unique(params.out_size[rows])
    if sizes.size == 0:
        return 1
    if sizes.size != 1:
        raise ValueError(f"{what} crops have several output sizes {sizes.tolist()}; one size per group")
    return int(sizes[0])


def _scaled_channel_max(channel_max, prescaled, n_images: int, channels: int) -> torch.Tensor:
    """channel_max (raw units) -> float32 [B, C] in the units of the images the op reads: divided per image as
    _prepare_images divided that image (max commutes with a positive division, in float32 too)."""
    channel_max = torch.as_tensor(channel_max).to(dtype=torch.float32)
    if tuple(channel_max.shape) != (n_images, channels):
        raise ValueError(f"channel_max has shape {tuple(channel_max.shape)}; expected [B={n_images}, C={channels}]")
    if prescaled is None:
        return channel_max
    rows = [row if d is None else row / d for row, d in zip(channel_max.cpu().unbind(0), prescaled)]
    return torch.stack(rows)


def fused_multicrop(
    images,
    params: CropParams,
    n_global: Optional[int] = None,
    n_local: Optional[int] = None,
    out_dtype=torch.float32,
    intensity_scale: Union[None, str, float, IntensityScale] = None,
    device=None,
    channel_max: Optional[torch.Tensor] = None,
):
    """All crops of `params` cut from `images` -> (global_crops [n_global*B, C, G, G], local_crops
    [n_local*B, C, L, L]) in `out_dtype`, crop-major like the reference collate.

    images: list of C x H x W tensors / arrays (sizes may differ; uint8, uint16 and float32 are read in place,
    other dtypes are converted to float32 first) or a B x C x H x W tensor. intensity_scale: as
    CellAugmentationDINO (default: integer dtype max, floats unchanged). device: where to run (default: the
    images' device); CUDA tensors use the CUDA kernel, CPU tensors the OpenMP one (torch.get_num_threads()
    threads). channel_max: optional float32 [B, C] maxima of the raw images (saves one pass when the decoder
    already knows them).
    """
    _load()
    image_list = _as_image_list(images)
    n_global = params.n_global if n_global is None else int(n_global)
    n_local = params.n_local if n_local is None else int(n_local)
    b = len(image_list)
    if params.n_images and params.n_images != b:
        raise ValueError(f"params were sampled for {params.n_images} images, got {b}")
    if (n_global + n_local) * b != len(params):
        raise ValueError(f"params have {len(params)} rows; expected (n_global={n_global} + n_local={n_local}) x "
                         f"{b} images = {(n_global + n_local) * b}")
    device = torch.device(device) if device is not None else image_list[0].device
    if device.type == "cuda" and not _ext.has_cuda():
        raise ExtensionNotBuiltError(f"celldino._C was built without its CUDA implementation. {BUILD_HINT}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: the fused augmentation runs on cpu or cuda")
    prepared, divisor, prescaled = _prepare_images(image_list, parse_intensity_scale(intensity_scale), device)
    channels = int(prepared[0].shape[0])
    crop_int, crop_float = pack_crop_params(params, channels)
    n_global_rows = n_global * b
    global_size = _group_size(params, slice(0, n_global_rows), "global")
    local_size = _group_size(params, slice(n_global_rows, None), "local")
    if channel_max is not None:
        channel_max = _scaled_channel_max(channel_max, prescaled, b, channels).to(device).contiguous()
    return torch.ops.celldino.fused_multicrop(
        prepared, crop_int, crop_float, channel_max, n_global_rows, global_size, local_size,
        int(params.protein_channel), float(divisor), _as_out_dtype(out_dtype))


def apply_crop_params(images, params: CropParams, out_dtype=torch.float32, intensity_scale=None, channel_max=None):
    """fused_multicrop on the images' own device with the group counts stored in `params` (the benchmark's
    entry point: `benchmarks/bench_data.py` calls it with a B x C x H x W tensor)."""
    return fused_multicrop(images, params, out_dtype=out_dtype, intensity_scale=intensity_scale,
                           channel_max=channel_max)


class FusedCellAugmentation(CellCropSampler):
    """Batch-level Cell-DINO multi-crop augmentation: the fused alternative to per-sample CellAugmentationDINO
    followed by the crop stacking of collate_data_and_cast.

    Same constructor arguments, parameter laws and `sample_params` as CellAugmentationDINO (both are a
    `celldino.data.crop_params.CellCropSampler`: per-process seeded stream), plus `out_dtype`, `device` and
    `n_global_crops`. `aug(images)` -> dict(collated_global_crops [2B, C, G, G], collated_local_crops [nB, C, L, L],
    params). `aug.collate_fn(mask_ratio_tuple, mask_probability, mask_generator, n_tokens=None)` builds a
    DataLoader collate_fn that turns [(raw image, target), ...] into the full reference batch dict (crops from
    the fused op, masks exactly as collate_data_and_cast). See docs/fused_augment.md.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        intensity_scale=None,
        protein_channel: int = 1,
        p_drop: float = 0.2,
        p_protein: float = 0.2,
        jitter_std: float = 0.2,
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        seed: Optional[int] = None,
        out_dtype=torch.float32,
        device=None,
        n_global_crops: int = 2,
    ):
        super().__init__(
            global_crops_scale, local_crops_scale, local_crops_number, global_crops_size=global_crops_size,
            local_crops_size=local_crops_size, intensity_scale=intensity_scale, protein_channel=protein_channel,
            p_drop=p_drop, p_protein=p_protein, jitter_std=jitter_std, ratio=ratio, seed=seed,
        )
        self.n_global_crops = int(n_global_crops)
        self.out_dtype = _as_out_dtype(out_dtype)
        self.device = None if device is None else torch.device(device)

    def __call__(self, images, generator: Optional[np.random.Generator] = None, channel_max=None) -> dict:
        image_list = _as_image_list(images)
        params = self.sample_params([tuple(img.shape) for img in image_list], generator)
        global_crops, local_crops = fused_multicrop(
            image_list, params, out_dtype=self.out_dtype, intensity_scale=self.intensity_scale, device=self.device,
            channel_max=channel_max)
        return {"collated_global_crops": global_crops, "collated_local_crops": local_crops, "params": params}

    def collate_fn(self, mask_ratio_tuple, mask_probability, mask_generator, n_tokens=None, random_module=None):
        """A DataLoader collate_fn: [(image, target), ...] (a dataset built with transform=None) -> the reference
        batch dict of collate_data_and_cast, crops from the fused op (already in out_dtype)."""
        return _FusedCollate(self, mask_ratio_tuple, mask_probability, mask_generator, n_tokens, random_module)


class _FusedCollate:
    def __init__(self, aug, mask_ratio_tuple, mask_probability, mask_generator, n_tokens, random_module):
        self.aug = aug
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = float(mask_probability)
        self.mask_generator = mask_generator
        self.n_tokens = n_tokens
        self.random_module = random_module

    def __call__(self, samples_list):
        from .collate import collate_masks

        if not samples_list:
            raise ValueError("fused collate: empty batch")
        batch = self.aug([s[0] for s in samples_list])
        # the masks of collate_data_and_cast (one implementation of the masking law, same draws)
        masks = collate_masks(self.aug.n_global_crops * len(samples_list), self.mask_ratio_tuple,
                              self.mask_probability, self.mask_generator, n_tokens=self.n_tokens,
                              random_module=self.random_module)
        return {"collated_global_crops": batch["collated_global_crops"],
                "collated_local_crops": batch["collated_local_crops"], **masks}


def benchmark_fused_augment(images, params: CropParams, device=None, out_dtype=torch.float32, threads=None,
                            repeats: int = 5) -> dict:
    """Median / p20 / p80 wall time (ms) of one fused_multicrop call on `images` (after one warm-up), for the
    benchmarks. threads: torch CPU threads during the call (None: unchanged). CUDA calls are synchronised."""
    _load()
    image_list = _as_image_list(images)
    dev = torch.device(device) if device is not None else image_list[0].device
    if dev.type == "cuda":  # time the kernel, not the upload
        image_list = [img.to(dev) for img in image_list]
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        def call():
            fused_multicrop(image_list, params, out_dtype=out_dtype, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        call()
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(old)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "crops": len(params),
            "images": len(image_list), "device": str(dev)}
