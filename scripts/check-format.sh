#!/usr/bin/env bash
# Checks that every C++ file git tracks is formatted as .clang-format says (clang-format from
# Debian 12, version 14; installed with apt-get when missing). Prints the files that differ and
# exits 1; `--fix` rewrites them.
#
#   scripts/check-format.sh          check (CI runs this)
#   scripts/check-format.sh --fix    format in place
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG_FORMAT=${CLANG_FORMAT:-clang-format}
if ! command -v "$CLANG_FORMAT" >/dev/null; then
  echo "[format] installing clang-format (Debian 12: version 14)"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends clang-format >/dev/null
fi
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files '*.cc' '*.h')
else  # an exported tree without .git: the source folders
  mapfile -t files < <(find bench client core fuzz proto scripts server tests -name '*.cc' -o -name '*.h' | sort)
fi
if [[ "${1:-}" == "--fix" ]]; then
  "$CLANG_FORMAT" -i --style=file "${files[@]}"
  echo "[format] formatted ${#files[@]} files"
  exit 0
fi
bad=()
for f in "${files[@]}"; do
  if ! "$CLANG_FORMAT" --style=file --dry-run -Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if ((${#bad[@]})); then
  echo "[format] ${#bad[@]} of ${#files[@]} files differ from .clang-format (scripts/check-format.sh --fix):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "[format] ${#files[@]} files match .clang-format ($("$CLANG_FORMAT" --version | head -1))"
