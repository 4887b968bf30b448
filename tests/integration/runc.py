"""Run a command inside a root filesystem with runc, the way Garden would.

A helper for tests and the demo, not a test module. It writes a minimal OCI
runtime bundle around the ``root.path`` that ``grootfs create`` printed and
runs ``runc run`` with a private state directory, so nothing is left in the
host's runc state whatever happens.

Also usable as a script: ``runc.py CREATE_JSON_FILE -- ARGV...``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (container id, host id, size): the same triple as init-store's --uid-mapping.
IdMapping = tuple[int, int, int]

DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

# Docker's default set: enough for chown, setuid programs and package tools.
_CAPABILITIES = [
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
]


def runtime_config(
    rootfs: str,
    argv: Sequence[str],
    env: Sequence[str],
    *,
    uid_mappings: Sequence[IdMapping] | None = None,
    gid_mappings: Sequence[IdMapping] | None = None,
) -> dict[str, Any]:
    """Return a minimal OCI runtime config for *argv* in *rootfs*."""
    caps = list(_CAPABILITIES)
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("mount", "pid", "ipc", "uts")]
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    if uid_mappings is not None or gid_mappings is not None:
        namespaces.append({"type": "user"})
        linux["uidMappings"] = _mappings(uid_mappings or [])
        linux["gidMappings"] = _mappings(gid_mappings or [])
    # /sys is left out: sysfs cannot be mounted from a user namespace that does
    # not own the network namespace, and no test needs it.
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(argv),
            "env": list(env),
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": "grootfs-test",
        "mounts": mounts,
        "linux": linux,
    }


def _mappings(mappings: Sequence[IdMapping]) -> list[dict[str, int]]:
    return [{"containerID": c, "hostID": h, "size": s} for c, h, s in mappings]


def run_in_rootfs(
    create_output: dict[str, Any],
    argv: list[str],
    *,
    uid_mappings: Sequence[IdMapping] | None = None,
    gid_mappings: Sequence[IdMapping] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run *argv* as root in the rootfs of *create_output* (``grootfs create``'s JSON).

    Returns runc's result (the command's exit status, stdout and stderr as
    text); the caller checks the status. The container is always deleted.
    """
    rootfs = create_output["root"]["path"]
    env = create_output.get("process", {}).get("env") or DEFAULT_ENV
    config = runtime_config(rootfs, argv, env, uid_mappings=uid_mappings, gid_mappings=gid_mappings)
    container_id = f"grootfs-test-{uuid.uuid4().hex[:12]}"
    work = Path(tempfile.mkdtemp(prefix="grootfs-runc-"))
    try:
        state, bundle = work / "state", work / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
        runc = ["runc", "--root", str(state)]
        try:
            return subprocess.run(
                [*runc, "run", "--bundle", str(bundle), container_id],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        finally:
            subprocess.run(
                [*runc, "delete", "--force", container_id],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: runc.py CREATE_JSON_FILE -- ARGV...", file=sys.stderr)
        return 2
    create_output = json.loads(Path(args[0]).read_text())
    result = run_in_rootfs(create_output, args[2:])
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
