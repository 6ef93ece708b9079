#!/usr/bin/env bash
# Prints the distribution packages that provide the shared libraries the given ELF binaries load,
# one per line, sorted and unique (Debian/Ubuntu: ldd + dpkg -S).
#
#   deploy/docker/runtime-packages.sh [--direct] [--exclude PREFIX]... BINARY...
#
#   --direct          only the binaries' own DT_NEEDED libraries (what a runtime image must install
#                     explicitly; apt pulls in the rest as dependencies). Default: every library
#                     ldd resolves, transitively.
#   --exclude PREFIX  leave out libraries whose path starts with PREFIX (e.g. /opt/libtorch, where an
#                     official LibTorch bundles its own CUDA libraries, or /usr/local/cuda).
#
# Libraries ldd cannot resolve (e.g. libcuda.so.1, which the NVIDIA container runtime injects) and
# libraries no package owns are reported on stderr and left out. Used by the Dockerfile's CUDA
# variant and by tests/deploy/deploy_files_test.sh (--build-dir) to check the CPU image's list.
set -euo pipefail

direct=0
excludes=()
bins=()
while (($#)); do
  case "$1" in
    --direct) direct=1 ;;
    --exclude) excludes+=("$2"); shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) bins+=("$1") ;;
  esac
  shift
done
((${#bins[@]})) || { echo "usage: $0 [--direct] [--exclude PREFIX]... BINARY..." >&2; exit 2; }

# /lib/x <-> /usr/lib/x: with merged /usr, dpkg may have registered either spelling.
other_spelling() {
  case "$1" in
    /usr/*) echo "${1#/usr}" ;;
    *) echo "/usr$1" ;;
  esac
}

# 1. The libraries: one "path<TAB>candidate spelling" line per way dpkg may know each of them.
candidates=$(
  for bin in "${bins[@]}"; do
    [[ -f "$bin" ]] || { echo "runtime-packages: no such file: $bin" >&2; exit 2; }
    needed=""
    if ((direct)); then
      needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    fi
    ldd "$bin" | while read -r soname arrow path _; do
      if [[ "$arrow" != "=>" ]]; then continue; fi
      if ((direct)) && ! grep -qxF "$soname" <<<"$needed"; then continue; fi
      if [[ "$path" == "not" ]]; then
        echo "runtime-packages: $bin: $soname not found (left out)" >&2
        continue
      fi
      real=$(readlink -f "$path")
      skip=0
      for prefix in "${excludes[@]+"${excludes[@]}"}"; do
        if [[ "$path" == "$prefix"* || "$real" == "$prefix"* ]]; then skip=1; fi
      done
      ((skip)) && continue
      for c in "$path" "$(other_spelling "$path")" "$real" "$(other_spelling "$real")"; do
        printf '%s\t%s\n' "$path" "$c"
      done
    done
  done
)
[[ -n "$candidates" ]] || exit 0

# 2. One pass over dpkg's file lists (dpkg-query -S per library takes minutes for LibTorch's ~250).
awk -F'\t' '
  FNR == NR { want[$2] = 1; order[++n] = $1 SUBSEP $2; next }
  ($0 in want) && !($0 in owner) {
    pkg = FILENAME; sub(/.*\//, "", pkg); sub(/\.list$/, "", pkg); sub(/:.*/, "", pkg)
    owner[$0] = pkg
  }
  END {
    for (i = 1; i <= n; i++) {
      split(order[i], kv, SUBSEP)
      if (kv[1] in done) continue
      if (kv[2] in owner) { done[kv[1]] = 1; print owner[kv[2]] }
    }
    for (i = 1; i <= n; i++) {
      split(order[i], kv, SUBSEP)
      if (!(kv[1] in done)) { done[kv[1]] = 1; print "runtime-packages: " kv[1] " belongs to no package (left out)" > "/dev/stderr" }
    }
  }' <(printf '%s\n' "$candidates") /var/lib/dpkg/info/*.list | sort -u
