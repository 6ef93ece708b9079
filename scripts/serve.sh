#!/usr/bin/env bash
# Starts strata-server on 127.0.0.1 (embedded default model unless --model=DIR is given), after
# installing dependencies and building when needed (scripts/setup.sh, idempotent).
# Extra arguments go to strata-server, e.g. scripts/serve.sh --model=../shared/models/stories260K
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-$PWD/build}
scripts/setup.sh >&2
# OpenMP workers sleep instead of spinning while they wait: training and serving share the cores
# (spinning made decode 1.2-55x slower under load; docs/benchmarks.md). Set it to override.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$BUILD_DIR/server/strata-server" "$@"
