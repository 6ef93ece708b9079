#!/usr/bin/env bash
# Starts strata-server on 127.0.0.1 (embedded default model unless --model=DIR is given), after
# installing dependencies and building when needed (scripts/setup.sh, idempotent).
# Extra arguments go to strata-server, e.g. scripts/serve.sh --model=../shared/models/stories260K
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-$PWD/build}
scripts/setup.sh >&2
exec "$BUILD_DIR/server/strata-server" "$@"
