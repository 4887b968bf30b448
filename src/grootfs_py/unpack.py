"""Turn one uncompressed layer tar stream into one overlay lower directory.

The result is in overlayfs's on-disk format: an OCI whiteout ``.wh.<name>``
becomes a character device 0/0 at ``<name>`` and ``.wh..wh..opq`` becomes the
``trusted.overlay.opaque=y`` xattr on its directory.

Path resolution. The layer root is opened once and every entry's parent is
reached from it one component at a time with ``openat(O_DIRECTORY |
O_NOFOLLOW)``, so the kernel, not string checks, keeps every operation inside
the root: a symlink met as a parent is refused ("parent x is a symlink"),
never followed, and the final component is only ever used with ``dir_fd=``
and without following (``O_EXCL``/``O_NOFOLLOW``, ``follow_symlinks=False``).
This was chosen over ``openat2(RESOLVE_IN_ROOT)``, which would follow
in-layer symlinks clamped to the root, because it needs no raw syscall number
(seccomp profiles of older container runtimes answer openat2 with ENOSYS or
EPERM) and because a layer produced by diffing a filesystem never has entries
beneath a symlink of its own: a tar walk does not descend through symlinks,
and symlinks in lower layers are not visible here as each layer has its own
directory. A hand-made layer that writes through its own symlink is refused
rather than silently redirected. Directories are opened ``O_RDONLY`` rather
than ``O_PATH`` so that fchown, fchmod, fsetxattr and futimens work on the
fds themselves (the unpacker runs as root, or for a non-root user as root of a
user namespace holding every id of the layer: permissions never block the open).

Within one layer a whiteout only hides lower layers: a whiteout for a name
this layer already wrote leaves a file alone and makes a directory opaque,
and a directory written over this layer's whiteout becomes opaque.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from grootfs_py import log
from grootfs_py.errors import GrootError, InvalidArgumentError, UnpackError
from grootfs_py.idmap import IdMap
from grootfs_py.tarstream import Entry, FileSource, Reader

CHUNK_SIZE = 1 << 20
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Unpacked by a non-root user (rootless): the kernel keeps trusted.* for
# CAP_SYS_ADMIN in the initial namespace, so opaque directories are marked
# the way overlayfs reads them when mounted with -o userxattr.
USER_OPAQUE_XATTR = "user.overlay.opaque"
# Only the whiteout logic below may speak overlayfs: an image setting these
# could make directories opaque or redirect lookups into other layers.
# user.overlay.* is what overlayfs reads when mounted with -o userxattr.
_RESERVED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Consecutive entries mostly share a parent; a few dozen open directories
# cover the working set of a depth-first tar without nearing RLIMIT_NOFILE.
_FD_CACHE_SIZE = 64

Path = tuple[str, ...]
_T = TypeVar("_T")


@dataclass(frozen=True)
class UnpackResult:
    size_bytes: int  # sum of st_size of the regular files written, each inode once


class _Refused(Exception):
    """Why one entry cannot be unpacked; wrapped with the entry's name."""


class _Missing(_Refused):
    """A directory looked up without creating it does not exist."""


def unpack_layer(
    stream: BinaryIO | FileSource,
    dest: str,
    idmap: IdMap,
    *,
    layer: str,
    rootless: bool = False,
    base_directory: str = "",
    parent: str = "",
) -> UnpackResult:
    """Unpack the uncompressed tar *stream* into the empty directory *dest*.

    *rootless*: run by a non-root user in a user namespace (see userns.py):
    opaque directories get ``user.overlay.opaque``, and xattrs the kernel
    keeps from an unprivileged process (``trusted.*``, ``security.*`` other
    than file capabilities, as the kernel decides) are dropped and logged.

    The stream is read to its end, padding after the end-of-archive marker
    included, so a digest computed by a wrapping reader covers every byte.

    With *base_directory* (an absolute path, Cloud Foundry's base-directory
    annotation) every entry lands under it, whiteouts and hardlink targets
    included, and nothing can be written outside it. Its directories are made
    first, each with the mode and owner it has in *parent*, the layer below's
    directory: one missing there is an error, as is one that is a symlink.
    """
    with ExitStack() as stack:
        try:
            root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise UnpackError(f"unpack layer {layer}: open {dest}: {e.strerror}") from e
        stack.callback(os.close, root)
        unpacker = _Unpacker(root, idmap, layer, rootless=rootless)
        stack.callback(unpacker.close)
        if base_directory:
            unpacker.make_base(_clean(base_directory), parent)
        try:
            tar = Reader(stream)
            while (member := tar.next()) is not None:
                unpacker.trim()
                unpacker.entry(tar, member)
            while stream.read(CHUNK_SIZE):
                pass
            unpacker.finish()
        except GrootError:
            raise
        except Exception as e:
            # The caller decompresses with zlib, isal or zstandard, each with
            # its own error class: any failure to read the stream is a corrupt layer.
            raise UnpackError(f"unpack layer {layer}: {_reason(e)}") from e
        return UnpackResult(size_bytes=sum(unpacker.sizes.values()))


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        # A layer that expands past the store's free space (a gzip bomb, when no
        # disk limit bounds it): said plainly, the operator's cue to set limits.
        return "no space left in the store"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _clean(name: str) -> Path:
    """The components of *name* rooted at the layer, ``..`` resolved lexically."""
    split = name.split("/")
    if "" not in split and "." not in split and ".." not in split:
        return tuple(split)  # most names: nothing to resolve
    parts: list[str] = []
    for part in split:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise _Refused("path escapes the layer")
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def _times(member: Entry) -> tuple[int, int]:
    """(atime, mtime) in nanoseconds; the mtime when the archive has no atime."""
    atime = member.mtime_ns if member.atime_ns is None else member.atime_ns
    return (atime, member.mtime_ns)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _join(path: Path) -> str:
    return "/".join(path) or "."


class _Unpacker:
    def __init__(self, root: int, idmap: IdMap, layer: str, *, rootless: bool = False) -> None:
        self.root = root
        self.idmap = idmap
        self.identity = idmap.identity
        self.layer = layer
        self.rootless = rootless
        self.opaque_xattr = USER_OPAQUE_XATTR if rootless else OPAQUE_XATTR
        # Open directories by path, least recently used first. Paths never go
        # through a symlink, so a path prefix identifies everything below it.
        self.dirs: OrderedDict[Path, int] = OrderedDict()
        # fds dropped from the cache while the current entry may still use them.
        self.retired: list[int] = []
        self.dir_times: dict[Path, tuple[int, int]] = {}
        self.sizes: dict[int, int] = {}
        self._root_ids: tuple[int, int] | None = None
        self.base: Path = ()  # every entry's path starts with it

    def make_base(self, base: Path, parent: str) -> None:
        """Make the directories of *base*, copying mode and owner from the *parent* layer."""
        where = "/" + "/".join(base)
        missing = UnpackError(
            f"unpack layer {self.layer}: base directory not found in parent layer: {where}"
        )
        if not parent:
            raise missing
        try:
            at = os.open(parent, _DIR_FLAGS)
        except OSError as e:
            raise UnpackError(f"unpack layer {self.layer}: open parent layer: {e.strerror}") from e
        try:
            for i, name in enumerate(base):
                try:
                    below = os.open(name, _DIR_FLAGS, dir_fd=at)
                except FileNotFoundError:
                    raise missing from None
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(name, dir_fd=at)
                    what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise UnpackError(
                        f"unpack layer {self.layer}: base directory {where}: "
                        f"/{_join(base[: i + 1])} is {what} in the parent layer"
                    ) from None
                os.close(at)
                at = below
                st = os.fstat(at)
                fd = self.dir_fd(base[: i + 1], create=True)
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, st.st_mode & 0o7777)
        except OSError as e:
            reason = _reason(e)
            raise UnpackError(f"unpack layer {self.layer}: base directory {where}: {reason}") from e
        finally:
            os.close(at)
        self.base = base

    def close(self) -> None:
        self.trim(0)

    def trim(self, keep: int = _FD_CACHE_SIZE) -> None:
        """Close retired and surplus fds; only between entries, when none is borrowed."""
        if not self.retired and len(self.dirs) <= keep:
            return
        for fd in self.retired:
            os.close(fd)
        self.retired.clear()
        while len(self.dirs) > keep:
            os.close(self.dirs.popitem(last=False)[1])

    def root_ids(self) -> tuple[int, int]:
        if self._root_ids is None:
            self._root_ids = self._map(0, 0)
        return self._root_ids

    def _map(self, uid: int, gid: int) -> tuple[int, int]:
        if self.identity:
            return uid, gid
        try:
            return self.idmap.host_uid(uid), self.idmap.host_gid(gid)
        except InvalidArgumentError as e:
            raise _Refused(str(e)) from None

    # -- directories -------------------------------------------------------

    def dir_fd(self, path: Path, *, create: bool) -> int:
        """An fd for directory *path*, borrowed from the cache until the next trim()."""
        if not path:
            return self.root
        fd = self.dirs.get(path)
        if fd is not None:
            self.dirs.move_to_end(path)
            return fd
        start, cur = 0, self.root
        for i in range(len(path) - 1, 0, -1):
            ancestor = self.dirs.get(path[:i])
            if ancestor is not None:
                start, cur = i, ancestor
                break
        for i in range(start, len(path)):
            cur = self._open_child_dir(cur, path[: i + 1], create)
            self.dirs[path[: i + 1]] = cur
        return cur

    def _open_child_dir(self, parent: int, path: Path, create: bool) -> int:
        name = path[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise _Missing(f"directory {_join(path)} does not exist") from None
            return self._make_implicit_dir(parent, name, opaque=False)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        st = os.lstat(name, dir_fd=parent)
        if stat.S_ISLNK(st.st_mode):
            raise _Refused(f"parent {_join(path)} is a symlink")
        if create and _is_whiteout(st):
            # Deleted from lower layers, then filled again by this one: only
            # what this layer puts there may show, as overlayfs does on rename.
            os.unlink(name, dir_fd=parent)
            return self._make_implicit_dir(parent, name, opaque=True)
        raise _Refused(f"parent {_join(path)} is not a directory")

    def _make_implicit_dir(self, parent: int, name: str, *, opaque: bool) -> int:
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            os.fchown(fd, *self.root_ids())
            os.fchmod(fd, 0o755)
            if opaque:
                os.setxattr(fd, self.opaque_xattr, b"y")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _forget(self, path: Path) -> None:
        """Drop cached fds and pending times at or below a removed *path*."""
        n = len(path)
        for key in [k for k in self.dirs if k[:n] == path]:
            self.retired.append(self.dirs.pop(key))
        for key in [k for k in self.dir_times if k[:n] == path]:
            del self.dir_times[key]

    def _remove(self, parent: int, name: str, path: Path) -> os.stat_result:
        """Remove whatever is at *name* (a directory recursively); return what it was."""
        st = os.lstat(name, dir_fd=parent)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=parent)
        else:
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                self.sizes.pop(st.st_ino, None)
            os.unlink(name, dir_fd=parent)
        self._forget(path)
        return st

    def _create(self, parent: int, name: str, path: Path, make: Callable[[], _T]) -> _T:
        """Run *make* (an exclusive create of *name*), replacing an earlier entry."""
        try:
            return make()
        except FileExistsError:
            self._remove(parent, name, path)
        return make()

    # -- entries -----------------------------------------------------------

    def entry(self, tar: Reader, member: Entry) -> None:
        try:
            self._entry(tar, member)
        except GrootError:
            raise
        except _Refused as e:
            raise UnpackError(f"unpack layer {self.layer}: entry {member.name}: {e}") from None
        except (OSError, ValueError) as e:
            raise UnpackError(
                f"unpack layer {self.layer}: entry {member.name}: {_reason(e)}"
            ) from e

    def _entry(self, tar: Reader, member: Entry) -> None:
        path = self.base + _clean(member.name)
        if len(path) > len(self.base) and path[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(path)
        elif member.isdir():
            self._directory(path, member)
        elif len(path) == len(self.base):
            raise _Refused(
                "cannot replace the base directory" if path else "cannot replace the layer root"
            )
        elif member.isreg():
            self._file(tar, path, member)
        elif member.issym():
            self._symlink(path, member)
        elif member.islnk():
            self._hardlink(path, member)
        elif member.isfifo():
            self._fifo(path, member)
        elif member.isdev():
            log.debug("skip device node", layer=self.layer, entry=member.name)
        else:
            log.debug("skip entry of unknown type", layer=self.layer, entry=member.name)

    def _xattrs(self, member: Entry, *, user_allowed: bool) -> list[tuple[str, bytes]]:
        if not member.xattrs:
            return []
        found = []
        for name, value in member.xattrs.items():
            if name.startswith(_RESERVED_XATTR_PREFIXES):
                log.debug("skip reserved xattr", layer=self.layer, entry=member.name, xattr=name)
            elif self.rootless and name.startswith("trusted."):
                log.debug("skip trusted xattr: needs root", layer=self.layer, entry=member.name)
            elif not user_allowed and name.startswith("user."):
                # The kernel keeps user.* only on regular files and directories.
                log.debug("skip user xattr", layer=self.layer, entry=member.name, xattr=name)
            else:
                found.append((name, value))
        return found

    def _setxattr(self, target: int | str, name: str, value: bytes, member: Entry) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            if not self.rootless or e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            log.debug(
                "skip xattr the kernel refuses without root",
                layer=self.layer,
                entry=member.name,
                xattr=name,
            )

    def _apply(self, fd: int, member: Entry, *, user_xattrs: bool, times: bool) -> None:
        # chown first: it clears setuid/setgid and security.capability.
        os.fchown(fd, *self._map(member.uid, member.gid))
        for name, value in self._xattrs(member, user_allowed=user_xattrs):
            self._setxattr(fd, name, value, member)
        os.fchmod(fd, member.mode & 0o7777)
        if times:
            os.utime(fd, ns=_times(member))

    def _finish_file(self, fd: int, member: Entry) -> None:
        """Record a written file's size and give it its owner, xattrs, mode and times.

        The file was created with the entry's permission bits (less the
        umask): owner and mode are changed only where they differ, which for
        most files of an image (root's, 0644) saves two of seven syscalls.
        """
        st = os.fstat(fd)
        self.sizes[st.st_ino] = st.st_size
        owner = self._map(member.uid, member.gid)
        mode = member.mode & 0o7777
        if (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)  # first: it clears setuid/setgid and security.capability
        for name, value in self._xattrs(member, user_allowed=True):
            self._setxattr(fd, name, value, member)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
        os.utime(fd, ns=_times(member))

    def _directory(self, path: Path, member: Entry) -> None:
        opaque = False
        if path:
            parent, name = self.dir_fd(path[:-1], create=True), path[-1]
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                st = os.lstat(name, dir_fd=parent)
                if not stat.S_ISDIR(st.st_mode):
                    opaque = _is_whiteout(self._remove(parent, name, path))
                    os.mkdir(name, 0o700, dir_fd=parent)
        fd = self.dir_fd(path, create=False)
        self._apply(fd, member, user_xattrs=True, times=False)
        if opaque:
            os.setxattr(fd, self.opaque_xattr, b"y")
        # Children change a directory's mtime; set it at the end.
        self.dir_times[path] = _times(member)

    def _file(self, tar: Reader, path: Path, member: Entry) -> None:
        parent, name = self.dir_fd(path[:-1], create=True), path[-1]
        # The mode applies to later opens only: this fd can write even a 0444 file.
        mode = member.mode & 0o777
        fd = self._create(
            parent, name, path, lambda: os.open(name, _FILE_FLAGS, mode, dir_fd=parent)
        )
        try:
            tar.copy_to(fd)
            self._finish_file(fd, member)
        finally:
            os.close(fd)

    def _fifo(self, path: Path, member: Entry) -> None:
        parent, name = self.dir_fd(path[:-1], create=True), path[-1]
        self._create(parent, name, path, lambda: os.mkfifo(name, 0o600, dir_fd=parent))
        fd = os.open(
            name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
        )
        try:
            self._apply(fd, member, user_xattrs=False, times=True)
        finally:
            os.close(fd)

    def _symlink(self, path: Path, member: Entry) -> None:
        parent, name = self.dir_fd(path[:-1], create=True), path[-1]
        self._create(parent, name, path, lambda: os.symlink(member.linkname, name, dir_fd=parent))
        os.chown(name, *self._map(member.uid, member.gid), dir_fd=parent, follow_symlinks=False)
        # No dir_fd form of lsetxattr: name the parent through its fd instead.
        at = f"/proc/self/fd/{parent}/{name}"
        for key, value in self._xattrs(member, user_allowed=False):
            self._setxattr(at, key, value, member)
        os.utime(name, ns=_times(member), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, path: Path, member: Entry) -> None:
        missing = f"hardlink target {member.linkname} is not in this layer"
        try:
            target = self.base + _clean(member.linkname)
        except _Refused:
            raise _Refused(f"hardlink target {member.linkname} escapes the layer") from None
        if len(target) == len(self.base):
            raise _Refused("hardlink to the layer root")
        if target == path:
            log.debug("skip hardlink to itself", layer=self.layer, entry=member.name)
            return
        parent, name = self.dir_fd(path[:-1], create=True), path[-1]
        try:
            source_parent = self.dir_fd(target[:-1], create=False)
        except _Missing:
            raise _Refused(missing) from None

        def link() -> None:
            try:
                os.link(
                    target[-1],
                    name,
                    src_dir_fd=source_parent,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
            except FileNotFoundError:
                raise _Refused(missing) from None

        self._create(parent, name, path, link)

    def _whiteout(self, path: Path) -> None:
        marker = path[-1]
        if marker == OPAQUE_MARKER:
            os.setxattr(self.dir_fd(path[:-1], create=True), self.opaque_xattr, b"y")
            return
        if marker.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            log.debug("skip reserved whiteout", layer=self.layer, entry=_join(path))
            return
        name = marker[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise _Refused("invalid whiteout name")
        parent = self.dir_fd(path[:-1], create=True)
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
            os.chown(name, *self.root_ids(), dir_fd=parent, follow_symlinks=False)
            return
        # A whiteout hides lower layers only. Whatever this layer already put
        # at that name hides them too; a directory must also stop merging.
        if stat.S_ISDIR(st.st_mode):
            os.setxattr(self.dir_fd((*path[:-1], name), create=False), self.opaque_xattr, b"y")
        else:
            log.debug("whiteout of an entry of the same layer", layer=self.layer, entry=name)

    def finish(self) -> None:
        """Set directory times, deepest first, now that no child will change them."""
        # Siblings together, each set through its parent's fd: only parents are
        # opened. A directory replaced by a later entry left dir_times (_forget).
        for path in sorted(self.dir_times, key=lambda p: (-len(p), p)):
            self.trim()
            if not path:
                os.utime(self.root, ns=self.dir_times[path])
                continue
            try:
                parent = self.dir_fd(path[:-1], create=False)
            except (_Refused, OSError):
                continue
            os.utime(path[-1], ns=self.dir_times[path], dir_fd=parent, follow_symlinks=False)
