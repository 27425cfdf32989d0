"""Image decoders: one function, `read_image`, for every on-disk layout we accept, returning C x H x W numpy.

The decoded dtype is kept (uint8 / uint16 / uint32 / int8 / int16 / int32 / float16 / float32 / float64) and
values are never rescaled: intensity scaling is a separate, explicit step (`celldino.data.intensity`).

Formats (chosen by extension, or by magic bytes when the extension is unknown):
  TIFF / OME-TIFF  tifffile (deflate / zstd / LZW strips decoded straight into the result, channels-first, by
                   `tiff_strips`: 1.36x faster, bit-identical); planar (C,Y,X) and interleaved (Y,X,S) samples,
                   single page or multi-page series; axes of size 1 (T, Z) are dropped; channel names from OME XML,
                   tifffile JSON ("channel_names") or ImageJ labels.
  PNG (and other PIL formats)  16-bit kept (imagecodecs for PNG, PIL otherwise); H x W x C -> C x H x W.
  .npy             C x H x W (or H x W) by default, `layout="hwc"` for interleaved arrays.
  OME-Zarr         a directory: first resolution level of the first multiscale, axes (t,)c,(z,)y,x;
                   channel names from omero.channels[].label. A plain zarr array is read like .npy.
`layout="strip"` reads a 2-D image as a horizontal strip of tiles (the reference's XChannels layout):
channel c is columns [c*w, (c+1)*w) with w = H (square tiles) or W / tiles.
"""

from __future__ import annotations

import logging
import os
import threading
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from .tiff_strips import decode_series

__all__ = [
    "ImageReadError",
    "ImageNotFoundError",
    "SUPPORTED_DTYPES",
    "ImageInfo",
    "read_image",
    "read_image_and_names",
    "probe_image",
    "resolve_channels",
    "image_format",
    "is_tiff_bytes",
    "TIFF_MAGICS",
]

SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64")
)
TIFF_EXTS = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
PNG_EXTS = (".png",)
PIL_EXTS = (".jpg", ".jpeg", ".bmp", ".gif", ".webp")
NPY_EXTS = (".npy",)
ZARR_EXTS = (".zarr",)
IMAGE_EXTS = TIFF_EXTS + PNG_EXTS + PIL_EXTS + NPY_EXTS + ZARR_EXTS
LAYOUTS = ("auto", "strip", "chw", "hwc")
# first four bytes of a classic (42) or Big (43) TIFF, little- or big-endian: the format sniffers' one definition
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

ChannelSpec = Union[None, str, Sequence[Union[int, str]]]


class ImageReadError(ValueError):
    """A file could not be read as the image we expected. `path` names the file, `problem` says what is wrong."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """The file does not exist."""


@dataclass(frozen=True)
class ImageInfo:
    shape: tuple  # (C, H, W) after layout handling, before channel selection
    dtype: np.dtype
    channel_names: Optional[tuple]


def _existing_image_format(path) -> str:
    """image_format(path) of a file that must exist (a zarr store is a directory): the readers' shared check."""
    kind = image_format(path)
    if kind != "zarr" and not os.path.isfile(path):
        raise ImageNotFoundError(path, "file not found" if not os.path.exists(path) else
                                 "is a directory, not an image file" if os.path.isdir(path) else "not a regular file")
    return kind


def is_tiff_bytes(head) -> bool:
    """True when `head` (the first bytes of a file) starts like a TIFF."""
    return bytes(head[:4]) in TIFF_MAGICS


def image_format(path) -> str:
    """'tiff' | 'png' | 'pil' | 'npy' | 'zarr', from the extension, else from the first bytes."""
    p = os.fspath(path)
    low = p.lower().rstrip("/")
    if low.endswith(ZARR_EXTS):
        return "zarr"
    for exts, kind in ((TIFF_EXTS, "tiff"), (PNG_EXTS, "png"), (NPY_EXTS, "npy"), (PIL_EXTS, "pil")):
        if low.endswith(exts):
            return kind  # a directory named like an image is then "not a regular file", not a zarr store
    if os.path.isdir(p):
        return "zarr"
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ImageNotFoundError(p, "file not found") from None
    except OSError as e:
        raise ImageReadError(p, f"cannot open ({e})") from None
    if is_tiff_bytes(head):
        return "tiff"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:2] == b"\xff\xd8":
        return "pil"
    raise ImageReadError(p, f"not an image: unsupported file type (expected one of {', '.join(IMAGE_EXTS)})")


# --------------------------------------------------------------------------------------------------------------
# TIFF


class _TiffErrorCapture(logging.Handler):
    """tifffile reports truncated/corrupt structure by *logging* errors and returning what it could read;
    we capture those records (for the calling thread only) and turn them into an exception."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages = []

    def emit(self, record):
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextmanager
def _tifffile_errors():
    logger = logging.getLogger("tifffile")
    handler = _TiffErrorCapture()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _ome_channel_names(xml: str) -> Optional[list]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for image in root.iter():
        if image.tag.endswith("}Image") or image.tag == "Image":
            for pixels in image:
                if pixels.tag.endswith("Pixels"):
                    names = [ch.get("Name") for ch in pixels if ch.tag.endswith("Channel")]
                    return names if names and all(n is not None for n in names) else None
            return None
    return None


def _tiff_names(tf) -> Optional[list]:
    names = None
    if tf.is_ome and tf.ome_metadata:
        names = _ome_channel_names(tf.ome_metadata)
    if names is None and tf.is_shaped and tf.shaped_metadata:
        names = tf.shaped_metadata[0].get("channel_names")
    if names is None and tf.is_imagej and tf.imagej_metadata:
        names = tf.imagej_metadata.get("Labels")
    return list(names) if names else None


_CHANNEL_AXES = "CSIQE"  # channel, samples, generic page sequence, unknown, lambda


def _axes_plan(path, shape: tuple, axes: str):
    """For an array of `shape` with tifffile/zarr axis letters: (squeezed shape, transpose order, (C, Y, X)).
    Size-1 axes other than Y/X are dropped, channel-like axes are merged in file order, anything else larger
    than 1 (Z, T, ...) is an error."""
    axes = axes.upper()
    if len(axes) != len(shape) or "Y" not in axes or "X" not in axes:
        raise ImageReadError(path, f"expected an image with Y and X axes, got axes {axes!r} shape {tuple(shape)}")
    keep = []
    for i, a in enumerate(axes):
        if a in "YX" or a in _CHANNEL_AXES:
            keep.append(i)
        elif shape[i] != 1:
            raise ImageReadError(
                path, f"expected a 2-D multi-channel image, got axes {axes!r} shape {tuple(shape)} ({a}={shape[i]})"
            )
    kept_shape = tuple(shape[i] for i in keep)
    kept_axes = "".join(axes[i] for i in keep)
    chan = [i for i, a in enumerate(kept_axes) if a not in "YX"]
    order = chan + [kept_axes.index("Y"), kept_axes.index("X")]
    c = int(np.prod([kept_shape[i] for i in chan])) if chan else 1
    return kept_shape, order, (c, kept_shape[order[-2]], kept_shape[order[-1]])


def _axes_to_cyx(path, arr: np.ndarray, axes: str) -> np.ndarray:
    kept_shape, order, cyx = _axes_plan(path, arr.shape, axes)
    return np.transpose(arr.reshape(kept_shape), order).reshape(cyx)


# Threads tifffile may use to decode one file's compressed segments (None: its default, up to half the cores). A
# DataLoader worker sets 1 (celldino.data.loaders.seed_worker): the workers already decode in parallel, and ten
# workers each starting cores/2 threads oversubscribe the host that also runs the training process.
_decode_threads = None


def set_decode_threads(n):
    """Threads per TIFF decode in this process (None: tifffile's default)."""
    global _decode_threads
    _decode_threads = None if n is None else max(int(n), 1)


def _read_tiff(path, series: int, header_only: bool = False, channels_first: bool = False):
    """(pixels, axes, channel names) of one series, or (shape, axes, dtype, names) with header_only.
    channels_first: interleaved samples may come back as ...SYX (axes say so), which saves the later transpose;
    only for callers that go by the axes (not an explicit layout)."""
    import tifffile

    with _tifffile_errors() as errors:
        try:
            with tifffile.TiffFile(path) as tf:
                if not tf.series:
                    raise ImageReadError(path, "TIFF has no image series")
                if series >= len(tf.series):
                    raise ImageReadError(path, f"series {series} requested, the file has {len(tf.series)}")
                s = tf.series[series]
                names = _tiff_names(tf)
                if header_only:
                    shape, axes, dtype = s.shape, s.axes, s.dtype
                else:
                    fast = decode_series(tf, s, threads=_decode_threads or max((os.cpu_count() or 2) // 2, 1),
                                         channels_first=channels_first)
                    if fast is not None:
                        arr, axes = fast
                    else:  # a layout the fast path does not take: tifffile decodes it
                        arr, axes = s.asarray(maxworkers=_decode_threads), s.axes
                    shape, dtype = arr.shape, arr.dtype
        except ImageReadError:
            raise
        except FileNotFoundError:
            raise ImageNotFoundError(path, "file not found") from None
        except Exception as e:  # tifffile / imagecodecs raise many types for corrupt data
            raise ImageReadError(path, f"not a readable TIFF (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if errors:
        raise ImageReadError(path, f"truncated or corrupt TIFF: {errors[0]}")
    if header_only:
        return shape, axes, dtype, names
    return arr, axes, names


# --------------------------------------------------------------------------------------------------------------
# PNG / PIL / npy / zarr


def _read_png(path) -> np.ndarray:
    try:
        import imagecodecs

        with open(path, "rb") as f:
            data = f.read()
        return np.asarray(imagecodecs.png_decode(data))
    except FileNotFoundError:
        raise ImageNotFoundError(path, "file not found") from None
    except ImportError:
        return _read_pil(path)
    except Exception as e:
        raise ImageReadError(path, f"not a readable PNG (truncated or corrupt?): {type(e).__name__}: {e}") from None


def _read_pil(path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "1":
                im = im.convert("L")
            return np.asarray(im)
    except FileNotFoundError:
        raise ImageNotFoundError(path, "file not found") from None
    except Exception as e:
        raise ImageReadError(path, f"not a readable image (truncated or corrupt?): {type(e).__name__}: {e}") from None


def _read_npy(path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise ImageNotFoundError(path, "file not found") from None
    except Exception as e:
        raise ImageReadError(path, f"not a readable .npy array: {type(e).__name__}: {e}") from None


def _open_zarr(path):
    """-> (zarr array of the first resolution level, axes string or None, channel names or None)."""
    import zarr

    if not os.path.exists(path):
        raise ImageNotFoundError(path, "file not found")
    try:
        node = zarr.open(path, mode="r")
    except Exception as e:
        raise ImageReadError(path, f"not a readable zarr store: {type(e).__name__}: {e}") from None
    if isinstance(node, zarr.Array):
        return node, None, None
    attrs = dict(node.attrs)
    meta = attrs.get("ome", attrs)  # OME-NGFF 0.5 nests everything under "ome"
    multiscales = meta.get("multiscales")
    if not multiscales:
        raise ImageReadError(path, "zarr group without OME-NGFF 'multiscales' metadata")
    ms = multiscales[0]
    level = ms["datasets"][0]["path"]
    try:
        arr = node[level]
    except Exception as e:
        raise ImageReadError(path, f"OME-Zarr level {level!r} is missing: {e}") from None
    axes = ms.get("axes")
    if axes:
        axes = "".join((a["name"] if isinstance(a, dict) else a)[0] for a in axes)
    elif arr.ndim == 5:  # OME-NGFF <= 0.2 has no axes and is always t, c, z, y, x
        axes = "tczyx"
    names = [ch.get("label") for ch in meta.get("omero", {}).get("channels", [])] or None
    if names is not None and any(n is None for n in names):
        names = None
    return arr, axes, names


# --------------------------------------------------------------------------------------------------------------
# layout and channels


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")


def _strip_tiles(path, h: int, w: int, tiles: Optional[int]) -> int:
    """Tile count of an h x w horizontal strip: `tiles` when given, else w / h (square tiles). The one check of
    a strip: the pixel reader and the probe both call it, so they accept and refuse the same files."""
    if tiles is None:
        if h < 1 or w < h or w % h:  # (w < h: no whole tile, e.g. an empty 4 x 0 strip)
            raise ImageReadError(
                path, f"expected a horizontal strip of square tiles (width a multiple of height), got {h}x{w}"
            )
        return w // h
    if tiles < 1:
        raise ImageReadError(path, f"tiles={tiles}: expected a tile count of at least 1")
    if w % tiles:
        raise ImageReadError(
            path, f"expected a horizontal strip of {tiles} tiles, but width {w} is not a multiple of {tiles} ({h}x{w})"
        )
    return tiles


def _order_3d(layout: str, default_3d: str) -> str:
    """'chw' or 'hwc': how a 3-D array is stored (layout auto / strip leave it to the format's default)."""
    return default_3d if layout in ("auto", "strip") else layout


def _chw_shape(path, shape: tuple, layout: str, tiles: Optional[int], default_3d: str) -> tuple:
    """(C, H, W) an array of `shape` becomes under `layout`: `_array_to_chw` reshapes pixels by it and
    `probe_image` reports it without reading them, so the two cannot disagree."""
    if len(shape) == 2:
        h, w = shape
        if layout != "strip":
            return (1, h, w)
        t = _strip_tiles(path, h, w, tiles)
        return (t, h, w // t)
    if len(shape) == 3:
        return tuple(shape) if _order_3d(layout, default_3d) == "chw" else (shape[2], shape[0], shape[1])
    raise ImageReadError(path, f"expected a 2-D or 3-D image array, got shape {tuple(shape)}")


def _array_to_chw(path, arr: np.ndarray, layout: str, tiles: Optional[int], default_3d: str) -> np.ndarray:
    c, h, w = _chw_shape(path, arr.shape, layout, tiles, default_3d)
    if arr.ndim == 3:
        return arr if _order_3d(layout, default_3d) == "chw" else np.moveaxis(arr, -1, 0)
    if layout != "strip":
        return arr[None]
    # column-major reshape of the reference == channel k holds columns [k*w, (k+1)*w)
    return np.ascontiguousarray(arr.reshape(h, c, w).transpose(1, 0, 2))


def _tiff_follows_layout(ndim: int, layout: str) -> bool:
    """A TIFF goes by its own axes unless an explicit layout fits its page: a 2-D page read as a strip, a 3-D
    one as chw / hwc (the reader and the probe both ask here)."""
    return ndim == 2 and layout == "strip" or ndim == 3 and layout in ("chw", "hwc")


def resolve_channels(path, channels: ChannelSpec, names: Optional[Sequence[str]], n_channels: int) -> list:
    """Channel selection -> list of indices. Items are ints (indices, negative allowed) or names; a name that is
    not known but is all digits is read as an index. A comma-separated string is split."""
    if isinstance(channels, str):
        channels = [c.strip() for c in channels.split(",") if c.strip()]
    idx = []
    for ch in channels:
        if isinstance(ch, (int, np.integer)):
            i = int(ch)
        elif names is not None and ch in names:
            if list(names).count(ch) > 1:
                raise ImageReadError(path, f"channel name {ch!r} is ambiguous: names are {list(names)}")
            i = list(names).index(ch)
        elif isinstance(ch, str) and ch.lstrip("-").isdigit():
            i = int(ch)
        else:
            known = f"the file's channels are {list(names)}" if names else "the file has no channel names"
            raise ImageReadError(path, f"unknown channel name {ch!r}; {known}")
        if not -n_channels <= i < n_channels:
            raise ImageReadError(path, f"channel index {i} out of range: the image has {n_channels} channels")
        idx.append(i % n_channels)
    if not idx:
        raise ImageReadError(path, "empty channel selection")
    return idx


def _check_dtype(path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.byteorder not in ("=", "|") and arr.dtype.newbyteorder("=") in SUPPORTED_DTYPES:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in SUPPORTED_DTYPES:
        raise ImageReadError(
            path, f"unsupported dtype {arr.dtype} (expected one of {', '.join(str(d) for d in SUPPORTED_DTYPES)})"
        )
    return arr


def read_image_and_names(
    path,
    channels: ChannelSpec = None,
    *,
    channel_names: Optional[Sequence[str]] = None,
    layout: str = "auto",
    tiles: Optional[int] = None,
    series: int = 0,
    check_finite: bool = True,
):
    """Like `read_image`, also returning the channel names of the result (None when unknown)."""
    path = os.fspath(path)
    _check_layout(layout)
    kind = _existing_image_format(path)
    names = None
    if kind == "tiff":
        arr, axes, names = _read_tiff(path, series, channels_first=layout == "auto")
        if _tiff_follows_layout(arr.ndim, layout):
            arr = _array_to_chw(path, arr, layout, tiles, "chw")
        else:
            arr = _axes_to_cyx(path, arr, axes)
    elif kind in ("png", "pil"):
        arr = _read_png(path) if kind == "png" else _read_pil(path)
        arr = _array_to_chw(path, arr, layout, tiles, "hwc")
    elif kind == "npy":
        arr = _array_to_chw(path, _read_npy(path), layout, tiles, "chw")
    else:
        zarr_arr, axes, names = _open_zarr(path)
        try:
            arr = np.asarray(zarr_arr[...])
        except Exception as e:
            raise ImageReadError(path, f"zarr chunks unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None
        arr = _axes_to_cyx(path, arr, axes) if axes else _array_to_chw(path, arr, layout, tiles, "chw")
    arr = _check_dtype(path, arr)
    if channel_names is not None:
        names = list(channel_names)
    if names is not None and len(names) != arr.shape[0]:
        if channel_names is not None:
            raise ImageReadError(path, f"{len(names)} channel names given ({names}) but the image has {arr.shape[0]} channels")
        names = None  # file metadata that does not match the pixel layout (e.g. one name for an RGB plane)
    if channels is not None:
        idx = resolve_channels(path, channels, names, arr.shape[0])
        arr = arr[idx]
        names = [names[i] for i in idx] if names is not None else None
    if check_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ImageReadError(path, f"{bad} NaN/inf pixel values (expected finite intensities)")
    return np.ascontiguousarray(arr), names


def read_image(
    path,
    channels: ChannelSpec = None,
    *,
    channel_names: Optional[Sequence[str]] = None,
    layout: str = "auto",
    tiles: Optional[int] = None,
    series: int = 0,
    check_finite: bool = True,
) -> np.ndarray:
    """Decode `path` into a C x H x W numpy array with the file's dtype and values.

    channels: None (all), or indices / names (OME names, tifffile "channel_names", ImageJ labels, or
    `channel_names` given here), in the order wanted, e.g. ["DNA", "ER", "RNA", "AGP", "Mito"].
    layout: "auto" (format default), "strip" (2-D strip of tiles -> channels), "chw" / "hwc" for 3-D arrays.
    Raises ImageReadError (ImageNotFoundError for a missing file) naming the file and what was expected.
    """
    return read_image_and_names(
        path, channels, channel_names=channel_names, layout=layout, tiles=tiles, series=series,
        check_finite=check_finite,
    )[0]


def probe_image(path, *, layout: str = "auto", tiles: Optional[int] = None, series: int = 0) -> ImageInfo:
    """Shape (C, H, W), dtype and channel names without decoding pixels where the format allows it
    (TIFF, .npy, zarr); PNG and other PIL formats are decoded."""
    path = os.fspath(path)
    _check_layout(layout)
    kind = _existing_image_format(path)
    if kind == "tiff":
        shape, axes, dtype, names = _read_tiff(path, series, header_only=True)
        if _tiff_follows_layout(len(shape), layout):
            chw = _chw_shape(path, shape, layout, tiles, "chw")
        else:
            chw = _axes_plan(path, shape, axes)[2]
    elif kind == "npy":
        arr = _read_npy(path, mmap=True)
        chw, dtype, names = _chw_shape(path, arr.shape, layout, tiles, "chw"), arr.dtype, None
    elif kind == "zarr":
        zarr_arr, axes, names = _open_zarr(path)
        shape = tuple(zarr_arr.shape)
        chw = _axes_plan(path, shape, axes)[2] if axes else _chw_shape(path, shape, layout, tiles, "chw")
        dtype = zarr_arr.dtype
    else:
        arr, names = read_image_and_names(path, layout=layout, tiles=tiles, check_finite=False)
        chw, dtype = arr.shape, arr.dtype
    if names is not None and len(names) != chw[0]:
        names = None
    return ImageInfo(shape=tuple(int(v) for v in chw), dtype=np.dtype(dtype), channel_names=tuple(names) if names else None)
