"""Thin wrappers over the Linux system calls Python's os module lacks.

mount(2), umount2(2), syncfs(2) and fstatfs(2) are called through libc directly: a
create on a warm store is one overlay mount, and spawning mount(8) for it
would cost more than the rest of the command.
"""

from __future__ import annotations

import ctypes
import functools
import os

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long  # syscall(2) returns a long, not ctypes' default int
    return libc


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2). Relative paths in *data* resolve against the current directory."""
    raw = data.encode()
    if len(raw) >= PAGE_SIZE:
        raise OSError(
            7, f"mount options are {len(raw)} bytes, the kernel takes at most {PAGE_SIZE - 1}"
        )
    _check(
        _libc().mount(source.encode(), target.encode(), fstype.encode(), flags, raw or None),
        "mount",
        target,
    )


def umount(target: str, flags: int = UMOUNT_NOFOLLOW) -> None:
    _check(_libc().umount2(target.encode(), flags), "umount", target)


@functools.cache
def boot_id() -> str:
    """This boot's random id (a new one after every reboot, clean or not).

    Read once per process: no process outlives its boot, and check-store
    asks once for every unmounted image.
    """
    fd = os.open("/proc/sys/kernel/random/boot_id", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 64).decode("ascii").strip()
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """Flush the filesystem holding *fd*, and only that one."""
    _check(_libc().syncfs(fd), "syncfs", str(fd))


def filesystem_magic(fd: int) -> int:
    """The type of the filesystem holding *fd* (fstatfs(2)'s ``f_type``, e.g. XFS_SUPER_MAGIC)."""
    # struct statfs is 120 bytes on 64-bit Linux; f_type, a long, comes first.
    buf = ctypes.create_string_buffer(256)
    _check(_libc().fstatfs(fd, buf), "fstatfs", str(fd))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signo: int) -> None:
    """prctl(PR_SET_PDEATHSIG): get *signo* when the parent dies (0: nothing)."""
    _check(_libc().prctl(PR_SET_PDEATHSIG, signo, 0, 0, 0), "prctl", "PR_SET_PDEATHSIG")


PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """prctl(PR_SET_NAME): what ps(1) and /proc/<pid>/comm show (15 bytes at most)."""
    _check(_libc().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0), "prctl", "PR_SET_NAME")
