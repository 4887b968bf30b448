#!/usr/bin/env bash
# `make demo`: a Debian root filesystem from an OCI image layout, made by
# grootfs on a fresh loop-mounted XFS store and run with runc, then removed.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="oci://$PWD/.cache/debian-bookworm-oci:bookworm"
ID=demo-container
T=$(mktemp -d /tmp/grootfs-demo.XXXXXX)
STORE=$T/store
LOG=$T/grootfs.log

grootfs() { .venv/bin/grootfs --store "$STORE" --log-file "$LOG" "$@"; }
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
  grootfs delete-store >/dev/null 2>&1
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

step "grootfs init-store: a 4 GiB XFS filesystem in $STORE.backing-store, loop-mounted at $STORE"
grootfs init-store --store-size-bytes $((4 * 1024 * 1024 * 1024))

step "grootfs create $IMAGE $ID (prints the runtime spec Garden reads)"
grootfs create "$IMAGE" "$ID" | tee "$T/create.json"

step "runc runs 'cat /etc/os-release' with root.path and process.env from that JSON"
.venv/bin/python tests/integration/runc.py "$T/create.json" -- cat /etc/os-release

step "grootfs stats $ID"
grootfs stats "$ID"

step "grootfs delete $ID"
grootfs delete "$ID"

step "grootfs delete-store"
grootfs delete-store

step "done"
