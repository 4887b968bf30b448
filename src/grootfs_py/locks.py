"""Inter-process locks with flock(2): they vanish with the process holding them.

The store's locks, in the order a process may take them (never the reverse):

1. ``locks/clean.lock``: exclusive, non-blocking; at most one clean per store.
2. ``locks/store.lock``: shared by create, delete and clean for their whole
   run; exclusive only for check-store, which needs a store at rest.
3. the image directory itself (``images/<id>``): exclusive, held by the
   create that claimed it until ``image.json`` is written, and by delete.
4. ``locks/layer-<hex>.lock``: shared while a create uses the layer (from
   "it is there" until the image's dependency record is written);
   exclusive while one create unpacks it and while clean removes it. The
   exclusive lock is only ever tried, never waited for, and its holder
   waits for nothing: a create waits for a layer while holding others
   shared, so this is what keeps two creates from waiting for each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator

from grootfs_py import log
from grootfs_py.errors import StoreError
from grootfs_py.metrics import LockWait

DEFAULT_TIMEOUT = 300.0
# Waits longer than this are logged at info, so a loaded store shows its contention.
LOG_WAIT_SECONDS = 0.05


def wait(fd: int, what: str, *, shared: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Lock the open file *fd*, waiting at most *timeout* seconds.

    Waiting polls with a non-blocking flock and a growing sleep instead of a
    blocking call, so that every wait has a deadline and a killed holder
    never leaves a waiter stuck.
    """
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    start = time.monotonic()
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, mode)
            break
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited >= timeout:
                kind = "shared" if shared else "exclusive"
                raise StoreError(
                    f"timed out after {timeout:g}s waiting for {kind} lock {what}"
                ) from None
            time.sleep(min(delay, timeout - waited))
            delay = min(delay * 2, 0.1)
    waited = time.monotonic() - start
    if waited > LOG_WAIT_SECONDS:
        log.info("lock waited", path=what, shared=shared, waited_s=round(waited, 3))


def _open(path: str) -> int:
    """Open (or create) the lock file *path*; a store its user cannot write is named as such."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        hint = ""
        if exc.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
            from grootfs_py.store import NOT_YOURS

            hint = NOT_YOURS
        raise StoreError(f"open lock {path}: {exc.strerror}{hint}") from None


def acquire(
    path: str,
    *,
    shared: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    waits: LockWait | None = None,
) -> int:
    """Open *path* (created if missing) and lock it; close the returned fd to release.

    With *waits*, the time it took (open included, as GrootFS counts it) is added there.
    """
    start = time.monotonic_ns()
    fd = _open(path)
    try:
        wait(fd, path, shared=shared, timeout=timeout)
    except BaseException:
        os.close(fd)
        raise
    if waits is not None:
        waits.add(time.monotonic_ns() - start)
    return fd


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Lock the open file *fd* unless someone holds it in a conflicting mode."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def try_acquire(path: str, *, shared: bool = False) -> int | None:
    """Lock *path* if nobody holds it in a conflicting mode; None if someone does."""
    fd = _open(path)
    try:
        if try_lock(fd, shared=shared):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


@contextlib.contextmanager
def flock(
    path: str,
    *,
    shared: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    waits: LockWait | None = None,
) -> Iterator[None]:
    """Hold a shared or exclusive lock on *path* (created if missing) for the block."""
    fd = acquire(path, shared=shared, timeout=timeout, waits=waits)
    try:
        yield
    finally:
        os.close(fd)
