"""Inter-process locks with flock(2): they vanish with the process holding them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from grootfs_py import log
from grootfs_py.errors import StoreError

DEFAULT_TIMEOUT = 300.0


@contextlib.contextmanager
def flock(path: str, *, shared: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Hold a shared or exclusive lock on *path* (created if missing) for the block.

    Waiting polls with a non-blocking flock and a growing sleep instead of a
    blocking call, so that every wait has a deadline and a killed holder
    never leaves a waiter stuck.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
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
                        f"timed out after {timeout:g}s waiting for {kind} lock {path}"
                    ) from None
                time.sleep(min(delay, timeout - waited))
                delay = min(delay * 2, 0.1)
        waited = time.monotonic() - start
        if waited > 0.01:
            log.debug("lock acquired", path=path, shared=shared, waited_s=round(waited, 3))
        yield
    finally:
        os.close(fd)
