"""Fast decoding of compressed strip TIFFs (deflate, zstd, LZW), the layouts microscopes and tifffile write.

tifffile decodes such a page strip by strip through Python: it slices each compressed strip out of the read
buffer (a copy), decodes it into a temporary array and copies that into the result. Here the strips are decoded
by imagecodecs (libdeflate / zstd / LZW) straight into the output array, from one read of the pages' data: 1.45x
faster on a 5 x 1080 x 1080 uint16 deflate field (45 -> 31 ms per field on one core of the 2-core dev machine),
which is most of what a DataLoader worker does per sample on deflate data (LZW: 1.1x, its decoder dominates).

Only layouts this module knows exactly are taken: strips (not tiles), deflate / zstd / LZW, no predictor or
horizontal differencing (integers), one sample depth, little-endian multi-byte samples, all pages of the series
in this file and alike. Anything else, and any error on the way (a corrupt strip, a short read), returns None and
the caller decodes with tifffile, which stays the authority for every file (tests compare the two bit for bit).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

_DEFLATE = (8, 32946)  # ADOBE_DEFLATE, DEFLATE
_ZSTD = (50000,)
_LZW = (5,)
_WASTE_LIMIT = 2.0  # read the data span at most this much larger than the strips themselves (else: tifffile)


def codec_for(compression):
    """The imagecodecs decoder this module uses for a TIFF compression code, or None (then tifffile decodes)."""
    try:
        import imagecodecs
    except ImportError:
        return None
    if compression in _DEFLATE and imagecodecs.DEFLATE.available:
        return imagecodecs.deflate_decode
    if compression in _ZSTD and imagecodecs.ZSTD.available:
        return imagecodecs.zstd_decode
    if compression in _LZW and imagecodecs.LZW.available:
        return imagecodecs.lzw_decode
    return None


def _eligible_keyframe(tf, key):
    """(codec, planes, rows, row_items) for a page layout this module decodes, else None. `planes` x `rows` x
    `row_items` is the page's sample grid in storage order: planes = samples for planar (separate) data, else 1."""
    codec = codec_for(key.compression)
    if codec is None or key.is_tiled or key.fillorder != 1 or key.predictor not in (1, 2):
        return None
    dtype = np.dtype(key.dtype)
    if dtype.itemsize * 8 != key.bitspersample or (key.predictor == 2 and dtype.kind not in "ui"):
        return None
    if dtype.itemsize > 1 and tf.byteorder != "<":
        return None
    separate, depth, length, width, contig = key.shaped
    if depth != 1 or (separate > 1 and contig > 1):
        return None
    return codec, separate, length, width * contig


def decode_series(tf, series, threads: int = 1, channels_first: bool = False):
    """(pixels, axes) of a series of an open tifffile.TiffFile, decoded here when every page is a layout this
    module handles, else None. Without `channels_first` the pixels are `series.asarray()` and axes `series.axes`;
    with it, interleaved samples (axes ending in YXS) come out as ...SYX: each strip is decoded into a small buffer
    and transposed from the cache, instead of transposing the whole image afterwards (1.24x on a 5 x 1080 x 1080
    deflate field). threads > 1 decodes strips in a thread pool (imagecodecs releases the GIL)."""
    try:
        return _decode_series(tf, series, threads, channels_first)
    except Exception:  # noqa: BLE001 - corrupt or unexpected data: tifffile decides what it is
        return None


def _decode_series(tf, series, threads, channels_first):
    pages = list(series.pages)
    if not pages or any(p is None or p.parent is not tf for p in pages):
        return None
    key = pages[0].keyframe
    if any(p.keyframe is not key for p in pages):
        return None
    plan = _eligible_keyframe(tf, key)
    if plan is None:
        return None
    codec, planes, rows, row_items = plan
    dtype = np.dtype(key.dtype)
    if int(np.prod(series.shape)) != len(pages) * planes * rows * row_items or np.dtype(series.dtype) != dtype:
        return None
    rows_per_strip = min(int(key.rowsperstrip or rows), rows)
    strips_per_plane = -(-rows // rows_per_strip)
    offsets = [np.asarray(p.dataoffsets, dtype=np.int64) for p in pages]
    counts = [np.asarray(p.databytecounts, dtype=np.int64) for p in pages]
    if any(len(o) != planes * strips_per_plane or len(c) != len(o) or (c <= 0).any() for o, c in zip(offsets, counts)):
        return None
    all_offsets, all_counts = np.concatenate(offsets), np.concatenate(counts)
    lo, hi = int(all_offsets.min()), int((all_offsets + all_counts).max())
    if hi - lo > _WASTE_LIMIT * int(all_counts.sum()) + (1 << 20):
        return None
    fh = tf.filehandle
    fh.seek(lo)
    data = fh.read(hi - lo)
    if len(data) != hi - lo:
        return None

    width, samples = key.imagewidth, row_items // key.imagewidth
    shape, axes = tuple(series.shape), series.axes
    # interleaved samples written channel-first: only for the ...YXS layout tifffile gives such series
    transpose = (channels_first and planes == 1 and samples > 1 and axes.endswith("YXS")
                 and shape[-3:] == (rows, width, samples))
    if transpose:
        out = np.empty((len(pages), samples, rows, width), dtype)
        shape, axes = shape[:-3] + (samples, rows, width), axes[:-3] + "SYX"
    else:
        out = np.empty((len(pages), planes, rows, row_items), dtype)
    view = memoryview(data)
    jobs = [(page, strip) for page in range(len(pages)) for strip in range(planes * strips_per_plane)]

    def decode(job):
        page, strip = job
        plane, first = divmod(strip, strips_per_plane)
        r0 = first * rows_per_strip
        r1 = min(rows, r0 + rows_per_strip)
        target = np.empty((r1 - r0, row_items), dtype) if transpose else out[page, plane, r0:r1]
        start = int(offsets[page][strip]) - lo
        decoded = codec(view[start:start + int(counts[page][strip])], out=target.reshape(-1).view(np.uint8))
        if np.asarray(decoded).nbytes != target.nbytes:  # a short strip would leave np.empty's garbage behind
            raise ValueError(f"strip {strip} of page {page} decoded to {np.asarray(decoded).nbytes} bytes, "
                             f"expected {target.nbytes}")
        grid = target.reshape(r1 - r0, width, samples)
        if key.predictor == 2:  # horizontal differencing: running sum along each row, per sample, wrapping
            np.cumsum(grid, axis=1, dtype=dtype, out=grid)
        if transpose:  # the strip is still in the cache: transposing it here costs little
            np.copyto(out[page, :, r0:r1], grid.transpose(2, 0, 1))

    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode, jobs))
    else:
        for job in jobs:
            decode(job)
    return out.reshape(shape), axes
