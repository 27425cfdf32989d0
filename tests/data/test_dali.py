"""DALI TIFF loader: bit-exact against tifffile on DALI's CPU backend (GPU twins marked gpu), per-file fallback
routing, DistributedSampler-style sharding, and the DLPack hand-off to torch.

The reference for every decoded value is `tifffile.imread` (independent of celldino's own readers)."""

import logging
import os

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip(
    "nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130; scripts/install.sh does)"
)

from celldino.data.dali import (  # noqa: E402
    DaliTiffLoader,
    dali_blocker,
    parse_tiff_header,
    shard_indices,
)
from celldino.data.io import ImageReadError  # noqa: E402

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]
# (tifffile compression argument, predictor): every compression DALI's CPU decoder handles exactly
COMPRESSIONS = [(None, None), ("lzw", None), ("lzw", True), ("zlib", None), ("zlib", True), (32946, None),
                ("zstd", None), ("zstd", True), ("packbits", None)]


def _random_image(rng, shape, dtype=np.uint16):
    info = np.iinfo(dtype)
    a = rng.integers(0, int(info.max) + 1, shape, dtype=dtype)
    a.flat[0], a.flat[-1] = info.max, 0  # extremes survive
    return a


def _write(path, arr, **kwargs):
    kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, arr, **kwargs)
    return str(path)


def _reference_chw(path):
    """tifffile's decoded array as C x H x W (2-D -> 1 channel; planar and page stacks are already C-first)."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        arr = tf.series[0].asarray()
        contig = page.planarconfig == 1 and page.samplesperpixel > 1 and len(tf.pages) == 1
    if arr.ndim == 2:
        return arr[None]
    return np.moveaxis(arr, -1, 0) if contig else arr


def _decode_all(paths, device="cpu", batch_size=4, **kwargs):
    """{index: (C x H x W numpy, was_fallback)} over one epoch, plus the loader."""
    loader = DaliTiffLoader(paths, batch_size, device=device, shuffle=False, num_threads=2, **kwargs)
    out = {}
    for batch in loader:
        images = batch.images if isinstance(batch.images, list) else list(batch.images)
        for img, idx, fb in zip(images, batch.indices.tolist(), batch.fallback.tolist()):
            assert idx not in out
            out[idx] = (img.cpu().numpy(), fb)
    return out, loader


@pytest.fixture(scope="module")
def contiguous_files(tmp_path_factory):
    """Every variant DALI should decode itself: 1 / 3 / 4 / 5 interleaved channels x every compression, plus
    tiles, several strips, BigTIFF, big-endian, RGB, an Orientation tag and odd sizes."""
    d = tmp_path_factory.mktemp("dali_contig")
    rng = np.random.default_rng(1)
    paths = []
    for ci, (comp, pred) in enumerate(COMPRESSIONS):
        for c in (1, 3, 4, 5):
            shape = (19 + ci, 23 + c) if c == 1 else (19 + ci, 23 + c, c)
            kw = {"compression": comp, "predictor": pred} if comp else {}
            if c > 1:
                kw["planarconfig"] = "contig"
            paths.append(_write(d / f"c{c}_{comp}_{pred}.tif", _random_image(rng, shape), **kw))
    a = _random_image(rng, (40, 50, 4))
    paths.append(_write(d / "tiled.tif", a, tile=(16, 32), compression="zlib", planarconfig="contig"))
    paths.append(_write(d / "strips.tif", a, rowsperstrip=7, compression="zstd", planarconfig="contig"))
    paths.append(_write(d / "bigtiff.tif", a, bigtiff=True, compression="lzw", planarconfig="contig"))
    paths.append(_write(d / "bigendian.tif", a, byteorder=">", compression="zlib", planarconfig="contig"))
    paths.append(_write(d / "rgb.tif", a[..., :3].copy(), photometric="rgb"))
    paths.append(_write(d / "orientation.tif", a, planarconfig="contig", extratags=[(274, 3, 1, 6, True)]))
    return paths


@pytest.fixture(scope="module")
def fallback_files(tmp_path_factory):
    """Variants DALI must not see: planar (3 / 4 / 5 channels, the 3-channel one DALI would decode *wrongly*),
    an OME multi-page stack, a uint8 file in a uint16 loader, a PNG and a .npy array."""
    d = tmp_path_factory.mktemp("dali_fallback")
    rng = np.random.default_rng(2)
    paths = {}
    for c in (3, 4, 5):
        paths[f"planar{c}"] = _write(d / f"planar{c}.tif", _random_image(rng, (c, 21, 27)),
                                     planarconfig="separate", compression="zlib")
    paths["ome"] = _write(d / "stack.ome.tif", _random_image(rng, (4, 21, 27)), ome=True,
                          metadata={"axes": "CYX"})
    paths["uint8"] = _write(d / "u8.tif", _random_image(rng, (21, 27, 4), np.uint8), planarconfig="contig")
    import imagecodecs

    png = _random_image(rng, (21, 27, 3))
    with open(d / "rgb16.png", "wb") as f:
        f.write(imagecodecs.png_encode(png))
    paths["png"] = str(d / "rgb16.png")
    np.save(d / "chw.npy", _random_image(rng, (4, 21, 27)))
    paths["npy"] = str(d / "chw.npy")
    return paths


# ------------------------------------------------------------------------------------------------ header parsing


def test_header_matches_tifffile(contiguous_files, fallback_files):
    for path in list(contiguous_files) + [p for k, p in fallback_files.items() if k not in ("png", "npy")]:
        with open(path, "rb") as f:
            h = parse_tiff_header(f.read(), path)
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            assert (h.width, h.height) == (page.imagewidth, page.imagelength), path
            assert h.samples_per_pixel == page.samplesperpixel, path
            assert h.bits_per_sample[0] == page.bitspersample, path
            assert h.compression == int(page.compression), path
            assert h.planar_config == int(page.planarconfig), path
            assert h.predictor == int(page.predictor), path
            assert h.tiled == page.is_tiled, path
            assert h.multi_page == (len(tf.pages) > 1), path
            assert h.bigtiff == tf.is_bigtiff and h.big_endian == (tf.byteorder == ">"), path


def test_header_rejects_truncated_and_non_tiff(contiguous_files, tmp_path):
    with open(contiguous_files[0], "rb") as f:
        data = f.read()
    with pytest.raises(ImageReadError, match="truncated") as info:
        parse_tiff_header(data[: len(data) - 10], "cut.tif")
    assert info.value.path == "cut.tif"
    with pytest.raises(ImageReadError, match="not a TIFF"):
        parse_tiff_header(b"\x89PNG\r\n\x1a\n" + bytes(100), "x.png")


def test_routing_decisions(contiguous_files, fallback_files):
    def blocker(path, dtype="uint16"):
        with open(path, "rb") as f:
            return dali_blocker(parse_tiff_header(f.read(), path), dtype)

    assert all(blocker(p) is None for p in contiguous_files)
    assert "planar" in blocker(fallback_files["planar4"])
    assert "multi-page" in blocker(fallback_files["ome"])
    assert "8-bit" in blocker(fallback_files["uint8"])
    assert blocker(fallback_files["uint8"], "uint8") is None
    assert "16-bit" in blocker(contiguous_files[0], "uint8")


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("device", DEVICES)
def test_dali_decodes_bit_exact(contiguous_files, device):
    out, loader = _decode_all(contiguous_files, device, batch_size=5)
    assert sorted(out) == list(range(len(contiguous_files)))
    for i, path in enumerate(contiguous_files):
        img, fb = out[i]
        ref = _reference_chw(path)
        assert not fb, f"{path} went to the fallback"
        assert img.dtype == np.uint16 and img.shape == ref.shape, path
        np.testing.assert_array_equal(img, ref, err_msg=path)
    assert loader.stats["dali"] == len(contiguous_files) and loader.stats["fallback"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_fallback_decodes_and_counts(fallback_files, contiguous_files, device, caplog):
    paths = list(fallback_files.values()) + contiguous_files[:3]
    with caplog.at_level(logging.WARNING, logger="celldino"):
        out, loader = _decode_all(paths, device, batch_size=4)
    n_fb = len(fallback_files)
    for i, path in enumerate(paths):
        img, fb = out[i]
        if path.endswith(".png"):
            import imagecodecs

            with open(path, "rb") as f:
                ref = np.moveaxis(imagecodecs.png_decode(f.read()), -1, 0)
        elif path.endswith(".npy"):
            ref = np.load(path)
        else:
            ref = _reference_chw(path).astype(np.uint16)  # the uint8 file is widened, values unchanged
        assert fb == (i < n_fb), path
        assert img.dtype == np.uint16
        np.testing.assert_array_equal(img, ref, err_msg=path)
    stats = loader.stats
    assert stats["fallback"] == n_fb and stats["dali"] == 3 and stats["skipped"] == 0
    reasons = stats["fallback_reasons"]
    assert reasons["planar TIFF (PlanarConfiguration=2)"] == 3
    assert sum(v for k, v in reasons.items() if k.startswith("multi-page")) == 1
    assert reasons["not a TIFF"] == 2 and reasons["8-bit samples in a 16-bit pipeline"] == 1
    logged = " ".join(r.getMessage() for r in caplog.records)
    # the first file of each reason is named (reads run in parallel: whichever planar file came first)
    assert "planar" in logged and any(fallback_files[f"planar{c}"] in logged for c in (3, 4, 5))


def test_uint8_loader_and_unrepresentable_file(fallback_files, contiguous_files):
    out, loader = _decode_all([fallback_files["uint8"]], dtype="uint8")
    img, fb = out[0]
    assert not fb and img.dtype == np.uint8
    np.testing.assert_array_equal(img, _reference_chw(fallback_files["uint8"]))
    with pytest.raises(ImageReadError, match="uint16 pixels cannot be represented exactly as uint8") as info:
        _decode_all([contiguous_files[0]], dtype="uint8")
    assert info.value.path == contiguous_files[0]


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n", [1, 7, 12, 13])
@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shard_indices_partition(n, shards):
    for shuffle in (False, True):
        parts = [shard_indices(n, s, shards, shuffle=shuffle, seed=4, epoch=1, pad=False) for s in range(shards)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))  # exactly once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        padded = [shard_indices(n, s, shards, shuffle=shuffle, seed=4, epoch=1) for s in range(shards)]
        assert {len(p) for p in padded} == {-(-n // shards)}
        allp = np.concatenate(padded)
        assert set(allp.tolist()) == set(range(n))
        assert np.bincount(allp, minlength=n).max() <= -(-shards // n) + 1  # padding repeats few files


def test_shard_indices_seeding():
    a = shard_indices(50, 0, 1, seed=3, epoch=0)
    assert np.array_equal(a, shard_indices(50, 0, 1, seed=3, epoch=0))
    assert not np.array_equal(a, shard_indices(50, 0, 1, seed=3, epoch=1))
    assert not np.array_equal(a, shard_indices(50, 0, 1, seed=4, epoch=0))
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(shard_indices(9, 1, 2, shuffle=False, pad=False), [1, 3, 5, 7])
    with pytest.raises(ValueError, match="shard_id"):
        shard_indices(9, 2, 2)


def test_loader_shards_cover_every_file_once(contiguous_files):
    paths = contiguous_files[:11]
    for epoch in range(2):
        seen = []
        for shard in range(3):
            loader = DaliTiffLoader(paths, 2, device="cpu", shard_id=shard, num_shards=3, seed=7, pad=False,
                                    start_epoch=epoch, num_threads=1)
            got = [i for b in loader for i in b.indices.tolist()]
            assert got == loader.shard_order(epoch).tolist()
            seen += got
        assert sorted(seen) == list(range(len(paths)))
    # the same loader runs consecutive epochs with fresh permutations
    loader = DaliTiffLoader(paths, 4, device="cpu", seed=7, num_threads=1)
    orders = [[i for b in loader for i in b.indices.tolist()] for _ in range(3)]
    assert orders == [loader.shard_order(e).tolist() for e in range(3)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(len(paths)))
    assert loader.epoch == 3


# ------------------------------------------------------------------------------------------------ torch hand-off


@pytest.mark.parametrize("device", DEVICES)
def test_torch_handoff(tmp_path, device):
    rng = np.random.default_rng(5)
    arrays = [_random_image(rng, (33, 29, 5)) for _ in range(7)]
    paths = [_write(tmp_path / f"{i}.tif", a, compression="zlib", planarconfig="contig") for i, a in
             enumerate(arrays)]
    loader = DaliTiffLoader(paths, 3, device=device, shuffle=False, num_threads=2)
    assert len(loader) == 3
    batches = list(loader)  # all kept alive: buffers must not be recycled by later iterations
    assert [len(b.indices) for b in batches] == [3, 3, 1]
    want_device = "cuda" if device == "gpu" else "cpu"
    for b in batches:
        assert isinstance(b.images, torch.Tensor) and b.images.dtype == torch.uint16
        assert b.images.device.type == want_device and b.images.shape[1:] == (5, 33, 29)
        assert b.indices.dtype == torch.int64 and b.fallback.dtype == torch.bool
        for img, i in zip(b.images, b.indices.tolist()):
            np.testing.assert_array_equal(img.cpu().numpy(), np.moveaxis(arrays[i], -1, 0))

    loader = DaliTiffLoader(paths, 3, device=device, shuffle=False, drop_last=True, output_cast="int32",
                            channels=[4, 1], num_threads=2)
    assert len(loader) == 2
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        assert b.images.dtype == torch.int32 and b.images.shape[1:] == (2, 33, 29)
        for img, i in zip(b.images, b.indices.tolist()):
            np.testing.assert_array_equal(img.cpu().numpy(), np.moveaxis(arrays[i], -1, 0)[[4, 1]].astype(np.int32))


def test_ragged_batch_is_a_list(contiguous_files):
    loader = DaliTiffLoader(contiguous_files[:4], 4, device="cpu", shuffle=False, output_cast="float32",
                            num_threads=1)
    (batch,) = list(loader)
    assert isinstance(batch.images, list) and [im.dtype for im in batch.images] == [torch.float32] * 4
    for img, path in zip(batch.images, contiguous_files[:4]):
        np.testing.assert_array_equal(img.numpy(), _reference_chw(path).astype(np.float32))


def test_abandoned_epoch_moves_on(contiguous_files):
    loader = DaliTiffLoader(contiguous_files[:6], 2, device="cpu", seed=1, num_threads=1)
    for _ in loader:
        break
    rest = [i for b in loader for i in b.indices.tolist()]
    assert rest == loader.shard_order(1).tolist() and loader.epoch == 2


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_and_truncated_files(contiguous_files, tmp_path):
    with open(contiguous_files[0], "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    missing = str(tmp_path / "missing.tif")
    good = contiguous_files[1:4]
    for bad in (missing, str(cut)):
        with pytest.raises(ImageReadError) as info:
            list(DaliTiffLoader(good + [bad], 2, device="cpu", shuffle=False, num_threads=1))
        assert info.value.path == bad
    loader = DaliTiffLoader(good + [missing, str(cut)], 5, device="cpu", shuffle=False, on_error="skip",
                            num_threads=1)
    (batch,) = list(loader)
    # both bad items are replaced by the next readable file, wrapping around to index 0
    assert batch.indices.tolist() == [0, 1, 2, 0, 0]
    assert loader.stats["skipped"] == 3  # missing -> cut -> 0, and cut -> 0


def test_dataset_source(tmp_path):
    from celldino.data import build_dataset

    rng = np.random.default_rng(6)
    for i in range(3):
        _write(tmp_path / f"img{i}.tif", _random_image(rng, (12, 14, 4)), planarconfig="contig", compression="zstd")
    ds = build_dataset(f"Folder:root={tmp_path}")
    loader = DaliTiffLoader(ds, 2, device="cpu", shuffle=False, num_threads=1)
    for b in loader:
        for img, i in zip(b.images, b.indices.tolist()):
            ref, _ = ds[i]
            assert torch.equal(img, ref)
    assert loader.paths == ds.image_paths
    with pytest.raises(ValueError, match="channels"):
        DaliTiffLoader(build_dataset(f"Folder:root={tmp_path}:channels=0,1"), 2, device="cpu")
    with pytest.raises(ValueError, match="Folder sets separate_channels=True"):
        DaliTiffLoader(build_dataset(f"Folder:root={tmp_path}:wildcard=SEPARATE_CHANNELS"), 2, device="cpu")
    with pytest.raises(ValueError, match="Folder sets layout='hwc'"):
        DaliTiffLoader(build_dataset(f"Folder:root={tmp_path}:layout=hwc"), 2, device="cpu")
    assert len([b for b in DaliTiffLoader(build_dataset(f"Folder:root={tmp_path}:in_chans=4"), 2, device="cpu")]) == 2
    with pytest.raises(ImageReadError, match="expected 5 channels"):
        list(DaliTiffLoader(build_dataset(f"Folder:root={tmp_path}:in_chans=5"), 2, device="cpu"))
    with pytest.raises(TypeError):
        DaliTiffLoader(os.fspath(tmp_path), 2, device="cpu")
