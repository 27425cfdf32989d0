"""Intensity scaling: uint8 / 255 bit-identical to the reference's Div255, 16-bit / 65535, overrides."""

import numpy as np
import pytest
import torch

from celldino.data.intensity import IntensityScale, dtype_max, parse_intensity_scale, scale_intensity


def test_uint8_identical_to_reference_div255():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    ref = torch.Tensor(x) / 255  # reference: torch.Tensor(decoded) then Div255
    got = scale_intensity(torch.from_numpy(x))
    assert got.dtype == torch.float32
    assert torch.equal(got, ref)


def test_uint16_divided_by_65535_in_float32():
    x = np.array([[[0, 1, 255, 4095, 65534, 65535]]], dtype=np.uint16)
    got = scale_intensity(torch.from_numpy(x))
    expected = torch.tensor(x.astype(np.float32) / np.float32(65535))
    assert torch.equal(got, expected)
    assert got.max() == 1.0 and got.min() == 0.0


@pytest.mark.parametrize("dtype,maxval", [(np.int16, 32767), (np.int8, 127), (np.uint32, 4294967295), (np.int32, 2**31 - 1)])
def test_other_integer_dtypes(dtype, maxval):
    x = np.array([[[0, maxval]]], dtype=dtype)
    got = scale_intensity(x)
    assert got[0, 0, 1].item() == pytest.approx(1.0)
    assert dtype_max(dtype) == maxval


def test_float_unchanged_and_never_aliased():
    x = torch.rand(2, 3, 3)
    got = scale_intensity(x)
    assert torch.equal(got, x) and got.data_ptr() != x.data_ptr()
    x64 = torch.rand(2, 3, 3, dtype=torch.float64)
    assert scale_intensity(x64).dtype == torch.float32


def test_overrides():
    x = torch.from_numpy(np.array([[[4095, 2048]]], dtype=np.uint16))
    assert scale_intensity(x, "bits=12")[0, 0, 0].item() == 1.0
    assert scale_intensity(x, "12bit")[0, 0, 0].item() == 1.0
    assert scale_intensity(x, 4095.0)[0, 0, 1].item() == pytest.approx(2048 / 4095)
    assert scale_intensity(x, "none")[0, 0, 0].item() == 4095.0
    assert scale_intensity(torch.rand(1, 2, 2) * 10, 10).max() <= 1.0
    assert parse_intensity_scale(None) == IntensityScale()
    for bad in ("bits=0", "-3", "twelve", 0):
        with pytest.raises(ValueError):
            parse_intensity_scale(bad)
