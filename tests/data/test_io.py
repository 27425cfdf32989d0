"""Decoders against tifffile / PIL / imagecodecs / numpy ground truth, for every format, layout and dtype."""

import json
import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from celldino.data.io import (
    ImageNotFoundError,
    ImageReadError,
    probe_image,
    read_image,
    read_image_and_names,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "data", "sample")

rng = np.random.default_rng(1234)


def _rand(shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)


def _check(path, expected, **kw):
    got = read_image(path, **kw)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    info = probe_image(path, **{k: v for k, v in kw.items() if k in ("layout", "tiles")})
    assert info.shape == expected.shape and info.dtype == expected.dtype
    return got


# ---------------------------------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "uint32", "int32", "float32", "float64", "float16"])
def test_tiff_planar_cyx_all_dtypes(tmp_path, dtype):
    x = _rand((3, 17, 23), dtype)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, x, photometric="minisblack", metadata={"axes": "CYX"})
    _check(p, tifffile.imread(p))  # ground truth from tifffile
    _check(p, x)


@pytest.mark.parametrize("compression", [None, "zlib", "lzw", "zstd"])
def test_tiff_compressions_uint16(tmp_path, compression):
    x = _rand((4, 33, 29), "uint16")
    p = tmp_path / "c.tif"
    tifffile.imwrite(p, x, photometric="minisblack", compression=compression, metadata={"axes": "CYX"})
    _check(p, x)


def test_tiff_interleaved_rgb_uint16(tmp_path):
    x = _rand((21, 19, 3), "uint16")  # Y, X, S interleaved
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, x, photometric="rgb")
    with tifffile.TiffFile(p) as tf:
        assert tf.series[0].axes == "YXS"
    _check(p, np.moveaxis(x, -1, 0))


def test_tiff_interleaved_four_samples(tmp_path):
    x = _rand((16, 12, 4), "uint8")
    p = tmp_path / "rgba.tif"
    tifffile.imwrite(p, x, photometric="rgb", extrasamples=["unassalpha"])
    _check(p, np.moveaxis(x, -1, 0))


def test_tiff_single_page_2d(tmp_path):
    x = _rand((40, 30), "uint16")
    p = tmp_path / "one.tif"
    tifffile.imwrite(p, x)
    _check(p, x[None])


def test_tiff_multipage_without_metadata(tmp_path):
    x = _rand((5, 16, 16), "uint16")
    p = tmp_path / "pages.tif"
    with tifffile.TiffWriter(p) as tw:
        for plane in x:
            tw.write(plane, photometric="minisblack", metadata=None, contiguous=False)
    with tifffile.TiffFile(p) as tf:
        assert len(tf.pages) == 5
    _check(p, x)


def test_ome_tiff_names_and_singleton_axes(tmp_path):
    x = _rand((1, 3, 1, 20, 24), "uint16")  # T C Z Y X
    p = tmp_path / "img.ome.tif"
    tifffile.imwrite(p, x, ome=True, photometric="minisblack",
                     metadata={"axes": "TCZYX", "Channel": {"Name": ["DNA", "ER", "Mito"]}})
    arr, names = read_image_and_names(p)
    np.testing.assert_array_equal(arr, x[0, :, 0])
    assert names == ["DNA", "ER", "Mito"]
    assert probe_image(p).channel_names == ("DNA", "ER", "Mito")


def test_ome_tiff_z_stack_is_an_error(tmp_path):
    x = _rand((2, 3, 8, 8), "uint16")  # Z C Y X with Z = 2
    p = tmp_path / "z.ome.tif"
    tifffile.imwrite(p, x, ome=True, photometric="minisblack", metadata={"axes": "ZCYX"})
    with pytest.raises(ImageReadError, match="Z=2"):
        read_image(p)


def test_tifffile_json_and_imagej_names(tmp_path):
    x = _rand((2, 8, 8), "uint16")
    p = tmp_path / "shaped.tif"
    tifffile.imwrite(p, x, photometric="minisblack", metadata={"axes": "CYX", "channel_names": ["a", "b"]})
    assert read_image_and_names(p)[1] == ["a", "b"]
    p2 = tmp_path / "ij.tif"
    tifffile.imwrite(p2, x.astype(np.uint16), imagej=True, metadata={"axes": "CYX", "Labels": ["u", "v"]})
    arr, names = read_image_and_names(p2)
    np.testing.assert_array_equal(arr, x)
    assert names == ["u", "v"]


def test_sample_ome_tiff_matches_tifffile():
    p = os.path.join(SAMPLE, "fields", "neuron_4ch.ome.tif")
    arr, names = read_image_and_names(p)
    np.testing.assert_array_equal(arr, tifffile.imread(p))
    assert arr.dtype == np.uint16 and arr.shape == (4, 623, 502)
    assert names == ["AF647-NCOA4", "AF568-Ferritin", "AF488-Phalloidin", "DAPI"]


# ------------------------------------------------------------------------------------------------ channels


def test_channel_selection_by_name_index_and_reorder(tmp_path):
    x = _rand((4, 10, 12), "uint16")
    p = tmp_path / "cp.ome.tif"
    names = ["DNA", "RNA", "ER", "AGP"]
    tifffile.imwrite(p, x, ome=True, photometric="minisblack", metadata={"axes": "CYX", "Channel": {"Name": names}})
    # a set stored as DNA, RNA, ER, AGP mapped onto a model trained on DNA, ER, RNA, AGP
    got, got_names = read_image_and_names(p, ["DNA", "ER", "RNA", "AGP"])
    np.testing.assert_array_equal(got, x[[0, 2, 1, 3]])
    assert got_names == ["DNA", "ER", "RNA", "AGP"]
    np.testing.assert_array_equal(read_image(p, [3, 0]), x[[3, 0]])
    np.testing.assert_array_equal(read_image(p, "AGP,0"), x[[3, 0]])
    np.testing.assert_array_equal(read_image(p, [-1]), x[[3]])
    with pytest.raises(ImageReadError, match="unknown channel name 'Mito'"):
        read_image(p, ["Mito"])
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(p, [4])


def test_channel_names_given_by_caller(tmp_path):
    x = _rand((3, 6, 6), "uint8")
    p = tmp_path / "x.npy"
    np.save(p, x)
    np.testing.assert_array_equal(read_image(p, ["c"], channel_names=["a", "b", "c"]), x[[2]])
    with pytest.raises(ImageReadError, match="2 channel names given"):
        read_image(p, channel_names=["a", "b"])


# ------------------------------------------------------------------------------------------------------ PNG


def test_png_8bit_gray_and_rgba_match_pil(tmp_path):
    g = _rand((13, 17), "uint8")
    Image.fromarray(g).save(tmp_path / "g.png")
    _check(tmp_path / "g.png", np.asarray(Image.open(tmp_path / "g.png"))[None])
    rgba = _rand((13, 17, 4), "uint8")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    _check(tmp_path / "rgba.png", np.moveaxis(np.asarray(Image.open(tmp_path / "rgba.png")), -1, 0))


def test_png_16bit_gray_kept(tmp_path):
    g = _rand((11, 9), "uint16")
    Image.fromarray(g).save(tmp_path / "g16.png")
    pil = np.asarray(Image.open(tmp_path / "g16.png"))
    assert pil.dtype.itemsize >= 2 and pil.max() > 255
    _check(tmp_path / "g16.png", pil.astype(np.uint16)[None])


def test_png_16bit_rgb_kept(tmp_path):
    import imagecodecs

    x = _rand((9, 7, 3), "uint16")
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(x))
    _check(tmp_path / "rgb16.png", np.moveaxis(x, -1, 0))


def test_png_strip_layout_reference_reshape(tmp_path):
    h, c = 8, 5
    strip = _rand((h, c * h), "uint8")
    Image.fromarray(strip).save(tmp_path / "strip.png")
    # the reference: np.reshape(im, (H, H, -1), order="F").transpose(2, 0, 1)
    ref = np.reshape(strip, (h, h, -1), order="F").transpose(2, 0, 1)
    got = _check(tmp_path / "strip.png", ref, layout="strip")
    for k in range(c):  # and, independently: channel k is columns [k*H, (k+1)*H)
        np.testing.assert_array_equal(got[k], strip[:, k * h : (k + 1) * h])
    with pytest.raises(ImageReadError, match="square tiles"):
        Image.fromarray(_rand((8, 20), "uint8")).save(tmp_path / "bad.png")
        read_image(tmp_path / "bad.png", layout="strip")


def test_tiff_strip_with_tiles_reference_reshape(tmp_path):
    x = _rand((10, 3 * 7), "uint16")  # WTC-style: 3 tiles of 10 x 7
    tifffile.imwrite(tmp_path / "wtc.tif", x)
    ref = np.reshape(x, (x.shape[0], -1, 3), order="F").transpose(2, 0, 1)
    _check(tmp_path / "wtc.tif", ref, layout="strip", tiles=3)


def test_pil_palette_png_expanded(tmp_path):
    im = Image.fromarray(_rand((6, 6), "uint8")).convert("P")
    im.save(tmp_path / "p.png")
    expected = np.moveaxis(np.asarray(Image.open(tmp_path / "p.png").convert("RGB")), -1, 0)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)


# ------------------------------------------------------------------------------------------------ npy/zarr


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_npy_layouts(tmp_path, dtype):
    x = _rand((3, 9, 11), dtype)
    np.save(tmp_path / "chw.npy", x)
    _check(tmp_path / "chw.npy", x)
    np.save(tmp_path / "hwc.npy", np.moveaxis(x, 0, -1))
    _check(tmp_path / "hwc.npy", x, layout="hwc")
    np.save(tmp_path / "yx.npy", x[0])
    _check(tmp_path / "yx.npy", x[:1])


def _write_ome_zarr(path, data, axes, names=None, version=2):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=version)
    g.create_array("0", shape=data.shape, dtype=data.dtype, chunks=data.shape)[...] = data
    g.create_array("1", shape=(1,) * data.ndim, dtype=data.dtype)  # a lower level we must not read
    ms = {"version": "0.4" if version == 2 else "0.5", "axes": [{"name": a} for a in axes],
          "datasets": [{"path": "0"}, {"path": "1"}]}
    meta = {"multiscales": [ms]}
    if names:
        meta["omero"] = {"channels": [{"label": n} for n in names]}
    g.attrs.update(meta if version == 2 else {"ome": meta})


@pytest.mark.parametrize("version", [2, 3])
def test_ome_zarr_first_level_and_names(tmp_path, version):
    x = _rand((1, 3, 1, 12, 10), "uint16")
    p = tmp_path / "img.ome.zarr"
    _write_ome_zarr(p, x, "tczyx", ["DNA", "ER", "Mito"], version)
    arr, names = read_image_and_names(p, ["Mito", "DNA"])
    np.testing.assert_array_equal(arr, x[0, [2, 0], 0])
    assert names == ["Mito", "DNA"]
    info = probe_image(p)
    assert info.shape == (3, 12, 10) and info.channel_names == ("DNA", "ER", "Mito")


def test_ome_zarr_cyx(tmp_path):
    x = _rand((2, 5, 6), "uint8")
    _write_ome_zarr(tmp_path / "c.zarr", x, "cyx")
    _check(tmp_path / "c.zarr", x)


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="nope.tif"):
        read_image(tmp_path / "nope.tif")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.png")


def test_missing_file_is_image_not_found_for_every_reader(tmp_path):
    """One error class for a missing file, whichever reader meets it, so `except FileNotFoundError` catches
    them all: the DALI router reads a file's bytes itself and used to raise a plain ImageReadError."""
    from celldino.data.dali import DaliTiffLoader  # its reading runs without DALI installed

    for name in ("gone.tif", "gone.png", "gone.npy", "gone.jpg", "gone.zarr", "gone.dat"):
        for fn in (read_image, probe_image):
            with pytest.raises(ImageNotFoundError, match=f"{name}: file not found"):
                fn(tmp_path / name)
    loader = DaliTiffLoader([str(tmp_path / "gone.tif")], 1, device="cpu")
    with pytest.raises(FileNotFoundError) as info:
        loader._read_one(0)
    assert isinstance(info.value, ImageNotFoundError) and info.value.path == str(tmp_path / "gone.tif")


def test_tiff_magic_bytes_shared_by_io_and_dali(tmp_path):
    """A TIFF without a TIFF extension: io sniffs it as one and the DALI router sends it to DALI; a .npy is
    neither, and the router hands it to read_image saying so."""
    from celldino.data.dali import DaliTiffLoader
    from celldino.data.io import image_format

    x = _rand((4, 6), "uint16")
    tifffile.imwrite(tmp_path / "noext", x)
    np.save(tmp_path / "arr.npy", x)
    assert image_format(tmp_path / "noext") == "tiff"
    np.testing.assert_array_equal(read_image(tmp_path / "noext"), x[None])
    loader = DaliTiffLoader([str(tmp_path / "noext"), str(tmp_path / "arr.npy")], 1, device="cpu")
    data, _, _, fallback = loader._read_one(0)
    assert not fallback and data.tobytes() == (tmp_path / "noext").read_bytes()
    _, arr, _, fallback = loader._read_one(1)
    assert fallback and loader.stats["fallback_reasons"] == {"not a TIFF": 1}
    np.testing.assert_array_equal(arr, x[None])


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.tif"
    p.write_text("hello, I am text")
    with pytest.raises(ImageReadError, match="notes.tif.*not a readable TIFF"):
        read_image(p)
    q = tmp_path / "notes.png"
    q.write_text("hello")
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image(q)
    r = tmp_path / "notes.dat"
    r.write_text("hello")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(r)


def test_unknown_extension_sniffed(tmp_path):
    x = _rand((2, 5, 5), "uint16")
    tifffile.imwrite(tmp_path / "a.dat", x, photometric="minisblack", metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.dat"), x)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("frac", [0.3, 0.9])
def test_truncated_tiff(tmp_path, compression, frac):
    x = _rand((4, 64, 64), "uint16")
    p = tmp_path / "full.ome.tif"
    tifffile.imwrite(p, x, ome=True, photometric="minisblack", compression=compression, metadata={"axes": "CYX"})
    data = p.read_bytes()
    q = tmp_path / "cut.ome.tif"
    q.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(ImageReadError, match="cut.ome.tif.*(truncated|corrupt)"):
        read_image(q)


def test_truncated_png(tmp_path):
    Image.fromarray(_rand((64, 64), "uint8")).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")


@pytest.mark.parametrize("dtype", ["complex64", "int64", "uint64", "bool"])
def test_unsupported_dtype(tmp_path, dtype):
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4), dtype=dtype))
    with pytest.raises(ImageReadError, match=f"unsupported dtype {dtype}"):
        read_image(tmp_path / "x.npy")


def test_wrong_ndim(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 2, 4, 4), dtype=np.uint8))
    with pytest.raises(ImageReadError, match="x.npy.*2-D or 3-D"):
        read_image(tmp_path / "x.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ImageReadError, match="o.npy"):
        read_image(tmp_path / "o.npy")


def test_nan_and_inf_pixels(tmp_path):
    x = np.ones((2, 4, 4), np.float32)
    x[1, 2, 3] = np.nan
    x[0, 0, 0] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", x, photometric="minisblack", metadata={"axes": "CYX"})
    with pytest.raises(ImageReadError, match="nan.tif: 2 NaN/inf"):
        read_image(tmp_path / "nan.tif")
    assert np.isnan(read_image(tmp_path / "nan.tif", check_finite=False)).sum() == 1


def test_error_message_names_file_and_problem(tmp_path):
    err = None
    try:
        read_image(tmp_path / "missing.ome.tif")
    except ImageReadError as e:
        err = e
    assert err is not None and err.path.endswith("missing.ome.tif") and "not found" in err.problem


def test_json_description_roundtrip_of_sample_cells():
    p = os.path.join(SAMPLE, "cells", "napari-zelda-bpae", "bpae_obj0001.tif")
    with tifffile.TiffFile(p) as tf:
        desc = json.loads(tf.pages[0].description)
    arr, names = read_image_and_names(p)
    assert names == desc["channel_names"] and arr.dtype == np.uint16 and arr.shape == (2, 64, 64)


class _DecodeThreadsProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        from celldino.data import io as celldino_io
        return celldino_io._decode_threads or 0


def test_dataloader_workers_decode_tiffs_single_threaded(tmp_path, monkeypatch):
    """seed_worker sets one decode thread per worker (the workers are the parallelism); the main process keeps
    the default; the setting reaches both decoders (tiff_strips, and tifffile's asarray for what it leaves)."""
    from celldino.data import io as celldino_io
    from celldino.data.loaders import seed_worker

    loader = torch.utils.data.DataLoader(_DecodeThreadsProbe(), batch_size=None, num_workers=1,
                                         worker_init_fn=seed_worker)
    assert list(loader) == [1, 1]
    assert celldino_io._decode_threads is None

    import tifffile
    deflate, plain = tmp_path / "a.tif", tmp_path / "b.tif"
    tifffile.imwrite(deflate, np.zeros((3, 8, 8), np.uint16), compression="zlib")
    tifffile.imwrite(plain, np.zeros((3, 8, 8), np.uint16), compression="packbits")  # one tiff_strips leaves
    seen = []
    original_asarray, original_fast = tifffile.TiffPageSeries.asarray, celldino_io.decode_series

    def spy_asarray(self, *args, **kwargs):
        seen.append(("tifffile", kwargs.get("maxworkers")))
        return original_asarray(self, *args, **kwargs)

    def spy_fast(tf, series, threads, channels_first):
        seen.append(("tiff_strips", threads))
        return original_fast(tf, series, threads, channels_first)

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", spy_asarray)
    monkeypatch.setattr(celldino_io, "decode_series", spy_fast)
    monkeypatch.setattr(celldino_io, "_decode_threads", None)
    celldino_io.set_decode_threads(1)
    celldino_io._read_tiff(str(deflate), 0)
    celldino_io._read_tiff(str(plain), 0)
    assert seen == [("tiff_strips", 1), ("tiff_strips", 1), ("tifffile", 1)]


# ------------------------------------------------------------------------------------- probe == read, layouts


def _outcome(fn, path, **kw):
    """(shape, None) or (None, message): what `fn` makes of `path`, errors included."""
    try:
        return tuple(fn(path, **kw).shape), None
    except ImageReadError as e:
        return None, str(e)


@pytest.mark.parametrize("fmt", ["tif", "npy", "png", "zarr"])
def test_probe_agrees_with_read_over_layouts_and_tiles(tmp_path, fmt):
    """probe_image reports, without the pixels, exactly the shape read_image produces, or the same error:
    tiles=0 (once probed as square tiles, read as an error), widths not divisible by tiles, non-square strips."""
    import zarr

    arrays = {"strip": _rand((4, 12), "uint8"), "odd": _rand((4, 10), "uint8"), "hwc": _rand((4, 12, 3), "uint8")}
    checked = 0
    for name, x in arrays.items():
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "tif":
            tifffile.imwrite(path, x, photometric="minisblack" if x.ndim == 2 else "rgb")
        elif fmt == "npy":
            np.save(path, x)
        elif fmt == "png":
            Image.fromarray(x).save(path)
        else:
            zarr.open_array(str(path), mode="w", shape=x.shape, dtype=x.dtype)[...] = x
        for layout in ("auto", "strip", "chw", "hwc"):
            for tiles in (None, 0, -1, 1, 3, 4, 5):
                kw = dict(layout=layout, tiles=tiles)
                read = _outcome(read_image, path, **kw)
                probed = _outcome(probe_image, path, **kw)
                assert probed == read, (path.name, kw)
                checked += read[0] is not None
                if layout == "strip" and x.ndim == 2:  # strips: the expected shape or error, by hand
                    h, w = x.shape
                    t = tiles if tiles is not None else (w // h if w % h == 0 else None)
                    if t is not None and t >= 1 and w % t == 0:
                        assert read == ((t, h, w // t), None)
                    else:
                        assert read[0] is None and path.name in read[1]
                        assert "tiles=0" in read[1] if tiles == 0 else True
    assert checked > 20  # most combinations read fine; the errors are the exceptions


def test_strip_errors_name_the_file_and_the_problem(tmp_path):
    np.save(tmp_path / "s.npy", _rand((4, 10), "uint16"))
    for tiles, problem in ((None, "square tiles .* got 4x10"), (0, "tiles=0: expected a tile count of at least 1"),
                           (3, "strip of 3 tiles, but width 10 is not a multiple of 3")):
        for fn in (read_image, probe_image):
            with pytest.raises(ImageReadError, match=f"s.npy: .*{problem}"):
                fn(tmp_path / "s.npy", layout="strip", tiles=tiles)
    with pytest.raises(ValueError, match="layout='rows'"):
        probe_image(tmp_path / "s.npy", layout="rows")  # the probe checks the layout as read_image does
    np.save(tmp_path / "empty.npy", np.zeros((4, 0), np.uint16))  # no whole tile: an ImageReadError, not a crash
    for fn in (read_image, probe_image):
        with pytest.raises(ImageReadError, match="empty.npy: .*square tiles .* got 4x0"):
            fn(tmp_path / "empty.npy", layout="strip")
