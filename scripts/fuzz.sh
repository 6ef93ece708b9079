#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang + ASan + UBSan, torch-free) and runs each for SECONDS.
#
#   scripts/fuzz.sh [SECONDS]        default 60 s per target; exit 1 if any target crashed
#
# Environment: FUZZ_BUILD_DIR (default build-fuzz), FUZZ_RUNS (stop a target after this many
# executions; default: no cap), FUZZ_TARGETS (space-separated subset), FUZZ_JOBS (targets run at
# once, default 1), STRATA_SHARED_DIR (default ../shared: the seed corpora are derived from it at
# run time). Corpora grow in $FUZZ_BUILD_DIR/corpus/<target>; crash inputs land in
# $FUZZ_BUILD_DIR/artifacts/<target>/ (reproduce: $FUZZ_BUILD_DIR/<target> <file>).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_TARGET=${1:-60}
BUILD=${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}
SHARED=$(cd "${STRATA_SHARED_DIR:-$ROOT/../shared}" && pwd)
export STRATA_SHARED_DIR=$SHARED
ALL_TARGETS="fuzz_jsonl fuzz_safetensors_header fuzz_model_config fuzz_tokenizer_load fuzz_tokenizer_encode
fuzz_peft_config fuzz_job_json fuzz_submit_task"
TARGETS=${FUZZ_TARGETS:-$ALL_TARGETS}
say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*"; }

CXX_BIN=$(command -v clang++-14 || command -v clang++ || true)
if [[ -z "$CXX_BIN" || ! -e /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a ]]; then
  say "installing clang-14 and libclang-rt-14-dev (libFuzzer, ASan, UBSan runtimes)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends clang-14 libclang-rt-14-dev >/dev/null
  CXX_BIN=$(command -v clang++-14)
fi

export CCACHE_BASEDIR=$ROOT CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
if [[ ! -f $BUILD/build.ninja ]]; then
  cmake -S fuzz -B "$BUILD" -G Ninja -DCMAKE_CXX_COMPILER="$CXX_BIN" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
say "building $(echo $TARGETS | wc -w) targets in $BUILD"
# shellcheck disable=SC2086
cmake --build "$BUILD" -j "${STRATA_JOBS:-2}" --target $TARGETS

python3 fuzz/make_seeds.py "$SHARED" "$BUILD/seeds"
declare -A MAX_LEN=([fuzz_tokenizer_load]=65536 [fuzz_jsonl]=8192 [fuzz_submit_task]=8192)
RUNS_ARG=(); [[ -n "${FUZZ_RUNS:-}" ]] && RUNS_ARG=(-runs="$FUZZ_RUNS")
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

run_one() {
  local t=$1
  mkdir -p "$BUILD/corpus/$t" "$BUILD/artifacts/$t"
  local rc=0
  "$BUILD/$t" "$BUILD/corpus/$t" "$BUILD/seeds/$t" -max_total_time="$SECONDS_PER_TARGET" "${RUNS_ARG[@]}" \
    -max_len="${MAX_LEN[$t]:-4096}" -rss_limit_mb=2560 -timeout=20 -print_final_stats=1 \
    -artifact_prefix="$BUILD/artifacts/$t/" >"$BUILD/$t.log" 2>&1 || rc=$?
  echo $rc >"$BUILD/$t.rc"
}

say "running each target for ${SECONDS_PER_TARGET} s${FUZZ_RUNS:+ or $FUZZ_RUNS executions} (logs: $BUILD/<target>.log)"
running=0
for t in $TARGETS; do
  run_one "$t" &
  running=$((running + 1))
  if ((running >= ${FUZZ_JOBS:-1})); then wait -n || true; running=$((running - 1)); fi
done
wait || true

failed=0
printf '%-26s %12s %10s %8s %7s\n' target executions exec/s seconds crashes
for t in $TARGETS; do
  log=$BUILD/$t.log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  # crash-, leak-, timeout- and oom- inputs fail the run; slow-unit- files (an input that took
  # over 10 s, e.g. while the machine was busy) are only reported.
  crashes=$(find "$BUILD/artifacts/$t" -type f ! -name 'slow-unit-*' | wc -l)
  slow=$(find "$BUILD/artifacts/$t" -type f -name 'slow-unit-*' | wc -l)
  rc=$(cat "$BUILD/$t.rc" 2>/dev/null || echo '?')
  if [[ "$rc" != 0 || "$crashes" != 0 ]]; then failed=1; fi
  printf '%-26s %12s %10s %8s %7s%s%s\n' "$t" "${execs:-?}" "${rate:-?}" "${secs:-?}" "$crashes" \
    "$([[ "$rc" != 0 ]] && echo "  (exit $rc: see $log)")" "$([[ "$slow" != 0 ]] && echo "  ($slow slow unit(s))")"
done
exit $failed
