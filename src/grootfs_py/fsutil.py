"""Small filesystem helpers shared by the store's modules."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Any

# Test-only: GROOTFS_TEST_CRASH_AT=<point> makes the process SIGKILL itself at
# the crash_point() of that name, so tests can kill it exactly where they mean
# to. Read at each point, not at import: a fork server's child gets its
# caller's environment after the import.


def crash_point(name: str) -> None:
    """Test-only: die here, as a kill -9 would, when the environment names this point."""
    if name == os.environ.get("GROOTFS_TEST_CRASH_AT"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_json(path: str, data: Any) -> None:
    """Replace *path* atomically: a reader sees the old file or the new one, whole.

    No fsync: after a power loss Garden recreates every container anyway, and
    readers treat an unreadable record as a broken one (see check-store).
    """
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"), sort_keys=True)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _retry_removable(func: Any, path: str, exc_info: Any) -> None:
    """rmtree error hook: lift the permission bits in the way and try once more.

    Root rarely needs it (it bypasses mode bits), but a store used without
    CAP_DAC_OVERRIDE, or a directory a container left as mode 0000, must
    still be removable.
    """
    if isinstance(exc_info[1], FileNotFoundError):
        return
    for target in (os.path.dirname(path), path):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(target).st_mode):
                os.chmod(target, 0o700)
    if func in (os.rmdir, os.unlink):
        func(path)
    else:
        import shutil

        shutil.rmtree(path)


def remove_tree(path: str) -> None:
    """Remove *path* and everything in it; a missing path is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    import shutil

    shutil.rmtree(path, onerror=_retry_removable)


def disk_usage(path: str) -> int:
    """Bytes allocated to everything under *path* (st_blocks), each inode once."""
    seen: set[int] = set()
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = os.scandir(current)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1:
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def content_size(path: str) -> int:
    """Bytes of regular-file content under *path*, each inode once (a layer's size)."""
    seen: set[int] = set()
    total = 0
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                    if st.st_nlink > 1:
                        seen.add(st.st_ino)
                    total += st.st_size
    return total
