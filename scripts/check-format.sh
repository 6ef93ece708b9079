#!/usr/bin/env bash
# Checks that every C++ file git tracks is formatted as .clang-format says (clang-format from
# Debian 12, version 14). Prints the files that differ and exits 1; `--fix` rewrites them.
#
#   scripts/check-format.sh          check (CI runs this)
#   scripts/check-format.sh --fix    format in place
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG_FORMAT=${CLANG_FORMAT:-clang-format}
if ! command -v "$CLANG_FORMAT" >/dev/null; then
  echo "[format] $CLANG_FORMAT not found (Debian: apt-get install clang-format)" >&2
  exit 2
fi
mapfile -t files < <(git ls-files '*.cc' '*.h' | grep -v '^third_party/')
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
