#!/usr/bin/env bash
# gpu-check.sh: does Strata work on an NVIDIA GPU? Builds against a CUDA LibTorch, then on
# --device cuda runs the stories260K golden tests (forward, KV-cached greedy decode, bf16), a 2-task
# `strata bench cl` (training in float32 and in bf16, the merge, checkpoint-free evaluation) and
# strata-bench-decode, and prints a summary. Target: under 10 minutes on one GPU.
#
# usage: scripts/gpu-check.sh LIBTORCH_PREFIX [BUILD_DIR]
#   LIBTORCH_PREFIX  a CUDA LibTorch: the unzipped libtorch/ directory (the cxx11-ABI build from
#                    pytorch.org), or a pip-installed CUDA torch's
#                    $(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
#   BUILD_DIR        default build-cuda (kept between runs: a second run only re-links)
# Environment: GPU_CHECK_STEPS (optimizer steps per cl stage, default 60), GPU_CHECK_JOBS (build
# jobs, default nproc), GPU_CHECK_OUT (result directory, default BUILD_DIR/gpu-check).
#
# The C++ ABI must match Debian's libraries (gRPC, absl, protobuf are built with
# _GLIBCXX_USE_CXX11_ABI=1): pip wheels of torch < 2.7 and the "pre-cxx11" LibTorch zips use ABI 0
# and fail to link (or crash) against them; the script refuses them before building.
# Exit codes: 0 every check passed; 1 a check failed; 2 bad usage or environment.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PREFIX=$(realpath "$1")
BUILD_DIR=${2:-build-cuda}
STEPS=${GPU_CHECK_STEPS:-60}
JOBS=${GPU_CHECK_JOBS:-$(nproc)}
OUT=${GPU_CHECK_OUT:-$BUILD_DIR/gpu-check}
SHARED=$REPO/../shared
START=$(date +%s)

die() { echo "[gpu-check] $*" >&2; exit 2; }
log() { echo "[gpu-check] $(date +%H:%M:%S) $*"; }

# ---- environment ------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >/dev/null ||
  die "nvidia-smi cannot reach a GPU"
[[ -d $SHARED/models/stories260K && -d $SHARED/data/cl-small ]] ||
  die "../shared (models/stories260K, data/cl-small) must sit beside the checkout"
TORCH_CONFIG=$(find "$PREFIX" -maxdepth 4 -name TorchConfig.cmake -print -quit 2>/dev/null)
[[ -n $TORCH_CONFIG ]] || die "no TorchConfig.cmake under $PREFIX (pass the libtorch/ directory or torch.utils.cmake_prefix_path)"
TORCH_ROOT=$(dirname "$(dirname "$(dirname "$(dirname "$TORCH_CONFIG")")")")
# The ABI LibTorch was built with: TorchConfig.cmake sets TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=N".
ABI=$(grep -ho '_GLIBCXX_USE_CXX11_ABI=[01]' "$TORCH_CONFIG" "$(dirname "$TORCH_CONFIG")"/*.cmake 2>/dev/null | head -1)
if [[ $ABI == "_GLIBCXX_USE_CXX11_ABI=0" ]]; then
  die "$TORCH_ROOT is built with the pre-C++11 ABI (_GLIBCXX_USE_CXX11_ABI=0); Debian's gRPC/absl/protobuf use the
C++11 ABI. Use the cxx11-ABI LibTorch zip (libtorch-cxx11-abi-shared-with-deps-<version>+cu<xx>.zip) or torch >= 2.7."
fi
ls "$TORCH_ROOT"/lib/libtorch_cuda.so >/dev/null 2>&1 || die "$TORCH_ROOT has no lib/libtorch_cuda.so: not a CUDA build"
# find_package(Torch) of a CUDA LibTorch looks for the CUDA toolkit (nvcc, cudart headers).
command -v nvcc >/dev/null || [[ -n ${CUDAToolkit_ROOT:-} ]] ||
  die "no nvcc on PATH: install the CUDA toolkit matching $TORCH_ROOT (or set CUDAToolkit_ROOT)"
mkdir -p "$OUT" || die "cannot create $OUT"
log "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
log "LibTorch: $TORCH_ROOT (${ABI:-ABI flag not found}); build: $BUILD_DIR; results: $OUT"

# GPU memory: the highest memory.used seen while the checks run (sampled every second).
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 1000 >"$OUT/gpu_memory.log" 2>/dev/null &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null' EXIT

declare -a NAMES=() RESULTS=() SECONDS_TAKEN=()
# run NAME TIMEOUT CMD...: runs a check with a time limit, logs to $OUT/NAME.log, records the result.
run() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  log "$name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  NAMES+=("$name")
  SECONDS_TAKEN+=("$(($(date +%s) - t0))")
  if [[ $rc -eq 0 ]]; then
    RESULTS+=("ok")
  elif [[ $rc -eq 124 ]]; then
    RESULTS+=("TIMEOUT after ${limit}s")
  else
    RESULTS+=("FAILED (exit $rc)")
  fi
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}

# ---- build ------------------------------------------------------------------------------------
if ! run configure 300 cmake -S "$REPO" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_ROOT" -DCMAKE_CUDA_ARCHITECTURES=native; then
  log "configure failed: see $OUT/configure.log"
fi
run build 900 cmake --build "$BUILD_DIR" -j "$JOBS" --target strata_model_tests strata-bench strata-bench-decode
BIN=$BUILD_DIR

# ---- checks on the GPU ------------------------------------------------------------------------
export OMP_WAIT_POLICY=PASSIVE
if [[ -x $BIN/core/model/strata_model_tests ]]; then
  STRATA_TEST_DEVICE=cuda run golden 300 "$BIN/core/model/strata_model_tests" \
    --gtest_filter='GoldenTest.*:GenerateGoldenTest.*' --gtest_color=no
  # The bench below loads with ResolveDevice: fail early if LibTorch sees no GPU.
  STRATA_TEST_DEVICE=cuda run device 60 "$BIN/core/model/strata_model_tests" \
    --gtest_filter='*ResolveDevice*' --gtest_color=no
fi
if [[ -x $BIN/bench/strata-bench ]]; then
  for dtype in float32 bfloat16; do
    run "cl_$dtype" 420 "$BIN/bench/strata-bench" cl --model "$SHARED/models/stories260K" \
      --tasks "$SHARED/data/cl-small" --order capitals,iso3 --methods share_ella --steps "$STEPS" \
      --device cuda --dtype "$dtype" --threads 4 --quiet --json "$OUT/cl_$dtype.json"
  done
  run memory_plan 60 "$BIN/bench/strata-bench" memory --config llama-8b --dtype bfloat16 --device cuda \
    --methods share_ella,seq_lora,seq_ft --json "$OUT/memory_llama8b.json"
fi
if [[ -x $BIN/bench/strata-bench-decode ]]; then
  run decode_float32 300 "$BIN/bench/strata-bench-decode" --device cuda --dtype float32 --models stories260K,110m --reps 3
  run decode_bfloat16 300 "$BIN/bench/strata-bench-decode" --device cuda --dtype bfloat16 --models stories260K,110m --reps 3
fi

# ---- summary ----------------------------------------------------------------------------------
kill "$SAMPLER" 2>/dev/null
PEAK=$(sort -n "$OUT/gpu_memory.log" 2>/dev/null | tail -1)
echo
echo "==== gpu-check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START)) s) ===="
echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); peak memory.used ${PEAK:-?} MiB"
echo "LibTorch: $TORCH_ROOT"
FAILED=0
for i in "${!NAMES[@]}"; do
  printf '  %-16s %-22s %5ss\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}"
  [[ ${RESULTS[$i]} == ok ]] || FAILED=1
done
for dtype in float32 bfloat16; do
  f=$OUT/cl_$dtype.log
  [[ -f $f ]] || continue
  echo "-- bench cl ($dtype): accuracy matrix and timings"
  grep -E '^\[share_ella\] .* steps, loss|^Summary|^method |^share_ella |state ' "$f" | head -12 | sed 's/^/  /'
done
for dtype in float32 bfloat16; do
  f=$OUT/decode_$dtype.log
  [[ -f $f ]] || continue
  echo "-- decode ($dtype)"
  grep -E '^==|^batch' "$f" | sed 's/^/  /'
done
[[ -f $OUT/golden.log ]] && grep -E '^\[  (PASSED|FAILED) ' "$OUT/golden.log" | sed 's/^/  golden: /'
echo "logs and JSON: $OUT"
exit $FAILED
