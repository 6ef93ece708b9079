#!/usr/bin/env bash
# Soak test (bounded, 127.0.0.1 only) of a built strata-server with ../shared/models/stories260K:
# >= KILLS random kill -9 (half while a checkpoint is being written, half while a job trains), then
# a DURATION-second mixed load (16 Generate streams, submissions, cancels, /metrics scrapes), then
# checks that every accepted job id finished (or failed with a reason), that the state loads after a
# restart, and that RSS stayed bounded. Prints a JSON summary; exit 1 on any violation.
#
#   scripts/soak.sh [KILLS] [DURATION]        defaults 20 and 600 (about 20 minutes in all)
#
# Environment: BUILD_DIR (default build), STRATA_SHARED_DIR (default ../shared), SOAK_DIR (work
# directory, default a fresh mktemp -d; kept for inspection: server.log, state/).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-$PWD/build}
SHARED=${STRATA_SHARED_DIR:-$PWD/../shared}
WORK=${SOAK_DIR:-$(mktemp -d /tmp/strata-soak.XXXXXX)}
for bin in server/strata-server client/strata; do
  [[ -x $BUILD_DIR/$bin ]] || { echo "soak: $BUILD_DIR/$bin is not built (scripts/setup.sh --build)" >&2; exit 2; }
done
echo "[soak] work directory $WORK" >&2
exec python3 scripts/soak.py --build "$BUILD_DIR" --shared "$SHARED" --work "$WORK" \
  --kills "${1:-20}" --duration "${2:-600}"
