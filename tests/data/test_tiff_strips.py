"""The fast strip decoder (celldino.data.tiff_strips) against tifffile, bit for bit, on every layout it takes, and
the layouts it must leave to tifffile."""
import numpy as np
import pytest
import tifffile

from celldino.data import tiff_strips
from celldino.data.io import ImageReadError, read_image
from test_io import _rand as _pixels  # random pixels over a dtype's whole range

pytest.importorskip("imagecodecs")


def _fast(path, threads=1, channels_first=False):
    """The fast path's pixels (None when it leaves the file to tifffile); checks the axes it reports."""
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        result = tiff_strips.decode_series(tf, series, threads=threads, channels_first=channels_first)
        if result is None:
            return None
        pixels, axes = result
        if not channels_first:
            assert axes == series.axes
        return pixels, axes


# (array shape, imwrite keyword arguments): interleaved and planar samples, several pages, odd sizes, a last strip
# shorter than the others, one row per strip, predictors, uint8 / uint16 / int16 / uint32 / float32
TAKEN = [
    ((37, 53, 5), dict(photometric="minisblack", planarconfig="contig", compression="zlib", rowsperstrip=8)),
    ((5, 37, 53), dict(photometric="minisblack", planarconfig="separate", compression="zlib", rowsperstrip=7)),
    ((4, 31, 29), dict(photometric="minisblack", compression="zlib")),  # 4 pages (tifffile's default for C,Y,X)
    ((64, 48), dict(photometric="minisblack", compression="zlib", rowsperstrip=1)),
    ((40, 33, 3), dict(photometric="rgb", compression="zlib", predictor=True, rowsperstrip=9)),
    ((3, 40, 33), dict(photometric="minisblack", planarconfig="separate", compression="zlib", predictor=True)),
    ((21, 19, 4), dict(photometric="minisblack", planarconfig="contig", compression="zstd", rowsperstrip=5)),
    ((2, 45, 50), dict(photometric="minisblack", compression="zstd", predictor=True, rowsperstrip=6)),
    ((27, 35, 4), dict(photometric="minisblack", planarconfig="contig", compression="lzw", rowsperstrip=4)),
    ((3, 26, 31), dict(photometric="minisblack", compression="lzw", predictor=True)),
]
DTYPES = ["uint8", "uint16", "int16", "uint32", "float32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kwargs", TAKEN)
def test_fast_path_equals_tifffile(tmp_path, shape, kwargs, dtype):
    if kwargs.get("predictor") and np.dtype(dtype).kind == "f":
        kwargs = dict(kwargs, predictor=False)  # floating-point prediction is left to tifffile (tested below)
    if kwargs.get("photometric") == "rgb" and dtype != "uint8":
        kwargs = dict(kwargs, photometric="minisblack")
    path = str(tmp_path / "x.tif")
    data = _pixels(shape, dtype)
    tifffile.imwrite(path, data, **kwargs)
    want = tifffile.imread(path)
    result = _fast(path)
    assert result is not None, "this layout should take the fast path"
    got = result[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_fast(path, threads=3)[0], want)
    # channels_first: interleaved samples (...YXS) come back as ...SYX, the same values
    for threads in (1, 3):
        got, axes = _fast(path, threads=threads, channels_first=True)
        with tifffile.TiffFile(path) as tf:
            series_axes = tf.series[0].axes
        if series_axes.endswith("YXS"):
            assert axes == series_axes[:-3] + "SYX"
            np.testing.assert_array_equal(got, np.moveaxis(want, -1, -3))
        else:
            assert axes == series_axes
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs", [
    dict(compression=None),  # uncompressed: tifffile reads it straight into the array already
    dict(compression="zlib", tile=(16, 16)),
    dict(compression="zlib", byteorder=">"),
    dict(compression="packbits"),
    dict(compression="zlib", predictor=3),  # floating-point predictor
])
def test_other_layouts_are_left_to_tifffile(tmp_path, kwargs):
    dtype = "float32" if kwargs.get("predictor") == 3 else "uint16"
    path = str(tmp_path / "x.tif")
    data = _pixels((3, 40, 48), dtype)
    tifffile.imwrite(path, data, photometric="minisblack", **kwargs)
    assert _fast(path) is None
    np.testing.assert_array_equal(read_image(path), data)  # and read_image still reads it (tifffile)


def test_read_image_uses_it_and_returns_channels_first(tmp_path, monkeypatch):
    path = str(tmp_path / "field.tif")
    data = _pixels((33, 41, 5), "uint16")
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="contig", compression="zlib",
                     rowsperstrip=4)
    calls = []
    original = tiff_strips.decode_series

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr("celldino.data.io.decode_series", spy)
    np.testing.assert_array_equal(read_image(path), np.moveaxis(data, -1, 0))
    assert len(calls) == 1 and calls[0] is not None and calls[0][1] == "SYX"  # decoded channels-first
    # an explicit layout is applied to the array as stored: the fast path then keeps tifffile's order
    np.testing.assert_array_equal(read_image(path, layout="hwc"), np.moveaxis(data, -1, 0))
    assert calls[-1][1] == "YXS"


def test_a_corrupt_strip_falls_back_to_tifffile_and_its_error(tmp_path):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(str(path), _pixels((3, 40, 48), "uint16"), photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(str(path)) as tf:
        offset = int(tf.pages[1].dataoffsets[0])
    raw = bytearray(path.read_bytes())
    raw[offset + 2: offset + 40] = bytes(38)  # garbage inside the second page's deflate stream
    path.write_bytes(bytes(raw))
    assert _fast(str(path)) is None
    with pytest.raises(ImageReadError, match="bad.tif"):
        read_image(str(path))


@pytest.mark.parametrize("compression", ["zlib", "lzw"])
def test_a_strip_that_decodes_short_is_not_taken(tmp_path, compression):
    """A strip whose byte count is cut still decodes without a codec error, just to fewer bytes: the fast path
    must notice (np.empty's leftovers would otherwise be returned as pixels) and leave the file to tifffile."""
    path = tmp_path / "short.tif"
    tifffile.imwrite(str(path), _pixels((3, 64, 64), "uint16"), photometric="minisblack", planarconfig="separate",
                     compression=compression, rowsperstrip=8)
    with tifffile.TiffFile(str(path), mode="r+b") as tf:
        counts = list(tf.pages[0].databytecounts)
        counts[1] //= 2
        tf.pages[0].tags["StripByteCounts"].overwrite(counts)
    assert _fast(str(path)) is None
    with pytest.raises(ImageReadError, match="short.tif"):
        read_image(str(path))


def test_every_bundled_sample_tiff_decodes_like_tifffile():
    """The real microscopy TIFFs of data/sample (single-page and multi-page deflate, uint8 and uint16)."""
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "data", "sample")
    paths = sorted(glob.glob(os.path.join(root, "**", "*.tif*"), recursive=True))
    assert len(paths) > 100
    for path in paths:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            got = tiff_strips.decode_series(tf, series)
            assert got is not None, path
            np.testing.assert_array_equal(got[0], series.asarray(), err_msg=path)


def test_celldino_info_names_the_fast_codecs():
    from celldino.info import collect

    assert collect()["fast TIFF strips (tiff_strips)"] == "deflate, zstd, LZW"
