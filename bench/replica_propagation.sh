#!/usr/bin/env bash
# Replica propagation: how long after the trainer serves a new weights version every replica
# serves it. Starts one trainer and N replicas (strata-server --role=replica) on 127.0.0.1 with
# stories260K, teaches the trainer K small cl-small tasks one after another, and reads from each
# replica's log the line it writes after every swap:
#   replica: synced version V from the trainer in X s (Y s after the trainer served it)
# X = download + SHA-256 checks + engine build + swap; Y = the trainer's start of serving V (its
# announce timestamp; same machine, same clock) to the replica serving V. Prints, per version, Y of
# every replica and their maximum (publish -> all replicas serving), and the state size sent.
#
#   bench/replica_propagation.sh [--build DIR] [--shared DIR] [--replicas N] [--steps S] [--tasks "a b c"]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
SHARED=$ROOT/../shared
REPLICAS=2
STEPS=8
TASKS="capitals iso3 langid domains"
while (($#)); do
  case "$1" in
    --build) BUILD=$2; shift ;;
    --shared) SHARED=$2; shift ;;
    --replicas) REPLICAS=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --tasks) TASKS=$2; shift ;;
    *) echo "replica_propagation: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
SERVER=$BUILD/server/strata-server
CLI=$BUILD/client/strata
MODEL=$SHARED/models/stories260K
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
[[ -n "${KEEP_LOGS:-}" ]] && trap "for p in \"\${PIDS[@]}\"; do kill \$p 2>/dev/null; done; echo logs: $WORK" EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start() {  # start NAME PORT FLAGS...
  local name=$1 port=$2
  shift 2
  "$SERVER" --grpc_port="$port" --metrics_port=0 --http_port=0 --state_dir="$WORK/$name" --model="$MODEL" \
    --threads=2 --serving_threads=1 "$@" > "$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}
wait_serving() {  # wait_serving PORT
  for _ in $(seq 600); do
    [[ $("$CLI" --server "127.0.0.1:$1" --timeout 1 health 2> /dev/null) == SERVING ]] && return 0
    sleep 0.1
  done
  echo "replica_propagation: server on port $1 never became ready" >&2
  return 1
}
version() { "$CLI" --server "127.0.0.1:$1" --json info | python3 -c 'import json,sys; print(json.load(sys.stdin)["weights_version"])'; }

TRAINER_PORT=$(free_port)
start trainer "$TRAINER_PORT" --keep_versions=100  # every version's files stay to be measured
wait_serving "$TRAINER_PORT"
REPLICA_PORTS=()
for i in $(seq "$REPLICAS"); do
  p=$(free_port)
  REPLICA_PORTS+=("$p")
  start "replica$i" "$p" --role=replica --follow="127.0.0.1:$TRAINER_PORT"
done
for p in "${REPLICA_PORTS[@]}"; do wait_serving "$p"; done

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "trainer 127.0.0.1:$TRAINER_PORT, $REPLICAS replicas, stories260K, --steps $STEPS per task"
for task in $TASKS; do
  head -n 16 "$SHARED/data/cl-small/$task/test.jsonl" > "$WORK/$task-eval.jsonl"
  "$CLI" --server "127.0.0.1:$TRAINER_PORT" submit --task "$task" "$SHARED/data/cl-small/$task/train.jsonl" \
    --eval "$WORK/$task-eval.jsonl" --steps "$STEPS" --batch-size 8 --wait > /dev/null 2> "$WORK/submit.err" ||
    { cat "$WORK/submit.err" >&2; exit 1; }
  want=$(version "$TRAINER_PORT")
  for p in "${REPLICA_PORTS[@]}"; do
    for _ in $(seq 600); do [[ $(version "$p") == "$want" ]] && break; sleep 0.1; done
  done
done

printf '\n| version | state sent (bytes) |'
for i in $(seq "$REPLICAS"); do printf ' replica %d: served after (s) | download+swap (s) |' "$i"; done
printf ' all replicas serving after (s) |\n|---|---|'
for _ in $(seq "$REPLICAS"); do printf -- '---|---|'; done
printf -- '---|\n'
for v in $(grep -ho 'synced version [0-9]*' "$WORK"/replica1.log | awk '{print $3}' | sort -n | uniq); do
  bytes=$( (cat "$WORK/trainer/versions/v$v/method.safetensors" "$WORK/trainer/versions/v$v/state.json" || true) 2> /dev/null | wc -c)
  row="| $v | $bytes |"
  worst=0
  for i in $(seq "$REPLICAS"); do
    line=$(grep "synced version $v from" "$WORK/replica$i.log" | tail -1)
    x=$(sed -E 's/.* in ([0-9.]+) s \(.*/\1/' <<< "$line")
    y=$(sed -E 's/.*\(([0-9.]+) s after.*/\1/' <<< "$line")
    row="$row $y | $x |"
    worst=$(python3 -c "print(max($worst, $y))")
  done
  echo "$row $worst |"
done
