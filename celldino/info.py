"""`celldino info`: what this install can do (versions, devices, kernels, extensions)."""
import importlib
import platform


def add_arguments(parser):
    del parser


def _version(name):
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report, never fail
        return f"not available ({type(exc).__name__})"
    return getattr(module, "__version__", "installed")


def collect():
    import torch

    import celldino
    from celldino.kernels import _dispatch

    info = {
        "celldino": celldino.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "triton": _version("triton"),
        "kernel backend": _dispatch.backend(),
        "celldino._C (fused augmentation)": _version("celldino._C"),
        "nvidia.dali": _version("nvidia.dali"),
        "numba": _version("numba"),
        "tifffile": _version("tifffile"),
        "imagecodecs": _version("imagecodecs"),
        "fast TIFF strips (tiff_strips)": _fast_tiff_codecs(),
    }
    return info


def _fast_tiff_codecs():
    """Which compressions celldino.data.tiff_strips decodes itself (the rest goes to tifffile)."""
    from celldino.data import tiff_strips
    names = [name for name, code in (("deflate", 8), ("zstd", 50000), ("LZW", 5)) if tiff_strips.codec_for(code)]
    return ", ".join(names) if names else "none (install imagecodecs)"


def main(args):
    del args
    for key, value in collect().items():
        print(f"{key:34s} {value}")
    return 0
