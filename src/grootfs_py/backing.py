"""The store's own XFS filesystem in a sparse backing file, loop-mounted.

GrootFS keeps its store on XFS for project quotas. The backing file is
created under a temporary name, formatted, and only then renamed into
place, so an existing ``<store>.backing-store`` is always a formatted
filesystem: it is mounted again, never formatted again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

from grootfs_py import log, mounts
from grootfs_py.errors import CommandError, MountError, StoreError
from grootfs_py.proc import run

# mkfs.xfs refuses filesystems smaller than this (xfsprogs >= 5.19).
MIN_SIZE_BYTES = 300 * 1024 * 1024
MOUNT_OPTIONS = "loop,noatime"


def backing_path(store: str) -> str:
    return store.rstrip("/") + ".backing-store"


def create(store: str, size: int) -> bool:
    """Make the formatted backing file unless it exists; True if it was made now."""
    path = backing_path(store)
    if os.path.exists(path):
        current = os.stat(path).st_size
        if current != size:
            log.info(
                "backing store exists with another size; keeping it",
                path=path,
                size=current,
                requested=size,
            )
        return False
    if size < MIN_SIZE_BYTES:
        raise StoreError(
            f"init store {store}: store size {size} bytes is below XFS's minimum "
            f"of {MIN_SIZE_BYTES} bytes"
        )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.incomplete-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        # ftype=1 is what overlayfs needs for d_type; -q keeps the log quiet.
        run(["mkfs.xfs", "-q", "-f", "-n", "ftype=1", tmp])
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    log.info("formatted backing store", path=path, size=size)
    return True


def mount(store: str, *, want_quota: bool = True) -> bool:
    """Loop-mount the backing file at *store*; True when project quotas are on.

    A kernel without XFS quota support refuses ``pquota``; the store is then
    mounted without it and the caller records that limits cannot be enforced.
    """
    path = backing_path(store)
    current = mounts.find(store)
    if current is not None:
        return quota_enabled(current)
    os.makedirs(store, exist_ok=True)
    if want_quota:
        try:
            run(["mount", "-t", "xfs", "-o", f"{MOUNT_OPTIONS},pquota", path, store])
            return True
        except CommandError as exc:
            log.warning(
                "mount with project quotas failed; mounting without: disk limits will be refused",
                store=store,
                error=str(exc),
            )
    try:
        run(["mount", "-t", "xfs", "-o", MOUNT_OPTIONS, path, store])
    except CommandError as exc:
        raise MountError(f"mount backing store {path}: {exc}") from None
    return False


def quota_enabled(info: mounts.MountInfo) -> bool:
    # XFS lists the project quota it enforces as "prjquota" among its options.
    return "prjquota" in info.options


LOOP_SET_DIRECT_IO = 0x4C08
# How long unmounting the store waits for it to stop being busy.
BUSY_SECONDS = 10.0


def set_direct_io(store: str, enabled: bool) -> None:
    """Turn direct I/O on the store's loop device on or off.

    With it, the loop device bypasses the page cache of the file system that
    holds the backing file, so the store's data is not cached twice.
    """
    import fcntl

    info = mounts.find(store)
    if info is None or not info.source.startswith("/dev/loop"):
        raise MountError(f"set direct I/O on store {store}: not mounted from a loop device")
    fd = os.open(info.source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_SET_DIRECT_IO, 1 if enabled else 0)
    except OSError as exc:
        raise MountError(
            f"set direct I/O {'on' if enabled else 'off'} for {info.source}: {exc.strerror}"
        ) from None
    finally:
        os.close(fd)
    log.info("loop device direct I/O", device=info.source, enabled=enabled)


def direct_io(store: str) -> bool:
    """Whether the store's loop device does direct I/O (from sysfs)."""
    info = mounts.find(store)
    if info is None or not info.source.startswith("/dev/loop"):
        return False
    name = os.path.basename(info.source)
    try:
        with open(f"/sys/block/{name}/loop/dio", encoding="ascii") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return False


def loop_devices(path: str) -> list[str]:
    """Loop devices still attached to the backing file *path*."""
    result = run(["losetup", "--noheadings", "--output", "NAME", "-j", path], check=False)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def unmount(store: str) -> None:
    """Unmount the store and make sure no loop device stays attached."""
    from grootfs_py import linux

    path = backing_path(store)
    # A create's settler (settle.py) holds the store open while it flushes:
    # a busy store is given that long before it is an error.
    deadline = time.monotonic() + BUSY_SECONDS
    while mounts.find(store) is not None:
        try:
            linux.umount(store)
        except OSError as exc:
            if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise MountError(f"unmount store {store}: {exc.strerror}") from None
    if os.path.exists(path):
        for device in loop_devices(path):
            # mount -o loop sets autoclear; this only catches devices set up by hand.
            run(["losetup", "-d", device], check=False)
        left = loop_devices(path)
        if left:
            raise MountError(f"detach loop device {left[0]} of {path}: still attached")
