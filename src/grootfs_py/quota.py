"""XFS project quotas: one project per image, limits and usage from the kernel.

An image's directory gets its own project id (with the inherit flag, so its
``diff`` and ``workdir`` are in the same project) through
``FS_IOC_FSSETXATTR``; the hard block limit is set and the usage read with
``quotactl(Q_XSETQLIM / Q_XGETQUOTA)``. No xfs_quota process per create,
and stats cost one system call instead of a walk of the container's files.

Project ids are allocated by creating ``<store>/projectids/<n>`` with
O_EXCL, the lowest free number first, and freed when the image is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import struct

from grootfs_py import log
from grootfs_py.errors import StoreError

# <linux/fs.h>: struct fsxattr and its ioctls.
_FSXATTR = struct.Struct("<IIIII8s")
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x00000200

# <linux/dqblk_xfs.h> and <linux/quota.h>.
_Q_XGETQUOTA = 0x5803
_Q_XSETQLIM = 0x5804
_PRJQUOTA = 2
FS_DQUOT_VERSION = 1
FS_PROJ_QUOTA = 2
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
# struct fs_disk_quota: version, flags, fieldmask, id, then the block and
# inode limits and counts (in 512-byte basic blocks), timers, warnings,
# realtime fields and padding: 112 bytes.
_DISK_QUOTA = struct.Struct("<bbHIQQQQQQiiHHbbbbQQQiHh8s")
BASIC_BLOCK = 512
MAX_PROJECT_ID = 2**32 - 2


def _qcmd(cmd: int) -> int:
    return (cmd << 8) | _PRJQUOTA


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _quotactl(cmd: int, device: str, project_id: int, buffer: ctypes.Array[ctypes.c_char]) -> None:
    result = _libc().quotactl(_qcmd(cmd), device.encode(), project_id, buffer)
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), device)


def set_project(path: str, project_id: int) -> None:
    """Put directory *path* in project *project_id*, inherited by what is made in it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
        xflags, extsize, nextents, _, cowextsize, pad = _FSXATTR.unpack(raw)
        new = _FSXATTR.pack(
            xflags | FS_XFLAG_PROJINHERIT, extsize, nextents, project_id, cowextsize, pad
        )
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, new)
    finally:
        os.close(fd)


def get_project(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    finally:
        os.close(fd)
    return int(_FSXATTR.unpack(raw)[3])


def set_limit(device: str, project_id: int, limit_bytes: int) -> None:
    """Set the project's hard (and soft) block limit; 0 removes the limit."""
    blocks = -(-limit_bytes // BASIC_BLOCK)
    buffer = ctypes.create_string_buffer(
        _DISK_QUOTA.pack(
            FS_DQUOT_VERSION,
            FS_PROJ_QUOTA,
            FS_DQ_BHARD | FS_DQ_BSOFT,
            project_id,
            blocks,
            blocks,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            b"",
        ),
        _DISK_QUOTA.size,
    )
    _quotactl(_Q_XSETQLIM, device, project_id, buffer)


def usage(device: str, project_id: int) -> tuple[int, int]:
    """(bytes used, hard limit in bytes) of the project, from the kernel."""
    buffer = ctypes.create_string_buffer(_DISK_QUOTA.size)
    try:
        _quotactl(_Q_XGETQUOTA, device, project_id, buffer)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0, 0  # no quota record yet: nothing written, no limit
        raise
    fields = _DISK_QUOTA.unpack(buffer.raw)
    hard_blocks, used_blocks = fields[4], fields[8]
    return used_blocks * BASIC_BLOCK, hard_blocks * BASIC_BLOCK


class ProjectIds:
    """The store's project id allocator: one file per id under projectids/."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def allocate(self, owner: str) -> int:
        taken = set()
        with contextlib.suppress(FileNotFoundError):
            taken = {int(n) for n in os.listdir(self.folder) if n.isdigit()}
        candidate = 1
        while candidate <= MAX_PROJECT_ID:
            if candidate not in taken:
                try:
                    fd = os.open(
                        os.path.join(self.folder, str(candidate)),
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                        0o600,
                    )
                except FileExistsError:
                    taken.add(candidate)  # another create took it since we looked
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(owner)
                return candidate
            candidate += 1
        raise StoreError("no free XFS project id left in the store")

    def free(self, project_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.folder, str(project_id)))

    def owners(self) -> dict[int, str]:
        found: dict[int, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.folder):
                if name.isdigit():
                    with (
                        contextlib.suppress(FileNotFoundError),
                        open(os.path.join(self.folder, name), encoding="utf-8") as f,
                    ):
                        found[int(name)] = f.read()
        return found


def release(device: str | None, ids: ProjectIds, project_id: int) -> None:
    """Drop a project's limit (on a store with quotas) and free its id.

    The project's files must already be gone; a limit that cannot be
    cleared is left for the next owner of the id to overwrite.
    """
    if device is not None:
        with contextlib.suppress(OSError):
            set_limit(device, project_id, 0)
    ids.free(project_id)


def device_of(store_path: str) -> str:
    """The block device holding the store, for quotactl."""
    from grootfs_py import mounts

    info = mounts.find(store_path)
    if info is None or not info.source.startswith("/dev/"):
        raise StoreError(f"store {store_path} is not a mounted XFS filesystem")
    return info.source


def prove(store_path: str, scratch: str, ids: ProjectIds) -> None:
    """Show that the kernel enforces a project limit on this store, or raise.

    A scratch directory gets a 1 MiB limit and 2 MiB are written into it;
    the write must fail with EDQUOT (or ENOSPC, which XFS reports for
    project quotas on some kernels). Everything is undone either way.
    """
    limit = 1 << 20
    device = device_of(store_path)
    project_id = ids.allocate("check-quota")
    try:
        os.mkdir(scratch, 0o700)
        try:
            set_project(scratch, project_id)
            set_limit(device, project_id, limit)
            refused = False
            try:
                with open(os.path.join(scratch, "fill"), "wb") as f:
                    chunk = b"\0" * (256 << 10)
                    for _ in range(8):
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno not in (errno.EDQUOT, errno.ENOSPC):
                    raise
                refused = True
            if not refused:
                raise StoreError(
                    "store does not enforce disk quotas: 2 MiB written past a 1 MiB project limit"
                )
            log.info("quota enforced", store=store_path)
        finally:
            from grootfs_py import fsutil

            fsutil.remove_tree(scratch)
            with contextlib.suppress(OSError):
                set_limit(device, project_id, 0)
    except OSError as exc:
        raise StoreError(f"store cannot enforce disk quotas: {exc.strerror}") from None
    finally:
        ids.free(project_id)
