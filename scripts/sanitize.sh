#!/usr/bin/env bash
# Builds and runs the tests under sanitizers, each in its own build directory (g++, like the
# normal build, so the test binaries link Debian's LibTorch as usual; jemalloc off):
#
#   scripts/sanitize.sh [asan|tsan|all]      default all
#
#   asan  AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer): build-asan/, the test
#         binaries in ASAN_TESTS (default: every unit-test binary, plus the integration tests and
#         the deploy check when ASAN_TESTS=all)
#   tsan  ThreadSanitizer on the concurrency tests: build-tsan/, TSAN_TESTS (default: the job store
#         and worker, the engine's publish/route, the server's services)
#
# Each report is fatal (halt_on_error); known noise from uninstrumented libraries is suppressed by
# the files in scripts/sanitizers/, each entry with the reason. STRATA_JOBS (default 2) compile jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-all}
JOBS=${STRATA_JOBS:-2}
SUPP=$ROOT/scripts/sanitizers
say() { printf '\033[1m[sanitize]\033[0m %s\n' "$*"; }
export CCACHE_BASEDIR=$ROOT CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
export OMP_WAIT_POLICY=PASSIVE

UNIT_TESTS="strata_jobs_tests strata_data_tests strata_tokenizer_tests strata_eval_tests strata_checkpoint_tests
strata_model_tests strata_scoring_tests strata_adapt_tests strata_state_tests strata_server_tests strata_bench_tests"
CONCURRENCY_TESTS="strata_jobs_tests strata_state_tests strata_server_tests"

configure() {  # dir flags [cmake args...]
  local dir=$1 flags=$2
  shift 2
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSTRATA_JEMALLOC=OFF -DSTRATA_PCH=ON "$@" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_EXE_LINKER_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" >/dev/null
}

run_tests() {  # dir tests...
  local dir=$1; shift
  local failed=0
  for t in "$@"; do
    local bin
    bin=$(find "$dir" -name "$t" -type f -perm -u+x | head -1)
    if [[ "$t" == deploy_files ]]; then
      ctest --test-dir "$dir" -R '^deploy_files$' --output-on-failure >"$dir/$t.log" 2>&1 || failed=1
    else
      local start=$SECONDS
      if OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$bin" --gtest_brief=1 >"$dir/$t.log" 2>&1; then
        say "  $t: passed ($((SECONDS - start)) s)"
      else
        say "  $t: FAILED ($((SECONDS - start)) s; $dir/$t.log)"; failed=1
        grep -m5 -E "ERROR: (Address|Leak|Thread)Sanitizer|runtime error:|WARNING: ThreadSanitizer" "$dir/$t.log" || true
      fi
    fi
  done
  return $failed
}

status=0
if [[ $MODE == asan || $MODE == all ]]; then
  tests=${ASAN_TESTS:-$UNIT_TESTS}
  [[ $tests == all ]] && tests="$UNIT_TESTS strata_integration_tests"
  configure build-asan "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  say "ASan + UBSan: building $(echo $tests | wc -w) test binaries in build-asan"
  # shellcheck disable=SC2086
  cmake --build build-asan -j "$JOBS" --target $tests $([[ $tests == *integration* ]] && echo strata-server strata)
  export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:suppressions=$SUPP/asan.supp"
  export LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:suppressions=$SUPP/ubsan.supp"
  # shellcheck disable=SC2086
  run_tests build-asan $tests || status=1
fi
if [[ $MODE == tsan || $MODE == all ]]; then
  tests=${TSAN_TESTS:-$CONCURRENCY_TESTS}
  configure build-tsan "-fsanitize=thread -fno-omit-frame-pointer" -DSTRATA_TSAN_ABSL_SHIM=ON -DSTRATA_ONE_TORCH_THREAD=ON
  say "TSan: building $(echo $tests | wc -w) test binaries in build-tsan"
  # shellcheck disable=SC2086
  cmake --build build-tsan -j "$JOBS" --target $tests
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$SUPP/tsan.supp"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} run_tests build-tsan $tests || status=1
fi
exit $status
