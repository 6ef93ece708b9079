#!/usr/bin/env bash
# Checks the CPU image's runtime stages without a Docker engine: runs the Dockerfile's
# `runtime-cpu` and `runtime` RUN steps in a fresh Debian 12 root file system (debootstrap,
# minbase, so close to debian:bookworm-slim), copies in locally built binaries, then as user 10001
# with the image's environment: starts strata-server, runs the HEALTHCHECK command, and sends
# SIGTERM to the server running as PID 1 of its own PID namespace.
#
#   sudo deploy/docker/check-cpu-image.sh [--build-dir build | --with-build] [--rootfs /tmp/strata-rootfs] [--keep]
#
# --with-build runs the `build-cpu` stage too, in a second fresh root file system (ROOTFS.build) with
# the build context (the checkout minus .dockerignore's build trees, .git, docs, deploy), and tests
# the binaries it builds (adds setup.sh's packages and a cold build: 15+ minutes on 2 cores).
# --keep keeps the bare debootstrap result as ROOTFS.base.tar for the next run (saves ~2 minutes).
# Needs root, debootstrap, network access to deb.debian.org, ~1.5 GB in the rootfs, a few minutes.
# Uses ports 51951 (gRPC) and 19464 (metrics) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=build
ROOTFS=/tmp/strata-rootfs
KEEP=0
WITH_BUILD=0
while (($#)); do
  case "$1" in
    --build-dir) BUILD_DIR=$2; shift ;;
    --with-build) WITH_BUILD=1 ;;
    --rootfs) ROOTFS=$2; shift ;;
    --keep) KEEP=1 ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
  shift
done
say() { printf '[check-cpu-image] %s\n' "$*"; }
[[ $(id -u) -eq 0 ]] || { say "needs root (chroot, mount)"; exit 2; }
command -v debootstrap > /dev/null || { say "needs debootstrap (apt-get install debootstrap)"; exit 2; }
if ((!WITH_BUILD)); then
  for b in server/strata-server client/strata client/strata-offline; do
    [[ -x "$BUILD_DIR/$b" ]] || { say "no $BUILD_DIR/$b; build first (or --with-build)"; exit 2; }
  done
fi

# The RUN/ENV/ARG lines of one Dockerfile stage as a bash script.
stage_script() {
  python3 - "$1" <<'PY'
import re, sys
stage, lines, cur = sys.argv[1], [], ""
for raw in open("Dockerfile"):
    line = raw.rstrip("\n")
    if line.lstrip().startswith("#") or (not cur and not line.strip()):
        continue
    if line.endswith("\\"):
        cur += line[:-1] + " "
    else:
        lines.append(cur + line)
        cur = ""
out, active = ["set -euo pipefail"], False
for l in lines:
    m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", l)
    if m:
        active = m.group(1) == stage
    elif active and l.startswith("ARG ") and "=" in l:
        out.append("export " + l[4:])
    elif active and l.startswith("ENV "):
        out.append("export " + l[4:])
    elif active and l.startswith("WORKDIR "):
        out.append("mkdir -p " + l[8:] + " && cd " + l[8:])
    elif active and l.startswith("RUN "):
        cmd = re.sub(r"^(--mount=\S+\s+)+", "", l[4:])
        # Each RUN fails on its own exit status, as in docker build (set -e ignores && chains).
        out.append("( " + cmd + "\n) || { echo 'RUN failed: " + cmd[:56].replace("'", "") + "...' >&2; exit 1; }")
print("\n".join(out))
PY
}
healthcheck_cmd() {
  python3 -c 'import re; t = open("Dockerfile").read().replace("\\\n", " "); print(re.search(r"^HEALTHCHECK .*?CMD (.*)$", t, re.M).group(1))'
}

cleanup() {
  [[ -n "${SERVER_PID:-}" ]] && kill "$SERVER_PID" 2> /dev/null || true
  for r in "$ROOTFS" "$ROOTFS.build"; do
    mountpoint -q "$r/dev" && umount "$r/dev" || true
    mountpoint -q "$r/proc" && umount "$r/proc" || true
    rm -rf "$r"
  done
}
trap cleanup EXIT

# A fresh debian:bookworm-like root file system in $1.
fresh_rootfs() {
  rm -rf "$1"
  mkdir -p "$1"
  if [[ -f "$ROOTFS.base.tar" ]]; then
    say "fresh root file system $1 from $ROOTFS.base.tar"
    tar -xf "$ROOTFS.base.tar" -C "$1"
  else
    say "debootstrap bookworm (minbase) into $1"
    debootstrap --variant=minbase bookworm "$1" http://deb.debian.org/debian > "$ROOTFS.log" 2>&1
    if ((KEEP)); then tar -cf "$ROOTFS.base.tar" -C "$1" .; fi
  fi
}

if ((WITH_BUILD)); then
  B="$ROOTFS.build"
  fresh_rootfs "$B"
  say "build context -> $B/src (without .git, build trees, docs, deploy but deploy/docker)"
  mkdir -p "$B/src"
  tar -cf - --exclude=./.git --exclude=./.cache --exclude=./build --exclude='./build-*' \
      --exclude=./docs --exclude=./deploy --exclude='*.swp' --exclude=./compile_commands.json . \
    | tar -xf - -C "$B/src"
  mkdir -p "$B/src/deploy" && cp -r deploy/docker "$B/src/deploy/"
  mount --bind /dev "$B/dev"
  mount -t proc proc "$B/proc"
  stage_script build-cpu | sed 's|^mkdir -p /src && cd /src$|cd /src|' > "$B/tmp/build-cpu.sh"
  say "RUN steps of stage build-cpu (setup.sh --deps, cmake, build; log: $ROOTFS.build.log)"
  chroot "$B" /bin/bash -o pipefail /tmp/build-cpu.sh > "$ROOTFS.build.log" 2>&1 \
    || { tail -30 "$ROOTFS.build.log"; say "FAIL: stage build-cpu"; exit 1; }
  umount "$B/proc" "$B/dev"
  BUILD_DIR="$ROOTFS.out"
  mkdir -p "$BUILD_DIR/server" "$BUILD_DIR/client"
  cp "$B/out/strata-server" "$BUILD_DIR/server/"
  cp "$B/out/strata" "$B/out/strata-offline" "$BUILD_DIR/client/"
  rm -rf "$B"
  say "build-cpu: $(ls "$BUILD_DIR"/server "$BUILD_DIR"/client | tr '\n' ' ')"
fi

fresh_rootfs "$ROOTFS"
mount --bind /dev "$ROOTFS/dev"
mount -t proc proc "$ROOTFS/proc"
cp "$BUILD_DIR/server/strata-server" "$BUILD_DIR/client/strata" "$BUILD_DIR/client/strata-offline" \
  "$ROOTFS/usr/local/bin/"
stage_script runtime-cpu > "$ROOTFS/tmp/runtime-cpu.sh"
stage_script runtime > "$ROOTFS/tmp/runtime.sh"
say "RUN steps of stage runtime-cpu (packages, OpenBLAS, ldd, BLAS check)"
chroot "$ROOTFS" /bin/bash -o pipefail /tmp/runtime-cpu.sh > "$ROOTFS.stage.log" 2>&1 \
  || { tail -20 "$ROOTFS.stage.log"; say "FAIL: stage runtime-cpu"; exit 1; }
say "RUN steps of stage runtime (user 10001, /var/lib/strata)"
chroot "$ROOTFS" /bin/bash -o pipefail /tmp/runtime.sh || { say "FAIL: stage runtime"; exit 1; }
umount "$ROOTFS/proc"

ENVS=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin STRATA_HOST=127.0.0.1
      STRATA_STATE_DIR=/var/lib/strata HOME=/var/lib/strata STRATA_GRPC_PORT=51951 STRATA_METRICS_PORT=19464)
say "starting strata-server as PID 1 of a new PID namespace, user 10001"
env -i "${ENVS[@]}" unshare --pid --mount --fork chroot "$ROOTFS" /bin/sh -c \
  'mount -t proc proc /proc && cd /var/lib/strata && exec setpriv --reuid=10001 --regid=10001 --clear-groups strata-server' \
  > "$ROOTFS.server.log" 2>&1 &
SERVER_PID=$!
ok=0
for _ in $(seq 60); do
  if env -i "${ENVS[@]}" chroot --userspec=10001:10001 "$ROOTFS" /bin/sh -c "$(healthcheck_cmd)" 2> /dev/null; then
    ok=1; break
  fi
  sleep 1
done
((ok)) || { cat "$ROOTFS.server.log"; say "FAIL: HEALTHCHECK never passed"; exit 1; }
say "HEALTHCHECK passed"
curl -fsS 127.0.0.1:19464/metrics | grep -q '^strata_build_info' || { say "FAIL: no /metrics"; exit 1; }
say "/metrics served"
inner=$(pgrep -P "$SERVER_PID" | head -1)
server=$(pgrep -P "$inner" | head -1 || true)
server=${server:-$inner}
grep -q $'^NSpid:.*\t1$' "/proc/$server/status" || { say "FAIL: strata-server is not PID 1 in its namespace"; exit 1; }
kill -TERM "$server"
for _ in $(seq 60); do kill -0 "$server" 2> /dev/null || break; sleep 1; done
if kill -0 "$server" 2> /dev/null; then say "FAIL: strata-server (PID 1) ignored SIGTERM"; exit 1; fi
grep -q "shutdown complete" "$ROOTFS.server.log" || { cat "$ROOTFS.server.log"; say "FAIL: no clean shutdown"; exit 1; }
say "SIGTERM to PID 1: clean shutdown"
say "image size without /proc and /dev: $(du -sh --exclude=proc --exclude=dev "$ROOTFS" | cut -f1)"
say "PASS"
