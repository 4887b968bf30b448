"""Small filesystem helpers shared by the store's modules."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from typing import Any, BinaryIO

# Test-only: GROOTFS_TEST_CRASH_AT=<point> makes the process SIGKILL itself at
# the crash_point() of that name, so tests can kill it exactly where they mean
# to. Read at each point, not at import: a fork server's child gets its
# caller's environment after the import.


def crash_point(name: str) -> None:
    """Test-only: die here, as a kill -9 would, or stop here, when the environment names it.

    ``GROOTFS_TEST_CRASH_AT`` kills; ``GROOTFS_TEST_STOP_AT`` stops the
    process (SIGSTOP) for the test to look at it and then continue or kill it.
    """
    if name == os.environ.get("GROOTFS_TEST_CRASH_AT"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    elif name == os.environ.get("GROOTFS_TEST_STOP_AT"):
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)


def write_json(path: str, data: Any) -> None:
    """Replace *path* atomically: a reader sees the old file or the new one, whole.

    No fsync: after a power loss Garden recreates every container anyway, and
    readers treat an unreadable record as a broken one (see check-store).
    """
    # json.dumps, not json.dump: only the one-shot encoder is the C one.
    text = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def unlink_quietly(path: str) -> None:
    """Remove the file *path*; one that is already gone is no error."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_json(path: str) -> Any:
    """The JSON value in the UTF-8 file *path*.

    Read with os.read, not a file object: the store's records are small, and
    a command reads several, where building a text file object cost more
    than the read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return json.loads(b"".join(chunks).decode("utf-8"))


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
    return disk_usage_checked(path)[0]


def disk_usage_checked(path: str) -> tuple[int, bool]:
    """:func:`disk_usage`, and whether every directory could be read."""
    seen: set[int] = set()
    total = 0
    complete = True
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = os.scandir(current)
        except PermissionError:
            complete = False
            continue
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
    return total, complete


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


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
)


class NotRegularFileError(OSError):
    """A path that had to be a regular file is something else; strerror says what."""


def open_regular(path: str, *, follow_symlinks: bool = True) -> BinaryIO:
    """Open *path* for reading, refusing anything but a regular file, without blocking.

    The path is first opened ``O_PATH``: that never blocks (a FIFO without a
    writer would block a plain open forever) and never runs a device's open
    routine; ``fstat`` on that fd says what the path really is, symlinks
    followed unless *follow_symlinks* is false. Only a regular file is then
    opened for reading, through the same inode (``/proc/self/fd``), so a path
    swapped in between cannot slip a FIFO past the check. Raises
    :class:`NotRegularFileError` (an OSError) for anything else.
    """
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
            raise NotRegularFileError(errno.EINVAL, f"{kind}, not a regular file", path)
        return open(f"/proc/self/fd/{fd}", "rb")
    finally:
        os.close(fd)
