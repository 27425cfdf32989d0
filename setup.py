"""Install celldino.

`kernels/` installs as `celldino.kernels` and `benchmarks/` as `celldino.benchmarks` (package_dir mapping), so the
repo layout follows DESIGN.md while nothing claims the bare top-level names `kernels` / `benchmarks`.

The C++/CUDA extension `celldino._C` (csrc/) is optional at install time: the CPU (OpenMP) implementation is built
whenever a C++ compiler and torch are present, the CUDA one additionally when nvcc and a CUDA build of torch exist.
A failed extension build prints a warning and never fails the install; `celldino info` reports what was built.
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    if os.environ.get("CELLDINO_NO_EXTENSION", "0") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing at build time (build isolation): skip, never fail
        print(f"celldino: not building celldino._C ({exc}); install torch first and use --no-build-isolation",
              file=sys.stderr)
        return [], {}

    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")))  # a changed header rebuilds the extension
    want_cuda = os.environ.get("CELLDINO_BUILD_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    use_cuda = bool(cu) and (want_cuda == "1" or (want_cuda == "auto" and has_cuda))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extra = {"cxx": ["-O3", "-std=c++20", "-ffp-contract=off"] + openmp}
    macros = []
    if use_cuda:
        # IEEE division/sqrt and no FMA contraction: the kernel rounds exactly like the CPU twin (csrc/augment_math.h)
        extra["nvcc"] = ["-O3", "-std=c++20", "--fmad=false"]
        macros.append(("CELLDINO_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "celldino._C", cpp + cu, extra_compile_args=extra, extra_link_args=openmp, define_macros=macros,
            depends=headers)
    else:
        ext = cpp_extension.CppExtension(
            "celldino._C", cpp, extra_compile_args=extra, extra_link_args=openmp, define_macros=macros,
            depends=headers)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # a broken toolchain must not break `pip install`
                print(f"celldino: WARNING: building celldino._C failed ({exc}); "
                      "the pure-torch augmentation path will be used", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="celldino",
    version="0.1.0",
    description="Fast, faithful Cell-DINO (DINOv2 for multi-channel fluorescence microscopy): "
                "fused kernels, GPU decoding, FSDP2 trainer, kNN/linear evaluation",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["celldino", "celldino.*"])
    + ["celldino.kernels"]
    + ["celldino.benchmarks"],
    package_dir={"celldino.kernels": "kernels", "celldino.benchmarks": "benchmarks"},
    package_data={"celldino": ["config/*.yaml", "config/recipes/*.yaml", "config/recipes/*/*.yaml",
                               "config/recipes/*/*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.26",
        "omegaconf>=2.3",
        "tifffile>=2024.1.30",
        "imagecodecs>=2024.1.1",
        "pillow>=10.0",
        "safetensors>=0.4",
        "numba>=0.59",
        "tqdm>=4.66",
        "pandas>=2.0",
        "scikit-learn>=1.4",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-timeout>=2.3"],
        "gpu": ["triton>=3.0"],
        "dali": ["nvidia-dali-cuda130>=1.44"],
        "eval": ["anndata>=0.10", "matplotlib>=3.8", "umap-learn>=0.5"],
        "zarr": ["zarr>=2.16"],
        "train": ["tensorboard>=2.15", "submitit>=1.5"],
        "all": ["triton>=3.0", "anndata>=0.10", "matplotlib>=3.8", "umap-learn>=0.5", "zarr>=2.16",
                "tensorboard>=2.15", "submitit>=1.5"],
    },
    entry_points={"console_scripts": ["celldino=celldino.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
