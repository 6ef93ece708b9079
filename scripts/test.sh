#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs dependencies and builds (scripts/setup.sh,
# idempotent), then runs every test binary with ctest. Extra arguments go to ctest (e.g. -R model).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-$PWD/build}
scripts/setup.sh
# OpenMP workers sleep instead of spinning while they wait: training and serving share the cores
# (spinning made decode 1.2-55x slower under load; docs/benchmarks.md). Set it to override.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [[ ! -d ../shared/models ]]; then
  echo "[test] ../shared (models, tokenizers, data) must sit beside the checkout" >&2
  exit 1
fi
echo "[test] running ctest in $BUILD_DIR"
# One test binary at a time: each torch test uses both cores, and OpenMP threads of two
# concurrent torch processes spin against each other.
exec ctest --test-dir "$BUILD_DIR" --output-on-failure -j1 "$@"
