"""A private mount namespace where only a scratch tmpfs (and named directories) can be written.

The unpack target runs the real unpacker, as root, on inputs a fuzzer
makes up: were it ever to write outside its layer, that write must not land
on this machine. After :func:`enter` every mount the process sees is
read-only, in its own mount namespace only (the host is untouched), except
a fresh tmpfs for the layers and the directories given (libFuzzer's corpus
and the findings). The scratch tmpfs is mounted over /dev/shm (in the namespace only). A
write that escapes a layer then fails with EROFS,
which the target reports as an escape.
"""

from __future__ import annotations

import ctypes
import os
import re

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
_KEPT = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            None,
        ),
        f"mount {target}",
    )


def _mount_points() -> list[tuple[str, int]]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            options = fields[5].split(",")
            points.append((point, sum(flag for name, flag in _KEPT.items() if name in options)))
    return points


def enter(writable: list[str]) -> str:
    """Make everything but *writable* and a new scratch tmpfs read-only; return the scratch path."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep = set()
    for path in writable:
        os.makedirs(path, exist_ok=True)
        real = os.path.realpath(path)
        _mount(real, real, None, MS_BIND)
        keep.add(real)
    # Over /dev/shm, in this namespace only: a mount point that exists and
    # needs no directory made (and later left) on the host.
    scratch = "/dev/shm"
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV)
    keep.add(scratch)
    for point, flags in _mount_points():
        if point in keep:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            if point == "/":
                raise  # without a read-only root there is no safety net: do not fuzz
    probe = os.path.join(os.path.dirname(scratch), f".rw-probe-{os.getpid()}")
    try:
        open(probe, "w").close()
    except OSError:
        pass
    else:
        os.unlink(probe)
        raise OSError(f"sandbox: {os.path.dirname(scratch)} is still writable")
    return scratch
