#!/usr/bin/env bash
# Runs a real strata-server (stories260K) on 127.0.0.1, learns two tiny tasks through the CLI,
# scrapes /metrics while a third job trains (the training gauges exist only then) and runs
# deploy_files_test.sh with that scrape and the build tree: every metric the Grafana dashboard and
# the alert rules use must be exported by the running server.
#
#   bash tests/deploy/scrape_and_check.sh BUILD_DIR SHARED_DIR
set -uo pipefail
BUILD=${1:?build dir}
SHARED=${2:?shared dir}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TMP=$(mktemp -d)
trap 'kill -9 $SERVER 2>/dev/null; rm -rf "$TMP"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=$(free_port); METRICS=$(free_port)
"$BUILD/server/strata-server" --model="$SHARED/models/stories260K" --state_dir="$TMP/state" \
  --grpc_port="$GRPC" --metrics_port="$METRICS" --http_port=0 --threads=2 \
  --reference_text="$SHARED/data/lm/tinystories_val.txt" >"$TMP/server.log" 2>&1 &
SERVER=$!
CLI=("$BUILD/client/strata" --server "127.0.0.1:$GRPC")
for _ in $(seq 1 120); do "${CLI[@]}" health --timeout 1 >/dev/null 2>&1 && break; sleep 0.5; done
for task in capitals langid; do
  head -n 40 "$SHARED/data/cl-small/$task/train.jsonl" >"$TMP/$task.jsonl"
  head -n 16 "$SHARED/data/cl-small/$task/test.jsonl" >"$TMP/$task-eval.jsonl"
  if ! "${CLI[@]}" submit --task "$task" "$TMP/$task.jsonl" --eval "$TMP/$task-eval.jsonl" --steps 4 --wait \
      >"$TMP/$task.out" 2>&1; then
    echo "submit $task failed:"; cat "$TMP/$task.out"; tail -20 "$TMP/server.log"; exit 1
  fi
done
"${CLI[@]}" generate --prompt "Once upon a time" --max-tokens 4 >/dev/null
head -n 40 "$SHARED/data/cl-small/iso3/train.jsonl" >"$TMP/iso3.jsonl"
"${CLI[@]}" submit --task iso3 "$TMP/iso3.jsonl" --steps 100000 >"$TMP/iso3.id" 2>"$TMP/iso3.err" \
  || { echo "submit iso3 failed:"; cat "$TMP/iso3.err"; exit 1; }
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$METRICS/metrics" >"$TMP/metrics.txt" || { echo "scrape failed"; exit 1; }
  grep -q '^strata_training_loss ' "$TMP/metrics.txt" && break
  sleep 0.5
done
"${CLI[@]}" cancel "$(cat "$TMP/iso3.id")" >/dev/null || echo "cancel failed (the server is killed anyway)"
bash "$ROOT/tests/deploy/deploy_files_test.sh" --metrics-file "$TMP/metrics.txt" --build-dir "$BUILD"
