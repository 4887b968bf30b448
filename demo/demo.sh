#!/usr/bin/env bash
# `make demo`: the Debian image pushed into a local registry, made into a root
# filesystem by grootfs (create docker://...) on a fresh loop-mounted XFS
# store and run with runc, then removed; the warm calls go the way Garden's go
# on a cell: through the native shim to a resident `grootfs serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYOUT="$PWD/.cache/debian-bookworm-oci"
ID=demo-container
T=$(mktemp -d /tmp/grootfs-demo.XXXXXX)
STORE=$T/store
LOG=$T/grootfs.log
REGISTRY_PID=
SERVER_PID=
SOCKET=$T/run/grootfs.sock

grootfs() { .venv/bin/grootfs --store "$STORE" --log-file "$LOG" "$@"; }
# What Garden runs: the shim, which hands the command to the server (or, with
# no server, execs the Python command).
shim() {
  GROOTFS_SOCKET=$SOCKET GROOTFS_PYTHON_CLI=$PWD/.venv/bin/grootfs \
    build/grootfs-shim --store "$STORE" --log-file "$LOG" "$@"
}
step() { printf '\n==> %s\n' "$*"; }

# Runs on every exit: whatever the steps below did not undo is undone here.
cleanup() {
  local status=$?
  set +e
  if ((status != 0)) && [[ -s $LOG ]]; then
    printf '\ndemo failed; the last lines of %s:\n' "$LOG"
    tail -n 20 "$LOG"
  fi
  grootfs delete "$ID" >/dev/null 2>&1
  grootfs delete "$ID-again" >/dev/null 2>&1
  grootfs delete-store >/dev/null 2>&1
  if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
  if [[ -n $REGISTRY_PID ]]; then kill "$REGISTRY_PID" 2>/dev/null; wait "$REGISTRY_PID" 2>/dev/null; fi
  awk -v t="$T/" 'index($5, t) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r point; do umount --lazy "$point"; done
  if [[ -e $STORE.backing-store ]]; then
    losetup --noheadings --output NAME --associated "$STORE.backing-store" |
      while read -r dev; do losetup --detach "$dev"; done
  fi
  rm -rf "$T"
  exit "$status"
}
trap cleanup EXIT

# Debian's docker-registry, on loopback only, with a config of our own (the
# packaged one listens on all interfaces).
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REGISTRY=127.0.0.1:$PORT
IMAGE="docker://$REGISTRY/debian:bookworm"
printf '{"version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": true}},
 "storage": {"filesystem": {"rootdirectory": "%s"}}, "http": {"addr": "%s", "secret": "demo"}}\n' \
  "$T/registry" "$REGISTRY" >"$T/registry.yml"
step "docker-registry serve on $REGISTRY (plain HTTP, so grootfs gets --insecure-registry)"
docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

step "skopeo copy oci:$LAYOUT:bookworm $IMAGE"
skopeo copy --quiet --dest-tls-verify=false "oci:$LAYOUT:bookworm" "$IMAGE"

step "grootfs init-store: a 4 GiB XFS filesystem in $STORE.backing-store, loop-mounted at $STORE"
grootfs init-store --store-size-bytes $((4 * 1024 * 1024 * 1024))

step "grootfs create $IMAGE $ID (prints the runtime spec Garden reads)"
grootfs create --insecure-registry "$REGISTRY" "$IMAGE" "$ID" | tee "$T/create.json"

step "runc runs 'cat /etc/os-release' with root.path and process.env from that JSON"
.venv/bin/python tests/integration/runc.py "$T/create.json" -- cat /etc/os-release

step "grootfs serve --socket $SOCKET (the resident server Garden's calls go to)"
.venv/bin/grootfs serve --socket "$SOCKET" >"$T/serve.log" 2>&1 &
SERVER_PID=$!
# Up once both forkers have imported what their commands need (until then
# the server forks commands itself, which works but is slower).
for _ in $(seq 100); do
  (($(grep -c '"grootfs.serve.forker-ready"' "$T/serve.log") >= 2)) && break
  sleep 0.1
done

step "grootfs-shim create $IMAGE $ID-again (layers cached: the manifest is fetched, no blob)"
time shim create --insecure-registry "$REGISTRY" "$IMAGE" "$ID-again" >/dev/null
shim delete "$ID-again"

step "grootfs-shim stats $ID"
time shim stats "$ID"

step "grootfs-shim delete $ID"
shim delete "$ID"

step "stop the server: it removes its socket"
kill "$SERVER_PID"
wait "$SERVER_PID"
SERVER_PID=
[[ ! -e $SOCKET ]]

step "grootfs delete-store"
grootfs delete-store

step "done"
