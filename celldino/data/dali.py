"""Decode 16-bit multi-channel TIFF with NVIDIA DALI (GPU `mixed` backend, or `cpu`) into torch, sharded per rank.

    loader = DaliTiffLoader(paths_or_dataset, batch_size=64, device="gpu", shard_id=rank, num_shards=world,
                            shuffle=True, seed=0)
    for batch in loader:          # one epoch per `for`
        batch.images              # uint16 [B, C, H, W] (a list of [C, H, W] when the sizes differ), on the GPU
        batch.indices             # int64 [B]: dataset indices of the samples (targets: dataset.get_target(i))
        batch.fallback            # bool [B]: True where tifffile decoded the file instead of DALI
    loader.stats                  # files decoded by DALI / by the tifffile fallback (with reasons) / skipped

How it works. A reader callback (`fn.external_source`, a thread pool of ours) reads every file's bytes and parses its
first TIFF directory from memory (no extra I/O). Files DALI decodes exactly go to `fn.decoders.image` (dtype
UINT16, ANY_DATA, no orientation handling) and are transposed H x W x C -> C x H x W inside the pipeline; the others
are decoded by `celldino.data.io.read_image` (tifffile) in the same callback and join the batch through a DALI
conditional. The routing has to happen *before* DALI sees a file, because DALI 2.4 does not fail on every variant
it cannot handle (measured on the CPU backend, see docs/dali.md): a 3-channel planar TIFF falls through to OpenCV
and comes back with wrong values, and a multi-page (one channel per page, OME) TIFF silently yields only its first
page. Outputs cross into torch with DLPack (zero copy; the dynamic executor leaves the buffers to their tensors),
which also keeps uint16, which DALI's own torch iterator refuses.

Sharding follows torch's DistributedSampler: every rank draws the same permutation from (seed, epoch), pads it to a
multiple of num_shards by wrapping around (pad=True, so every rank runs the same number of steps), and takes every
num_shards-th element from shard_id.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from .io import ImageNotFoundError, ImageReadError, is_tiff_bytes, read_image

logger = logging.getLogger("celldino")

__all__ = [
    "DaliTiffLoader",
    "DaliBatch",
    "DaliDecodeError",
    "TiffHeader",
    "dali_available",
    "parse_tiff_header",
    "dali_blocker",
    "shard_indices",
    "DALI_COMPRESSIONS",
]

# Compressions the DALI 2.4 CPU decoder (nvImageCodec libtiff extension) decoded bit-exactly here, 8- and 16-bit.
DALI_COMPRESSIONS = {1: "none", 5: "lzw", 8: "deflate", 32946: "deflate", 32773: "packbits", 50000: "zstd"}
_DTYPES = {"uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16)}
_OUTPUT_CASTS = (None, "int32", "float32")
_MAX_CONSECUTIVE_SKIPS = 100


def dali_available() -> bool:
    """True when `nvidia.dali` imports (the `dali` extra: pip install nvidia-dali-cuda130)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except Exception as exc:  # noqa: BLE001
        raise ImportError(
            "NVIDIA DALI is not installed (or fails to import): pip install 'celldino[dali]' "
            f"(the nvidia-dali-cuda130 wheel, Linux only); the error was: {exc}"
        ) from None
    return dali, fn, types


# --------------------------------------------------------------------------------------------------------------
# TIFF header (first IFD) from bytes in memory


@dataclass(frozen=True)
class TiffHeader:
    """What routing needs from the first image directory of a TIFF."""

    width: int
    height: int
    samples_per_pixel: int
    bits_per_sample: tuple
    sample_format: tuple
    compression: int
    photometric: int
    planar_config: int
    predictor: int
    orientation: int
    extra_samples: tuple
    tiled: bool
    multi_page: bool  # a second IFD follows (channels as pages, OME series, thumbnails...)
    has_subifds: bool  # SubIFDs (pyramid levels)
    big_endian: bool
    bigtiff: bool


_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TYPE_CODES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_WANTED = {256, 257, 258, 259, 262, 273, 274, 277, 279, 284, 317, 322, 323, 324, 325, 330, 338, 339}


def parse_tiff_header(data, path="<bytes>") -> TiffHeader:
    """Parse the first IFD of a classic or Big TIFF held in `data` (bytes / uint8 array); checks that every strip
    or tile lies inside the data, so a truncated file is reported here, naming `path`, not deep inside DALI."""
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    size = len(buf)

    def bad(problem):
        return ImageReadError(path, problem)

    if size < 8:
        raise bad(f"not a TIFF: {size} bytes")
    order = bytes(buf[:2])
    if order not in (b"II", b"MM"):
        raise bad("not a TIFF (no II/MM byte-order mark)")
    e = "<" if order == b"II" else ">"
    magic = struct.unpack_from(e + "H", buf, 2)[0]
    if magic == 42:
        big, head, cnt_fmt, entry_size, val_fmt, val_size = False, 4, "H", 12, "I", 4
        ifd = struct.unpack_from(e + "I", buf, 4)[0]
    elif magic == 43:
        if size < 16:
            raise bad("truncated BigTIFF header")
        big, head, cnt_fmt, entry_size, val_fmt, val_size = True, 8, "Q", 20, "Q", 8
        ifd = struct.unpack_from(e + "Q", buf, 8)[0]
    else:
        raise bad(f"not a TIFF (magic number {magic})")
    del head
    cnt_size = struct.calcsize(cnt_fmt)
    if ifd < 8 or ifd + cnt_size > size:
        raise bad(f"truncated or corrupt TIFF: first IFD at {ifd} outside the {size}-byte file")
    n_entries = struct.unpack_from(e + cnt_fmt, buf, ifd)[0]
    end = ifd + cnt_size + n_entries * entry_size
    if end + val_size > size:
        raise bad(f"truncated or corrupt TIFF: IFD with {n_entries} entries runs past the end of the file")

    tags = {}
    for k in range(n_entries):
        at = ifd + cnt_size + k * entry_size
        tag, typ = struct.unpack_from(e + "HH", buf, at)
        if tag not in _WANTED:
            continue
        count = struct.unpack_from(e + ("Q" if big else "I"), buf, at + 4)[0]
        if typ not in _TYPE_CODES:
            raise bad(f"TIFF tag {tag} has non-integer type {typ}")
        nbytes = count * _TYPE_SIZES[typ]
        where = at + 4 + (8 if big else 4)
        if nbytes > val_size:
            where = struct.unpack_from(e + val_fmt, buf, where)[0]
            if where + nbytes > size:
                raise bad(f"truncated or corrupt TIFF: tag {tag} values run past the end of the file")
        tags[tag] = np.frombuffer(buf, dtype=np.dtype(e + _TYPE_CODES[typ]), count=count, offset=where)
    next_ifd = struct.unpack_from(e + val_fmt, buf, end)[0]

    def one(tag, default):
        v = tags.get(tag)
        return int(v[0]) if v is not None and len(v) else default

    spp = one(277, 1)
    width, height = one(256, 0), one(257, 0)
    if width < 1 or height < 1:
        raise bad(f"TIFF without a valid image size ({width} x {height})")
    tiled = 322 in tags or 324 in tags
    offsets, counts = (tags.get(324), tags.get(325)) if tiled else (tags.get(273), tags.get(279))
    if offsets is None or counts is None or len(offsets) != len(counts) or not len(offsets):
        raise bad("TIFF without strip/tile offsets and byte counts")
    data_end = int((offsets.astype(np.uint64) + counts.astype(np.uint64)).max())
    if data_end > size:
        raise bad(f"truncated TIFF: image data ends at byte {data_end}, the file has {size}")

    def several(tag, default):
        v = tags.get(tag)
        if v is None or not len(v):
            return (default,) * spp
        vals = tuple(int(x) for x in v)
        return vals if len(vals) == spp else (vals[0],) * spp

    return TiffHeader(
        width=width, height=height, samples_per_pixel=spp,
        bits_per_sample=several(258, 1), sample_format=several(339, 1),
        compression=one(259, 1), photometric=one(262, -1), planar_config=one(284, 1), predictor=one(317, 1),
        orientation=one(274, 1), extra_samples=tuple(int(x) for x in tags.get(338, ())),
        tiled=tiled, multi_page=next_ifd != 0, has_subifds=330 in tags, big_endian=e == ">", bigtiff=big,
    )


def dali_blocker(header: TiffHeader, dtype="uint16") -> Optional[str]:
    """Why DALI cannot be trusted to decode this TIFF exactly into `dtype` (None: it can). Conservative: anything
    not measured bit-exact against tifffile (docs/dali.md) goes to the tifffile fallback."""
    bits = _DTYPES[str(dtype)].itemsize * 8
    h = header
    if h.multi_page:
        return "multi-page TIFF (DALI decodes the first page only)"
    if h.has_subifds:
        return "TIFF with SubIFDs (pyramid)"
    if h.planar_config == 2 and h.samples_per_pixel > 1:
        return "planar TIFF (PlanarConfiguration=2)"
    if h.compression not in DALI_COMPRESSIONS:
        return f"compression {h.compression}"
    if h.predictor not in (1, 2):
        return f"predictor {h.predictor}"
    if h.photometric not in (1, 2) or (h.photometric == 2 and h.samples_per_pixel < 3):
        return f"photometric {h.photometric}"
    if any(f != 1 for f in h.sample_format):
        return "signed or float samples"
    if any(b != bits for b in h.bits_per_sample):
        return f"{h.bits_per_sample[0]}-bit samples in a {bits}-bit pipeline"
    if 1 in h.extra_samples:
        return "associated alpha"
    return None


# --------------------------------------------------------------------------------------------------------------
# sharding


def shard_indices(num_samples: int, shard_id: int = 0, num_shards: int = 1, *, shuffle: bool = True,
                  seed: int = 0, epoch: int = 0, pad: bool = True) -> np.ndarray:
    """This shard's sample indices for one epoch (DistributedSampler semantics, see the module docstring).

    pad=True: every shard gets ceil(N / num_shards) indices (the permutation is extended by wrapping around);
    pad=False: the shards partition range(N) exactly (sizes differ by at most one)."""
    if num_samples < 1:
        raise ValueError("shard_indices: no samples")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_indices: need 0 <= shard_id < num_shards, got {shard_id} / {num_shards}")
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    if pad:
        total = -(-num_samples // num_shards) * num_shards
        order = np.resize(order, total)  # np.resize repeats the sequence: wrap-around padding
    return order[shard_id::num_shards].astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# the loader


class DaliBatch(NamedTuple):
    images: Union[torch.Tensor, List[torch.Tensor]]  # [B, C, H, W], or a list of [C, H, W] when shapes differ
    indices: torch.Tensor  # int64 [B] dataset indices
    fallback: torch.Tensor  # bool [B]: decoded by tifffile (not DALI)


class DaliDecodeError(RuntimeError):
    """DALI failed on a batch (the pipeline is unusable afterwards); the message lists the batch's files."""


def _paths_of(source) -> List[str]:
    """The files of a celldino dataset (its `image_paths`, in item order) or of a list of paths."""
    if isinstance(source, (str, os.PathLike)):
        raise TypeError("DaliTiffLoader: pass a list of paths or a celldino dataset, not a single path")
    if hasattr(source, "image_paths"):
        name = getattr(source, "name", type(source).__name__)
        for attr, default in (("channels", None), ("separate_channels", False)):
            if getattr(source, attr, default) != default:
                raise ValueError(
                    f"DaliTiffLoader: the dataset {name} sets {attr}={getattr(source, attr)!r}; the DALI loader "
                    "decodes whole images (select channels on the decoded tensor, `channels=` here takes indices)"
                )
        if getattr(source, "layout", "auto") != "auto":
            raise ValueError(f"DaliTiffLoader: the dataset {name} sets layout={source.layout!r}; DALI decodes "
                             "layout=auto only")
        paths = source.image_paths
    else:
        paths = list(source)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("DaliTiffLoader: no files")
    return paths


class DaliTiffLoader:
    """One rank's DALI decoding loader over image files (see the module docstring).

    source: list of paths, or a celldino dataset (its image paths; `indices` of a batch index it).
    device: "gpu" (DALI mixed backend, outputs on cuda:device_id) or "cpu" (DALI CPU backend).
    dtype: "uint16" (default) or "uint8": DALI decodes files of exactly this bit depth; narrower integer files
      (uint8 in a uint16 loader) are widened exactly by the fallback, anything not representable is an error.
    output_cast: None (keep dtype), "int32" or "float32" (values unchanged, cast inside the pipeline).
    channels: optional channel indices (order kept) applied to the decoded batch.
    in_chans: required channel count of every file (default: the dataset's in_chans); a file with another count
      is an ImageReadError naming it (or a skip).
    drop_last: drop this shard's last partial batch. pad: see `shard_indices`.
    on_error: "raise" (default: ImageReadError naming the file) or "skip" (unreadable files are counted in
      stats["skipped"], logged, and replaced by the next file of the epoch's order).
    num_threads: DALI CPU threads and file-reading threads. prefetch: batches DALI prepares ahead.
    start_epoch: epoch number of the first pass (resume): epoch e uses the permutation of (seed, e).
    """

    def __init__(self, source, batch_size: int, *, device: str = "gpu", device_id: Optional[int] = None,
                 shard_id: int = 0, num_shards: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, pad: bool = True, dtype: str = "uint16",
                 output_cast: Optional[str] = None, channels: Optional[Sequence[int]] = None,
                 in_chans: Optional[int] = None,
                 on_error: str = "raise", num_threads: int = 4, prefetch: int = 2, start_epoch: int = 0):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DaliTiffLoader: device={device!r}, expected 'gpu' or 'cpu'")
        if str(dtype) not in _DTYPES:
            raise ValueError(f"DaliTiffLoader: dtype={dtype!r}, expected one of {sorted(_DTYPES)}")
        if output_cast not in _OUTPUT_CASTS:
            raise ValueError(f"DaliTiffLoader: output_cast={output_cast!r}, expected one of {_OUTPUT_CASTS}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"DaliTiffLoader: on_error={on_error!r}, expected 'raise' or 'skip'")
        if batch_size < 1:
            raise ValueError(f"DaliTiffLoader: batch_size={batch_size}, expected >= 1")
        self.paths = _paths_of(source)
        if in_chans is None:
            in_chans = getattr(source, "in_chans", None)
        self.in_chans = int(in_chans) if in_chans is not None else None
        self.batch_size = int(batch_size)
        self.device = device
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device() if torch.cuda.is_available() else 0
        self.device_id = device_id
        self.shard_id, self.num_shards = int(shard_id), int(num_shards)
        self.shuffle, self.seed, self.pad, self.drop_last = bool(shuffle), int(seed), bool(pad), bool(drop_last)
        self.dtype = str(dtype)
        self.output_cast = output_cast
        self.channels = [int(c) for c in channels] if channels is not None else None
        self.on_error = on_error
        self.num_threads, self.prefetch = int(num_threads), int(prefetch)
        self._epoch = int(start_epoch)  # epoch of the next (or current) pass
        self._base_epoch = self._epoch  # epoch of the current pipeline's DALI epoch 0
        self._shard_len = len(shard_indices(len(self.paths), self.shard_id, self.num_shards,
                                            shuffle=False, pad=self.pad))
        if self._shard_len == 0:
            raise ValueError(f"DaliTiffLoader: {len(self.paths)} files for {self.num_shards} shards leaves shard "
                             f"{self.shard_id} empty (use pad=True)")
        self._orders = {}
        self._lock = threading.Lock()
        self._stats = Counter()
        self._reasons = Counter()
        self._pool = None
        self._pipe = None
        self._mid_epoch = False
        self._in_flight = []  # file lists of batches handed to DALI and not yet returned
        self._reads = {}  # (epoch, iteration) -> futures of that batch's reads (None: past the end)

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        n = self._shard_len
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def epoch(self) -> int:
        """Epoch number of the next (or current) pass."""
        return self._epoch

    @property
    def stats(self) -> dict:
        """Counts over every file read so far: dali (decoded by DALI), fallback (by tifffile), skipped, and
        fallback_reasons {reason: count}."""
        with self._lock:
            return {"dali": self._stats["dali"], "fallback": self._stats["fallback"],
                    "skipped": self._stats["skipped"], "fallback_reasons": dict(self._reasons)}

    def shard_order(self, epoch: int) -> np.ndarray:
        """This shard's dataset indices for `epoch`, in delivery order."""
        order = self._orders.get(epoch)
        if order is None:
            order = shard_indices(len(self.paths), self.shard_id, self.num_shards, shuffle=self.shuffle,
                                  seed=self.seed, epoch=epoch, pad=self.pad)
            # DALI may ask for the next epoch's first batches while this one is still being consumed
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    # -- reading (runs in our thread pool, called from DALI's input callback) ---------------------------------

    def _read_one(self, index: int):
        """-> (encoded bytes or empty, fallback C x H x W array or empty, index, is_fallback)."""
        path = self.paths[index]
        if os.path.isdir(path):  # OME-Zarr and other directory stores
            data, reason = None, "not a TIFF"
        else:
            try:
                data = np.fromfile(path, dtype=np.uint8)
            except FileNotFoundError:  # the same error class as celldino.data.io's readers
                raise ImageNotFoundError(path, "file not found") from None
            except OSError as exc:
                raise ImageReadError(path, f"cannot read ({exc})") from None
            try:
                header = parse_tiff_header(data, path)
                reason = dali_blocker(header, self.dtype)
            except ImageReadError as exc:
                # tifffile (read_image, below) is the authority: it decodes what our small parser does not know,
                # and reports truncated / corrupt files with their name
                is_tiff = is_tiff_bytes(data[:4].tobytes())
                reason = "TIFF header not understood by the DALI router" if is_tiff else "not a TIFF"
                if is_tiff:
                    logger.debug("DALI router: %s", exc)
        dt = _DTYPES[self.dtype]
        if reason is None:
            self._check_channels(path, header.samples_per_pixel)
            with self._lock:
                self._stats["dali"] += 1
            return data, np.zeros((0, 0, 0), dt), index, False
        arr = read_image(path)
        self._check_channels(path, arr.shape[0])
        if arr.dtype != dt:
            if arr.dtype.kind != "u" or not np.can_cast(arr.dtype, dt, "safe"):
                raise ImageReadError(path, f"{arr.dtype} pixels cannot be represented exactly as {dt} "
                                           f"(build the loader with another dtype, or decode on the CPU path)")
            arr = arr.astype(dt)
        with self._lock:
            self._stats["fallback"] += 1
            self._reasons[reason] += 1
            first = self._reasons[reason] == 1
        if first:
            logger.warning("DALI: %s: %s; decoding such files with tifffile instead (counted in loader.stats)",
                           path, reason)
        return np.zeros(0, np.uint8), np.ascontiguousarray(arr), index, True

    def _check_channels(self, path, n):
        if self.in_chans is not None and n != self.in_chans:
            raise ImageReadError(path, f"expected {self.in_chans} channels (in_chans), the image has {n}")

    def _read_or_skip(self, index: int):
        if self.on_error == "raise":
            return self._read_one(index)
        n = len(self.paths)
        for attempt in range(min(n, _MAX_CONSECUTIVE_SKIPS)):
            j = (index + attempt) % n
            try:
                return self._read_one(j)
            except ImageReadError as exc:
                with self._lock:
                    self._stats["skipped"] += 1
                    skipped = self._stats["skipped"]
                logger.warning("DALI loader: skipping %s (%s); %d skipped so far", exc.path, exc.problem, skipped)
        raise ImageReadError(self.paths[index], f"{min(n, _MAX_CONSECUTIVE_SKIPS)} consecutive unreadable files "
                                                f"from this one on")

    def _submit_reads(self, epoch: int, iteration: int):
        key = (epoch, iteration)
        if key in self._reads:
            return
        order = self.shard_order(epoch)
        start = iteration * self.batch_size
        stop = min(start + self.batch_size, len(order))
        if start >= len(order) or (self.drop_last and stop - start < self.batch_size):
            self._reads[key] = None
        else:
            self._reads[key] = [self._pool.submit(self._read_or_skip, i) for i in order[start:stop].tolist()]

    def _next_batch(self, info):
        """DALI batch-mode input callback (runs in the thread that calls pipe.run()): the `info.iteration`-th
        batch of DALI epoch `info.epoch_idx`. Reads run in our pool `prefetch` batches ahead, so the callback
        mostly collects finished reads instead of blocking the training loop on file I/O."""
        epoch = self._base_epoch + info.epoch_idx
        for ahead in range(self.prefetch + 1):
            self._submit_reads(epoch, info.iteration + ahead)
        futures = self._reads.pop((epoch, info.iteration))
        if futures is None:
            raise StopIteration
        samples = [f.result() for f in futures]
        self._in_flight.append([self.paths[s[2]] for s in samples])
        enc, fb, idx, flag = zip(*samples)
        return (list(enc), list(fb), [np.array(i, np.int64) for i in idx], [np.array(f) for f in flag])

    # -- pipeline -----------------------------------------------------------------------------------------------

    def _build(self):
        dali, fn, types = _import_dali()
        from nvidia.dali import pipeline_def

        dali_type = {"uint8": types.UINT8, "uint16": types.UINT16}[self.dtype]
        cast = {None: None, "int32": types.INT32, "float32": types.FLOAT}[self.output_cast]
        on_gpu = self.device == "gpu"

        @pipeline_def(enable_conditionals=True)
        def tiff_pipeline():
            encoded, fallback, index, is_fallback = fn.external_source(
                source=self._next_batch, num_outputs=4, batch=True, batch_info=True,
                dtype=[types.UINT8, dali_type, types.INT64, types.BOOL], ndim=[1, 3, 0, 0],
                layout=["", "CHW", "", ""])
            if is_fallback:
                image = fallback.gpu() if on_gpu else fallback
            else:
                image = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", dtype=dali_type,
                                          output_type=types.ANY_DATA, adjust_orientation=False)
                image = fn.transpose(image, perm=[2, 0, 1], output_layout="CHW")
            if cast is not None:
                image = fn.cast(image, dtype=cast)
            return image, index, is_fallback

        pipe = tiff_pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_threads),
                             device_id=self.device_id if on_gpu else None, seed=self.seed,
                             prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        pipe.build()
        return pipe

    def _to_torch(self, outputs) -> DaliBatch:
        images, index, is_fallback = outputs
        # torch.from_dlpack passes torch's current stream to __dlpack__, so DALI orders its work before ours
        if images.is_dense_tensor():
            imgs = torch.from_dlpack(images.as_tensor())
            if self.channels is not None:
                imgs = imgs[:, self.channels]
        else:
            imgs = [torch.from_dlpack(images[i]) for i in range(len(images))]
            if self.channels is not None:
                imgs = [im[self.channels] for im in imgs]
            if len({tuple(im.shape) for im in imgs}) == 1:
                imgs = torch.stack(imgs)  # uniform shapes in scattered buffers (not seen so far): one copy
        indices = torch.from_dlpack(index.as_tensor()).reshape(-1).clone()
        fallback = torch.from_dlpack(is_fallback.as_tensor()).reshape(-1).clone()
        return DaliBatch(imgs, indices, fallback)

    def _reset_pipeline(self):
        self._pipe = None
        self._in_flight.clear()
        for futures in self._reads.values():
            for f in futures or ():
                f.cancel()
        self._reads.clear()
        self._mid_epoch = False

    def __iter__(self):
        if self._mid_epoch:
            # an abandoned pass: DALI cannot rewind a callback source, so start a fresh pipeline at the next epoch
            self._epoch += 1
            self._reset_pipeline()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, self.num_threads), thread_name_prefix="celldino-dali-read")
        if self._pipe is None:
            self._base_epoch = self._epoch
            self._pipe = self._build()
        self._mid_epoch = True
        gpu_ctx = torch.cuda.device(self.device_id) if self.device == "gpu" else None
        while True:
            try:
                if gpu_ctx is not None:
                    with gpu_ctx:
                        outputs = self._pipe.run()
                else:
                    outputs = self._pipe.run()
            except StopIteration:
                break
            except ImageReadError:
                self._reset_pipeline()
                raise
            except RuntimeError as exc:
                files = self._in_flight[0] if self._in_flight else []
                self._reset_pipeline()
                raise DaliDecodeError(f"DALI failed on a batch of {len(files)} files {files}: {exc}") from exc
            self._in_flight.pop(0)
            if gpu_ctx is not None:
                with gpu_ctx:
                    yield self._to_torch(outputs)
            else:
                yield self._to_torch(outputs)
        self._pipe.reset()
        self._in_flight.clear()
        self._epoch += 1
        self._mid_epoch = False
        stats = self.stats
        if stats["fallback"] or stats["skipped"]:
            logger.info("DALI loader epoch done: %d files decoded by DALI, %d by tifffile %s, %d skipped",
                        stats["dali"], stats["fallback"], stats["fallback_reasons"], stats["skipped"])

    def close(self):
        self._reset_pipeline()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
