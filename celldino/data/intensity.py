"""Intensity scaling: the one place where decoded integers become float intensities in [0, 1].

The reference divides every image by 255 (it assumes 8-bit PNGs). We divide integer images by their dtype's
maximum instead: uint8 / 255 (identical to the reference), uint16 / 65535, int16 / 32767, ...; float images are
left unchanged. The divisor can be overridden, e.g. for 12-bit data stored in uint16 ("bits=12" -> / 4095) or
with a fixed number. 16-bit data stays 16-bit until this step.

Spec strings / values accepted by `parse_intensity_scale`:
  "auto" | "dtype" | None   divide integers by their dtype max, floats unchanged (default)
  "bits=12" | "12bit"       divide by 2**12 - 1 whatever the dtype
  a number (or its string)  divide by that number
  "none"                    no scaling (values cast to float32 as they are)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["IntensityScale", "parse_intensity_scale", "scale_intensity", "dtype_max"]

_TORCH_INT_MAX = {
    torch.uint8: 255.0,
    torch.int8: 127.0,
    torch.uint16: 65535.0,
    torch.int16: 32767.0,
    torch.uint32: 4294967295.0,
    torch.int32: 2147483647.0,
}


def dtype_max(dtype) -> Optional[float]:
    """Largest value of an integer dtype (torch or numpy), None for floating dtypes."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return None
        if dtype not in _TORCH_INT_MAX:
            raise TypeError(f"unsupported image dtype {dtype}")
        return _TORCH_INT_MAX[dtype]
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return None
    if dtype.kind in "ui":
        return float(np.iinfo(dtype).max)
    raise TypeError(f"unsupported image dtype {dtype}")


@dataclass(frozen=True)
class IntensityScale:
    """mode "dtype": divide integers by their dtype max; "divisor": divide everything by `divisor`;
    "none": no division."""

    mode: str = "dtype"
    divisor: float = 1.0

    def divisor_for(self, dtype) -> Optional[float]:
        if self.mode == "none":
            return None
        if self.mode == "divisor":
            return self.divisor
        return dtype_max(dtype)

    def __call__(self, x) -> torch.Tensor:
        return scale_intensity(x, self)


def parse_intensity_scale(spec: Union[None, str, float, int, IntensityScale]) -> IntensityScale:
    if isinstance(spec, IntensityScale):
        return spec
    if spec is None:
        return IntensityScale()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if spec <= 0:
            raise ValueError(f"intensity scale divisor must be positive, got {spec}")
        return IntensityScale("divisor", float(spec))
    s = str(spec).strip().lower()
    if s in ("auto", "dtype", ""):
        return IntensityScale()
    if s == "none":
        return IntensityScale("none")
    m = re.fullmatch(r"(?:bits\s*=\s*(\d+)|(\d+)\s*-?\s*bits?)", s)
    if m:
        bits = int(m.group(1) or m.group(2))
        if not 1 <= bits <= 32:
            raise ValueError(f"intensity scale {spec!r}: bit depth must be in 1..32")
        return IntensityScale("divisor", float(2**bits - 1))
    try:
        return parse_intensity_scale(float(s))
    except ValueError:
        raise ValueError(
            f"intensity scale {spec!r}: expected 'auto', 'none', 'bits=N' or a positive number"
        ) from None


def scale_intensity(x, scale: Union[None, str, float, IntensityScale] = None) -> torch.Tensor:
    """float32 tensor of x / divisor (see the module docstring). Accepts torch tensors and numpy arrays."""
    scale = parse_intensity_scale(scale)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    divisor = scale.divisor_for(x.dtype)
    y = x.to(torch.float32)
    if divisor is None:
        return y.clone() if y is x else y
    return y / divisor
