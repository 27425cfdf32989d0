#!/usr/bin/env bash
# One-call GPU check for a lent device machine (see docs/benchmarks.md): build celldino._C with CUDA, run the
# GPU-marked tests, then the benchmark suite at GPU sizes, most important first, each stage under its own time
# limit and all of them inside one overall deadline, so a slow stage costs the later ones, never the results.
#
#   bash scripts/gpu_check.sh [total_seconds]      (default 560)
#   STAGES="test_kernels_eval bench_knn" bash scripts/gpu_check.sh 200     (only the named stages; wheels, install and
#                                                                          import always run)
# Extra arguments: TRAIN_ARGS (e.g. "--train-variant nofsdp=train.fsdp=false"), FSDP_ARGS (bench_train_fsdp's,
# e.g. "--train-variant pf1=train.fsdp_prefetch=1"), DATA_ARGS, KNN_ARGS, KOLEO_ARGS,
# SINKHORN_ARGS, AUGMENT_ARGS; stage limits TRAIN_LIMIT, AUGMENT_LIMIT, DATA_LIMIT (seconds).
#
# Writes under $OUT (or ./gpu_check_out): gpu_check.log, results.tgz (benchmark CSVs + REPORT.md, pytest junit
# XML, build log, bench_train's profiler output in results/profile/), refreshed after every stage. Python
# packages the device image lacks (omegaconf, antlr4: pure Python) are expected in ./.devsite, carried with the
# call and kept out of git; make it here with
#   echo /.devsite/ >> .git/info/exclude; mkdir -p .devsite
#   cp -r "$(python3 -c 'import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))')"/{omegaconf,antlr4} .devsite/
# Wheels in ./.devsite/wheels are pip-installed first (no deps, no index). Put imagecodecs there (26 MB, abi3, so
# the device's Python 3.12 takes it): the image lacks it, and without it tifffile inflates deflate TIFFs with
# Python's zlib instead of libdeflate, which is not what a celldino install decodes with:
#   pip download imagecodecs --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .devsite/wheels
set -u
START=$(date +%s)
TOTAL=${1:-560}
OUT=${OUT:-$PWD/gpu_check_out}
WORK=/tmp/celldino_gpu
mkdir -p "$OUT" "$WORK/results" "$WORK/junit"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.devsite${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=6
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

pack() { tar czf "$OUT/results.tgz" -C "$WORK" results junit build.log 2>/dev/null; }

# stage NAME BUDGET CMD...: run CMD with min(BUDGET, time left - 5 s); record rc and seconds.
stage() {
    local name=$1 budget=$2; shift 2
    if [[ -n "${STAGES:-}" && " wheels install import $STAGES " != *" $name "* ]]; then return; fi
    local left=$(( TOTAL - ($(date +%s) - START) - 5 ))
    (( left < budget )) && budget=$left
    if (( budget < 10 )); then echo "### $name: SKIPPED (no time left)"; echo "$name skipped" >> "$WORK/summary"; return; fi
    echo "### $name (limit ${budget}s): $*"
    local t0=$(date +%s)
    timeout -k 5 "$budget" "$@"
    local rc=$?
    echo "### $name rc=$rc in $(( $(date +%s) - t0 ))s"
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" >> "$WORK/summary"
    pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"

# Editable install without the extension (seconds), then the CUDA extension built in place in the background
# while the kernel tests run (they do not need it).
if compgen -G ".devsite/wheels/*.whl" > /dev/null; then
    stage wheels 60 python3 -m pip install -q --no-deps --no-index .devsite/wheels/*.whl
fi
stage install 90 env CELLDINO_NO_EXTENSION=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
( t0=$(date +%s); timeout 240 python3 setup.py build_ext --inplace > "$WORK/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - t0 ))s" >> "$WORK/build.log" ) &
BUILD_PID=$!
stage import 30 python3 -c "import celldino.kernels, celldino.train.trainer, celldino.benchmarks.run_all; print('imports ok')"

# GPU tests check numerics, not tuning: CELLDINO_AUTOTUNE=0 compiles each kernel's default config only (the
# sm_90 lowering tests compile every config), and xdist spreads the compiles over the cores.
PYTEST=(env CELLDINO_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout 150)
python3 -c "import xdist" 2>/dev/null && PYTEST+=(-n 4)
stage test_kernels_eval 150 "${PYTEST[@]}" tests/kernels tests/eval --junitxml "$WORK/junit/kernels_eval.xml"

BENCH=(python3 -m celldino.benchmarks.run_all --results-dir "$WORK/results")
stage bench_attention 110 "${BENCH[@]}" attention --attn-layouts vitl16 vitl14
stage bench_sinkhorn 45 "${BENCH[@]}" sinkhorn ${SINKHORN_ARGS:-}
stage bench_koleo 35 "${BENCH[@]}" koleo ${KOLEO_ARGS:-}

# everything below needs celldino._C (bench_train's end-to-end rows cut crops with its CUDA kernel)
if [[ -z "${STAGES:-}" || " $STAGES " =~ " "(test_augment|bench_train|train_smoke|bench_augment|bench_data)" " ]]; then
    wait "$BUILD_PID"; tail -3 "$WORK/build.log"
fi
stage test_augment 60 "${PYTEST[@]}" tests/data tests/train tests/models --junitxml "$WORK/junit/data.xml"
# --train-profile: where the step's time goes (top-40 kernels, category breakdown, traces of at most
# TRAIN_TRACE_MB each, gzipped: results.tgz must come back under 16 MiB) into results/profile, packed with the CSVs
stage bench_train ${TRAIN_LIMIT:-300} "${BENCH[@]}" train --train-batch 32 --train-steps 10 \
    --train-profile "$WORK/results/profile" --train-profile-trace-mb "${TRAIN_TRACE_MB:-5}" ${TRAIN_ARGS:-}
# only when named in STAGES: the 1-rank FSDP2 step as the first trainer of its own process (run 4 timed it second)
if [[ " ${STAGES:-} " == *" bench_train_fsdp "* ]]; then
    stage bench_train_fsdp 150 python3 -m celldino.benchmarks.run_all --results-dir "$WORK/results/fsdp" train \
        --train-batch 32 --train-steps 10 --train-e2e-steps 0 --train-overrides train.fsdp=true \
        --train-profile "$WORK/results/profile_fsdp" --train-profile-trace-mb "${TRAIN_TRACE_MB:-5}" ${FSDP_ARGS:-}
fi
# the real trainer end to end on the GPU (data loader, compile, checkpoint, teacher export) on the bundled sample
stage train_smoke 90 python3 -m celldino train --config-file demo --output-dir "$WORK/train_smoke" \
    "train.dataset_path=CSV:path=$PWD/data/sample/stain_task/stain_task.csv" train.stop_after_iters=30 train.num_workers=4
cp "$WORK/train_smoke/training_metrics.json" "$WORK/results/train_smoke_metrics.json" 2>/dev/null; pack
stage bench_augment ${AUGMENT_LIMIT:-40} "${BENCH[@]}" augment ${AUGMENT_ARGS:-}
stage bench_knn 60 "${BENCH[@]}" knn ${KNN_ARGS:-}
stage bench_optim 40 "${BENCH[@]}" optim
stage bench_data ${DATA_LIMIT:-30} "${BENCH[@]}" data ${DATA_ARGS:-}

echo "### summary"; cat "$WORK/summary"; ls -l "$WORK/results"
pack
