"""Data-loading benchmark: decode + Cell-DINO multi-crop (2 x 224 + 8 x 96) images/s, every path in the same run on
the same synthetic 16-bit fields (4 and 5 channels, uncompressed and deflate TIFF, written to a temp dir).

Rows (op "decode+augment", images/s in items_per_s, speed-up vs the reference row of the same field/compression):
  reference        tifffile decode + the reference's per-crop torchvision composition (Div, channel drop and
                   protein contrast on the whole image, RandomResizedCrop, flips, per-channel brightness/contrast
                   loops, self-normalisation), 1 thread: what one DataLoader worker (one core) does in dinov2.
  celldino_torch   tifffile decode + celldino.data.augment.CellAugmentationDINO (crop first, then the pixel ops), 1 thread.
  cpp              tifffile decode + the fused C++ augmentation (celldino._C via celldino.data.fused_augment), 1 thread;
                   skipped (note says why) until that extension is built.
  loader+cpp_aug   the trainer's own data stream (celldino.train.data.build_train_loader, train.augmentation=fused_cpu)
                   with one DataLoader worker per core: decode + crop parameters + the C++ multi-crop in the workers,
                   masks in the collate; speed-up per core (rate / workers vs the reference's one core). CPU only.
  loader+cuda_aug  the same stream as `celldino train` runs it on a GPU (train.augmentation=fused_device): workers
                   (cores - 1) decode and draw crop parameters, the main process cuts the crops with the fused CUDA
                   kernel; speed-up per GPU (+ its CPU cores) vs the reference per core. The GPU path without DALI.
  dali_gpu+aug     DALI GPU decode (DaliTiffLoader, mixed backend) + GPU multi-crop (the fused CUDA kernel when built,
                   else a batched torch grid_sample stand-in, named in the note); needs a GPU.
Rows (op "decode"): tifffile (1 thread), dali_cpu (DALI CPU backend, 1 thread), dali_gpu.
"1 thread" rows decode with tifffile's maxworkers=1 (its default starts up to half the cores per compressed file).
The deflate rows' notes name the inflate code tifffile used: libdeflate when imagecodecs is installed (a celldino
dependency), else Python's zlib, about half as fast.

    python -m benchmarks.run_all data [--quick] [--data-images N] [--data-size S]
"""
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import common
from .train_e2e import default_workers, time_stream

# the benchmarked multi-crop (Cell-DINO's 2 x 224 + 8 x 96), also bench_augment's
N_LOCAL = 8
GLOBAL_SIZE, LOCAL_SIZE = 224, 96
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.005, 0.4)
FIELDS = [(4, "none"), (4, "deflate"), (5, "none"), (5, "deflate")]


def add_arguments(parser):
    parser.add_argument("--data-images", type=int, default=None,
                        help="fields per configuration (default 64 on GPU, 4 on CPU)")
    parser.add_argument("--data-size", type=int, default=None,
                        help="field side in pixels (default 1080 on GPU, 320 on CPU / --quick)")
    parser.add_argument("--data-batch", type=int, default=32, help="DALI batch size on GPU")
    parser.add_argument("--data-workers", type=int, default=None,
                        help="DataLoader workers of the loader rows (default: on a GPU the trainer's default of 10, "
                             "fewer on small hosts; on CPU one per core)")
    parser.add_argument("--data-fields", default=None, metavar="C:COMPRESSION[,...]",
                        help="field kinds to time (default all: 4:none,4:deflate,5:none,5:deflate)")


# ------------------------------------------------------------------------------------------------ inputs


def _fields(text):
    """--data-fields 'C:COMPRESSION,...' -> [(C, compression)] (None: FIELDS)."""
    if not text:
        return FIELDS
    fields = []
    for item in text.split(","):
        channels, _, comp = item.strip().partition(":")
        if not channels.isdigit() or comp not in ("none", "deflate"):
            raise ValueError(f"--data-fields {item!r}: expected CHANNELS:none or CHANNELS:deflate")
        fields.append((int(channels), comp))
    return fields


def synthetic_field(rng, channels, size):
    """uint16 C x H x W, ~12-bit cell-like intensities: smooth blobs (upsampled gamma noise) + Poisson shot noise,
    so deflate compresses it about as much as real fluorescence fields (~1.3x)."""
    cells = rng.gamma(2.0, 500.0, (channels, size // 24 + 1, size // 24 + 1))
    smooth = np.kron(cells, np.ones((24, 24)))[:, :size, :size]
    return np.clip(rng.poisson(smooth + 100.0), 0, 65535).astype(np.uint16)


def write_fields(directory, channels, compression, n, size, seed=0):
    """n interleaved (H x W x C) TIFFs; the same pixels for every compression of a channel count."""
    import tifffile

    def one(i):
        arr = synthetic_field(np.random.default_rng([seed, channels, i]), channels, size)
        path = os.path.join(directory, f"field_c{channels}_{compression}_{i:04d}.tif")
        tifffile.imwrite(path, np.moveaxis(arr, 0, -1), photometric="minisblack", planarconfig="contig",
                         compression=None if compression == "none" else "zlib")
        return path

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(n)))


def tifffile_decode(path):
    """One field decoded on the calling thread only (maxworkers=1), C x H x W."""
    import tifffile

    arr = tifffile.imread(path, maxworkers=1)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))


# ------------------------------------------------------------------------------------------------ reference baseline


class ReferenceStyleCellAugmentation:
    """The reference Cell-DINO augmentation as it runs in a dinov2 DataLoader worker (reference_spec §3.1), written
    out with the same torchvision calls so its cost is the reference's: per crop, the whole image is divided,
    channel-dropped and protein-scaled (global max) before RandomResizedCrop (bilinear, no antialias, as torchvision
    0.15 did for tensors); then flips, per-channel brightness / contrast loops via torchvision functional, and
    self-normalisation. The only change: 16-bit input is divided by 65535 instead of 255."""

    def __init__(self, divisor=65535.0, p=0.2, jitter=0.2, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE,
                 n_local=N_LOCAL, global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE):
        from torchvision import transforms

        self.divisor, self.p, self.jitter, self.n_local = divisor, p, jitter, n_local
        self.rrc_global = transforms.RandomResizedCrop(global_size, scale=tuple(global_scale), antialias=False)
        self.rrc_local = transforms.RandomResizedCrop(local_size, scale=tuple(local_scale), antialias=False)
        self.hflip, self.vflip = transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()

    def _crop(self, image, rrc):
        import torchvision.transforms.functional as TF

        x = image / self.divisor
        if np.array(x.numpy()).shape[0] >= 4 and np.random.rand() <= self.p:  # the reference copies to numpy for the shape
            x[np.random.choice(np.array([0, 2, 3]))] = 0
        if x.max() != 0 and len(x) != 1 and np.random.rand() <= self.p:
            x[1] = x[1] * (np.random.rand() * 2 / x.max())
        x = self.vflip(self.hflip(rrc(x)))
        if x.max() != 0:
            for c in range(x.shape[0]):
                x[c] = TF.adjust_brightness(x[c], max(np.random.normal(1, self.jitter), 0.5))
        if x.max() != 0:
            for c in range(x.shape[0]):
                x[c] = TF.adjust_contrast(x[c][None], max(np.random.normal(1, self.jitter), 0.5))
        m = x.mean((-2, -1), keepdim=True)
        s = x.std((-2, -1), unbiased=False, keepdim=True)
        x -= m
        x /= s + 1e-7
        return x

    def __call__(self, image):
        global_crops = [self._crop(image, self.rrc_global) for _ in range(2)]
        local_crops = [self._crop(image, self.rrc_local) for _ in range(self.n_local)]
        return {"global_crops": global_crops, "global_crops_teacher": global_crops, "local_crops": local_crops,
                "offsets": ()}


# ------------------------------------------------------------------------------------------------ GPU stand-in


def sample_multicrop_params(shapes, seed):
    """Crop parameters of the benchmarked multi-crop (2 x GLOBAL_SIZE + N_LOCAL x LOCAL_SIZE, the Cell-DINO scales)
    for images of `shapes`; bench_augment times its providers on the same crops."""
    from celldino.data.crop_params import sample_crop_params

    return sample_crop_params(shapes, n_global=2, n_local=N_LOCAL, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE,
                              global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE, seed_or_generator=seed)




def multicrop_torch_batched(images, params, divisor=65535.0, eps=1e-7):
    """All crops of a batch of same-size images with a few batched torch calls (works on any device): per crop
    group (global / local), one grid_sample samples every image's crops stacked along H. Same laws as
    celldino.data.crop_params.apply_crop_params_torch (channel drop and protein scaling are per-channel factors,
    so they commute with the bilinear resize and are applied after it). Returns crop-major
    (global [2B, C, 224, 224], local [8B, C, 96, 96]) float32. Used when the fused CUDA kernel is not built."""
    import torch.nn.functional as F

    b, c, h, w = images.shape
    dev = images.device
    x = images.to(torch.float32) / divisor
    cmax = x.amax(dim=(2, 3))  # [B, C]
    p = {k: torch.as_tensor(getattr(params, k), device=dev) for k in
         ("box", "flip", "drop_channel", "protein_factor", "brightness", "contrast")}
    outputs = []
    for slots, size in ((range(0, params.n_global), GLOBAL_SIZE),
                        (range(params.n_global, params.n_global + params.n_local), LOCAL_SIZE)):
        n = len(slots)
        rows = torch.arange(slots.start * b, slots.stop * b, device=dev)  # crop-major rows of this group
        box = p["box"][rows].to(torch.float32)  # [n*B, 4] top, left, h, w
        flip = p["flip"][rows].bool()
        t = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size  # output pixel centres in [0,1]
        # torch's bilinear resize (align_corners=False): src = (i + .5) * h / S - .5, clamped to the crop box
        ys = (t[None] * box[:, 2:3] - 0.5).clamp(min=0).minimum(box[:, 2:3] - 1) + box[:, 0:1]
        xs = (t[None] * box[:, 3:4] - 0.5).clamp(min=0).minimum(box[:, 3:4] - 1) + box[:, 1:2]
        xs = torch.where(flip[:, 0:1], xs.flip(-1), xs)
        ys = torch.where(flip[:, 1:2], ys.flip(-1), ys)
        gx = (2 * xs + 1) / w - 1  # [n*B, S]
        gy = (2 * ys + 1) / h - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [n*B, S, S, 2]
        grid = grid.view(n, b, size, size, 2).permute(1, 0, 2, 3, 4).reshape(b, n * size, size, 2)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out.view(b, c, n, size, size).permute(2, 0, 1, 3, 4).reshape(n * b, c, size, size)
        img = rows % b
        drop = p["drop_channel"][rows]
        keep = torch.ones(n * b, c, device=dev)
        has_drop = drop >= 0
        keep[has_drop.nonzero().squeeze(1), drop[has_drop]] = 0.0
        scale = keep.clone()
        factor = p["protein_factor"][rows]
        pc = params.protein_channel
        if pc < c:
            peak = (cmax[img] * keep).amax(dim=1)
            apply = (factor >= 0) & (peak != 0)
            scale[:, pc] = torch.where(apply, keep[:, pc] * factor / torch.where(apply, peak, 1.0), keep[:, pc])
        out = out * scale[:, :, None, None]
        out = (out * p["brightness"][rows, :c, None, None]).clamp_(0.0, 1.0)
        f = p["contrast"][rows, :c, None, None]
        out = (f * out + (1 - f) * out.mean(dim=(2, 3), keepdim=True)).clamp_(0.0, 1.0)
        mean = out.mean(dim=(2, 3), keepdim=True)
        std = out.std(dim=(2, 3), unbiased=False, keepdim=True)
        const = out.amax(dim=(2, 3), keepdim=True) == out.amin(dim=(2, 3), keepdim=True)
        outputs.append(((out - mean) / (std + eps)).masked_fill(const, 0.0))
    return tuple(outputs)


def _fused_multicrop():
    """(callable(images uint16 [B,C,H,W], params) -> crops, None) when celldino._C's CPU op is built
    (celldino.data.fused_augment.extension_available()), else (None, why not)."""
    try:
        from celldino.data import fused_augment
    except Exception as exc:  # noqa: BLE001 - not importable in this install
        return None, f"celldino.data.fused_augment not importable ({type(exc).__name__}: {exc})"
    if not fused_augment.extension_available():
        return None, "celldino._C not built (celldino.data.fused_augment.extension_available() is False)"
    return fused_augment.apply_crop_params, None


def _gpu_multicrop():
    """(callable(images on the GPU [B,C,H,W], params) -> crops, its name for the note): the fused CUDA kernel when
    celldino._C was built with its CUDA part, else the batched torch grid_sample stand-in."""
    if _cuda_built():
        from celldino.data import fused_augment
        return fused_augment.apply_crop_params, "fused CUDA kernel (celldino._C)"
    return multicrop_torch_batched, "batched torch grid_sample stand-in (celldino._C built without CUDA)"


def deflate_codec():
    """The inflate implementation tifffile uses for deflate TIFF strips here."""
    try:
        import imagecodecs
        if imagecodecs.DEFLATE.available:
            return "libdeflate via imagecodecs"
    except Exception:  # noqa: BLE001 - not installed, or an old build without the DEFLATE codec
        pass
    return "Python zlib (imagecodecs not installed)"


def loader_rate(directory, channels, batch, workers, device, steps):
    """(mean ms per batch, mean ms the consumer waited) of the trainer's own data stream over the fields in
    `directory`: build_train_loader with train.augmentation fused_cpu (CPU) or fused_device (crops cut here on
    `device`), after the batches prefetched during start-up are drained (train_e2e.time_stream, no step)."""
    from celldino.config import load_config
    from celldino.train.data import augment_on_device, build_train_loader

    on_device = device.type == "cuda"
    cfg = load_config("cell_dino/vitl16_hpaone", [
        f"train.dataset_path=Folder:root={directory}:labels=false", f"train.batch_size_per_gpu={batch}",
        f"train.num_workers={workers}", "train.augmentation=" + ("fused_device" if on_device else "fused_cpu"),
        f"student.in_chans={channels}", f"crops.local_crops_number={N_LOCAL}",
        f"crops.global_crops_size={GLOBAL_SIZE}", f"crops.local_crops_size={LOCAL_SIZE}",
        f"crops.global_crops_scale=[{GLOBAL_SCALE[0]},{GLOBAL_SCALE[1]}]",
        f"crops.local_crops_scale=[{LOCAL_SCALE[0]},{LOCAL_SCALE[1]}]"])
    dtype = torch.bfloat16 if on_device else torch.float32
    loader = build_train_loader(cfg, 0, dtype=dtype, device=device)
    return time_stream(lambda batch, i: None, loader, lambda b: augment_on_device(b, device, dtype), workers,
                       steps, device)


def _cuda_built():
    """Whether celldino._C was built with its CUDA part (False when the module or the extension is missing)."""
    try:
        from celldino.data import fused_augment
    except Exception:  # noqa: BLE001 - not importable in this install
        return False
    return fused_augment.cuda_extension_available()


# ------------------------------------------------------------------------------------------------ timing


# every row's timing (one name, so tests can replace them all): wall clock, as DALI's host pipeline is part of the cost
_time = common.wall_timing


NAN = (math.nan, math.nan, math.nan)


def run(args):
    on_gpu = torch.cuda.is_available()
    quick = getattr(args, "quick", False) or not on_gpu
    n_images = getattr(args, "data_images", None) or (4 if quick else 64)
    size = getattr(args, "data_size", None) or (320 if quick else 1080)
    batch = min(getattr(args, "data_batch", 32) or 32, n_images)
    rep = 3 if quick else 5  # timed runs of every row (the reference rows too)
    n_ref = min(n_images, 4 if quick else 8)  # the slow reference rows time a subset of the fields
    cpu_dev = torch.device("cpu")
    gpu_dev = torch.device("cuda") if on_gpu else None

    from celldino.data.augment import CellAugmentationDINO
    from celldino.data.dali import DaliTiffLoader, dali_available

    has_dali = dali_available()
    fused, fused_why = _fused_multicrop()
    ours = CellAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, N_LOCAL, GLOBAL_SIZE, LOCAL_SIZE, seed=0)
    reference = ReferenceStyleCellAugmentation()
    rows = []
    with tempfile.TemporaryDirectory(prefix="celldino_bench_data_") as tmp:
        for channels, comp in _fields(getattr(args, "data_fields", None)):
            field_dir = os.path.join(tmp, f"c{channels}_{comp}")  # one folder per kind: the loader rows read it
            os.makedirs(field_dir)
            paths = write_fields(field_dir, channels, comp, n_images, size)
            shape = f"{channels}x{size}x{size}"
            mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
            note_file = f"{comp} TIFF {mb:.2f} MB/field" + (f" ({deflate_codec()})" if comp == "deflate" else "")

            def add(op, provider, timing, n, baseline, baseline_ms, note="", device=cpu_dev):
                rows.append(common.printed_row(
                    lambda r: common.rate_line(f"data {op} {shape} {comp} {provider}", r, note),
                    "data", op, provider, shape, "uint16", comp, timing, items=n if n else None, baseline=baseline,
                    baseline_ms=baseline_ms, device=device, note="; ".join(x for x in (note_file, note) if x)))

            # ---- decode only
            with common.num_threads(1):
                t_tiff = _time(lambda: [tifffile_decode(p) for p in paths], rep)
            add("decode", "tifffile", t_tiff, n_images, "tifffile", t_tiff[0], "1 thread")
            if has_dali:
                dali_cpu = DaliTiffLoader(paths, batch, device="cpu", shuffle=False, num_threads=1)
                t = _time(lambda: [None for _ in dali_cpu], rep)
                add("decode", "dali_cpu", t, n_images, "tifffile", t_tiff[0], "DALI CPU backend, 1 thread")
            else:
                add("decode", "dali_cpu", NAN, 0, "tifffile", None, "skipped: DALI not installed")

            # ---- decode + augment, per core
            sub = paths[:n_ref]
            with common.num_threads(1):
                t_ref = _time(lambda: [reference(tifffile_decode(p)) for p in sub], rep)
                add("decode+augment", "reference", t_ref, len(sub), "reference", t_ref[0], "1 thread")
                t = _time(lambda: [ours(tifffile_decode(p)) for p in sub], rep)
                add("decode+augment", "celldino_torch", t, len(sub), "reference", t_ref[0], "1 thread")
                if fused is not None:
                    def cpp_step():
                        for p in sub:
                            img = tifffile_decode(p)
                            fused(img[None], sample_multicrop_params([tuple(img.shape)], 0))
                    t = _time(cpp_step, rep)
                    add("decode+augment", "cpp", t, len(sub), "reference", t_ref[0], "celldino._C, 1 thread")
                else:
                    add("decode+augment", "cpp", NAN, 0, "reference", None, f"skipped: {fused_why}")

            # ---- the trainer's own stream: DataLoader workers (+ the CUDA kernel on a GPU)
            provider = "loader+cuda_aug" if on_gpu else "loader+cpp_aug"
            if not (_cuda_built() if on_gpu else fused is not None):
                add("decode+augment", provider, NAN, 0, "reference", None,
                    "skipped: " + ("celldino._C built without CUDA" if on_gpu and fused is not None else fused_why))
            else:
                # --data-workers, else on a GPU the trainer's default of 10 workers (fewer on small hosts), on CPU
                # one per core
                workers = getattr(args, "data_workers", None) or (
                    default_workers(True) if on_gpu else (os.cpu_count() or 2))
                where = gpu_dev if on_gpu else cpu_dev
                setting = f"celldino.train.data.build_train_loader, {workers} DataLoader workers, batch {batch}"
                try:
                    ms, waited = loader_rate(field_dir, channels, batch, workers, where, steps=4 if quick else 8)
                except Exception as exc:  # noqa: BLE001 - e.g. too little shared memory for the workers' batches
                    add("decode+augment", provider, NAN, 0, "reference", None,
                        f"failed: {type(exc).__name__}: {str(exc)[:200]}; {setting}", device=where)
                else:
                    per_image_ref = t_ref[0] / len(sub)
                    add("decode+augment", provider, (ms, ms, ms), batch, "reference",
                        per_image_ref * batch / (1 if on_gpu else workers),
                        f"{setting}, mean of a steady-state span (consumer waited {waited:.1f} ms/batch); speed-up "
                        + ("per GPU (+ its CPU cores) vs the reference per core" if on_gpu else "per core"),
                        device=where)

            # ---- GPU: DALI mixed decode (+ multi-crop on the GPU)
            if not on_gpu or not has_dali:
                why = "needs a CUDA GPU" if not on_gpu else "DALI not installed"
                add("decode", "dali_gpu", NAN, 0, "tifffile", None, f"skipped: {why}")
                add("decode+augment", "dali_gpu+aug", NAN, 0, "reference", None, f"skipped: {why}")
                continue
            threads = os.cpu_count() or 4
            loader = DaliTiffLoader(paths, batch, device="gpu", shuffle=False, num_threads=threads)
            t = _time(lambda: [None for _ in loader], rep, sync=True)
            add("decode", "dali_gpu", t, n_images, "tifffile", t_tiff[0],
                f"DALI mixed backend, {threads} CPU threads, batch {batch}", device=gpu_dev)
            gpu_aug, aug_name = _gpu_multicrop()
            seeds = iter(range(10**9))

            def gpu_epoch():
                for b in loader:
                    imgs = b.images
                    params = sample_multicrop_params([tuple(imgs.shape[1:])] * imgs.shape[0], next(seeds))
                    gpu_aug(imgs, params)

            t = _time(gpu_epoch, rep, sync=True)
            add("decode+augment", "dali_gpu+aug", t, n_images, "reference", t_ref[0] * n_images / len(sub),
                f"{aug_name}; speed-up is per GPU vs the reference per core", device=gpu_dev)
    return rows
