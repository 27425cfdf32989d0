#!/usr/bin/env bash
# Install celldino and everything its demo and tests need, on a fresh machine (CPU or GPU).
# torch is pinned to the build this project is tested with; the C++ extension (csrc/) is compiled against it,
# so celldino itself is installed with --no-build-isolation after torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet -r scripts/requirements.txt
# NVIDIA DALI (GPU TIFF decoding, celldino.data.dali; CI tests its CPU backend). Linux x86_64/aarch64 wheels only;
# measured: ~200 MB download, ~15 s install, ~600 MB on disk. CELLDINO_NO_DALI=1 skips it (the DALI tests then skip).
if [ "$(uname -s)" = "Linux" ] && [ "${CELLDINO_NO_DALI:-0}" != "1" ]; then
  "$PY" -m pip install --quiet "nvidia-dali-cuda130>=1.44"
fi

# Compile the CUDA half of celldino._C when nvcc is here (it only runs on a GPU, but CI checks it compiles).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
"$PY" -m pip install --quiet --no-build-isolation -e ".[test,eval,train,zarr]"
"$PY" -m celldino info || true
