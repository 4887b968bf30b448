"""The overlay driver: one image is an overlay of shared layers plus its own upper.

Lower layers are named through short links under ``<store>/l/`` and the
mount is made with the store as the working directory, so the option string
stays under the kernel's one-page limit even for images of 130+ layers.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator, Sequence

from grootfs_py import linux, log
from grootfs_py.errors import MountError

LINKS_DIR = "l"
# 12 base32 characters: 60 bits, and an entry of "l/<12>:" is 15 bytes,
# so a page holds more than 250 layers.
SHORT_NAME_CHARS = 12


def short_name(chain_id: str) -> str:
    """The stable short link name of the layer with *chain_id*."""
    digest = hashlib.sha256(f"grootfs-link:{chain_id}".encode()).digest()
    return base64.b32encode(digest).decode()[:SHORT_NAME_CHARS]


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    previous = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(previous)
        os.close(previous)


def options(lower: Sequence[str], upper: str, work: str) -> str:
    """The overlay mount data for *lower* (top layer first)."""
    return f"lowerdir={':'.join(lower)},upperdir={upper},workdir={work}"


def relative_options(image_dir: str, shorts_top_first: Sequence[str]) -> str:
    return options(
        [f"{LINKS_DIR}/{s}" for s in shorts_top_first],
        f"{image_dir}/diff",
        f"{image_dir}/workdir",
    )


def absolute_options(store: str, image_dir: str, shorts_top_first: Sequence[str]) -> str:
    return options(
        [f"{store}/{LINKS_DIR}/{s}" for s in shorts_top_first],
        f"{store}/{image_dir}/diff",
        f"{store}/{image_dir}/workdir",
    )


# What a volatile mount leaves in its workdir; the kernel refuses to mount
# that workdir again while it is there (Documentation/filesystems/overlayfs.rst).
VOLATILE_MARKER = ("work", "incompat", "volatile")


def mount(
    store: str, image_dir: str, shorts_top_first: Sequence[str], *, volatile: bool = False
) -> bool:
    """Mount the overlay at ``<store>/<image_dir>/rootfs``; paths relative to *store*.

    With *volatile* the mount skips every sync of its upper directory
    (Linux 5.10). Unmounting an overlay otherwise runs syncfs(2) on the whole
    store: each delete then waits for the log and every container's dirty data,
    ~1 ms of an idle 4 ms delete here and, under write load, seconds. A container's
    upper dies with its container, and no container outlives its host, so
    nothing is lost that a crash would not lose anyway; what changes is that
    fsync(2) inside the container no longer reaches the disk. A kernel that
    does not know the option gets a plain mount. True if the mount is volatile.
    """
    data = relative_options(image_dir, shorts_top_first)
    target = f"{image_dir}/rootfs"
    with _cwd(store):
        try:
            if volatile:
                try:
                    linux.mount("overlay", target, "overlay", 0, data + ",volatile")
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    log.debug("overlay refused volatile; mounting without", target=target)
                    volatile = False
            if not volatile:
                linux.mount("overlay", target, "overlay", 0, data)
        except OSError as exc:
            raise MountError(f"mount image rootfs {store}/{target}: {exc.strerror}") from None
    log.debug("mounted overlay", target=f"{store}/{target}", layers=len(shorts_top_first))
    return volatile


def unmount(rootfs: str) -> bool:
    """Unmount *rootfs* if it is mounted; True if something was unmounted."""
    try:
        linux.umount(rootfs)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False  # not a mount point (or already gone): nothing to undo
        if exc.errno == errno.EPERM:
            # Without root every umount is refused, mounted or not; a rootless
            # store's images are never mounted in this namespace.
            from grootfs_py import mounts

            if mounts.find(rootfs) is None:
                return False
            raise MountError(f"unmount {rootfs}: unmounting needs root") from None
        if exc.errno == errno.EBUSY:
            # A process still has files open in the container's root; detach it
            # now so the image can go, the kernel frees it when they close.
            log.info("rootfs busy; detaching lazily", rootfs=rootfs)
            linux.umount(rootfs, linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
            return True
        raise MountError(f"unmount {rootfs}: {exc.strerror}") from None
    return True
