#!/usr/bin/env bash
# Installs Strata's build dependencies from Debian 12 packages (idempotent) and builds in Release.
#
#   scripts/setup.sh            install what is missing, then configure + build into build/
#   scripts/setup.sh --deps     only install packages
#   scripts/setup.sh --build    only configure + build
#
# Environment: BUILD_DIR (default build), STRATA_JOBS (default nproc), CMAKE_PREFIX_PATH (an official
# LibTorch, e.g. a CUDA build, is picked up from there instead of Debian's libtorch-dev).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build}
JOBS=${STRATA_JOBS:-$(nproc)}
MODE=${1:-all}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# The python3-* packages after python3-yaml serve clients/python (strata_client) and its test:
# Debian's gRPC and protobuf for Python, a venv that sees them, and pip/setuptools/wheel to install
# the client offline (no build isolation).
PACKAGES=(
  cmake ninja-build g++ pkg-config ccache
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libssl-dev libtorch-dev prometheus-cpp-dev libspdlog-dev libgtest-dev libgmock-dev
  nlohmann-json3-dev libcpp-httplib-dev libpcre2-dev libcli11-dev libicu-dev libopenblas0-openmp libjemalloc-dev libgloo-dev
  curl prometheus gnuplot-nox python3-yaml
  python3-grpcio python3-protobuf python3-venv python3-pip python3-setuptools python3-wheel
)

install_deps() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]} == 0)); then
    say "all ${#PACKAGES[@]} packages already installed"
  else
    local SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
    say "installing ${#missing[@]} missing packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "packages installed"
  fi
  # Debian's LibTorch links libblas.so.3; unless OpenBLAS (OpenMP build) is the active alternative,
  # GEMM runs on the reference BLAS (~3 GFLOP/s instead of ~120).
  local blas
  blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
  if [[ "$blas" != *openblas-openmp* ]]; then
    local alt
    alt=$(update-alternatives --list libblas.so.3-x86_64-linux-gnu 2>/dev/null | grep openblas-openmp | head -1 || true)
    if [[ -n "$alt" ]]; then
      say "selecting OpenBLAS (OpenMP) as libblas.so.3"
      ${SUDO:-} update-alternatives --set libblas.so.3-x86_64-linux-gnu "$alt" >/dev/null
      lalt=$(update-alternatives --list liblapack.so.3-x86_64-linux-gnu 2>/dev/null | grep openblas-openmp | head -1 || true)
      [[ -n "$lalt" ]] && ${SUDO:-} update-alternatives --set liblapack.so.3-x86_64-linux-gnu "$lalt" >/dev/null
      blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3)
    fi
  fi
  say "active BLAS: ${blas:-unknown}"
  if [[ "$blas" != *openblas-openmp* ]]; then
    say "WARNING: OpenBLAS (OpenMP) is not the active BLAS; training will be ~40x slower"
  fi
}

build() {
  export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
  export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
  # Relative paths in the cache key: a fresh clone elsewhere (CI) reuses this machine's cache.
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$ROOT}
  say "configuring Release build in $BUILD_DIR (ccache: $(command -v ccache || echo none))"
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  say "building with $JOBS jobs (first build takes several minutes; ccache makes rebuilds fast)"
  local t0=$SECONDS
  cmake --build "$BUILD_DIR" -j "$JOBS"
  say "build done in $((SECONDS - t0)) s: $BUILD_DIR/strata-server, $BUILD_DIR/strata"
}

case "$MODE" in
  all) install_deps; build ;;
  --deps) install_deps ;;
  --build) build ;;
  *) echo "usage: scripts/setup.sh [--deps|--build]" >&2; exit 2 ;;
esac
