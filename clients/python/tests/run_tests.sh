#!/usr/bin/env bash
# Installs strata_client into a fresh virtual environment the way the README says (offline: a venv
# that sees Debian's grpcio/protobuf, pip without build isolation and without any index), then runs
# its tests against a real strata-server on 127.0.0.1 (tests/test_live_server.py).
#
#   bash clients/python/tests/run_tests.sh BUILD_DIR SHARED_DIR
#
# STRATA_PYTHON: the interpreter whose packages hold grpcio and protobuf (default /usr/bin/python3,
# Debian's, which python3-grpcio and python3-protobuf install into).
set -euo pipefail
BUILD=$(cd "${1:?build dir}" && pwd)
SHARED=$(cd "${2:?shared dir}" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
PYTHON=${STRATA_PYTHON:-/usr/bin/python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! "$PYTHON" -c 'import grpc, google.protobuf, setuptools, venv' 2>"$TMP/import.err"; then
  echo "[python_client] $PYTHON lacks grpcio/protobuf/setuptools/venv:" >&2
  cat "$TMP/import.err" >&2
  echo "[python_client] install them: scripts/setup.sh --deps (python3-grpcio python3-protobuf python3-venv python3-pip)" >&2
  exit 1
fi

# A clean copy of the package beside the protos, as in a fresh checkout: nothing generated before
# (stubs, build/, egg-info) can hide a build that does not generate them, and the checkout stays
# untouched.
mkdir -p "$TMP/src/clients"
tar -C "$ROOT" --exclude=build --exclude='*.egg-info' --exclude=_proto --exclude=__pycache__ \
  -cf - clients/python proto | tar -C "$TMP/src" -xf -

start=$SECONDS
"$PYTHON" -m venv --system-site-packages "$TMP/venv"
# --no-index and no pip configuration (find-links, a local index): any download fails the test;
# --no-build-isolation: build with the setuptools already installed instead of fetching one.
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
  "$TMP/venv/bin/pip" install --quiet --no-index --no-build-isolation --disable-pip-version-check \
  "$TMP/src/clients/python"
echo "[python_client] installed into a fresh venv offline in $((SECONDS - start)) s"
"$TMP/venv/bin/pip" show --disable-pip-version-check strata-client | sed -n '1,2p'

# Run from an empty directory so that only the installed copy can be imported.
cd "$TMP"
STRATA_SERVER_BIN="$BUILD/server/strata-server" STRATA_SHARED_DIR="$SHARED" \
  STRATA_EXPECT_INSTALLED="$TMP/venv/" \
  "$TMP/venv/bin/python" "$ROOT/clients/python/tests/test_live_server.py"
