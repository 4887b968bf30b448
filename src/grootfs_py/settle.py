"""Layers flushed to disk after their create has answered, without losing the guarantee.

A layer at its final name (``volumes/<hex>``) must be whole, after a crash
too. The plain way is to flush the store's filesystem (syncfs(2)) before
renaming the layer into place: a cold create then waits for its whole layer
to be written out, ~15% of a cold create of a 206 MB stack tar here. On the
store init-store makes (XFS on a loop device) the flush waits until after
the create has answered, and a marker stands in for it meanwhile:

1. Before the rename, the create makes ``meta/unsettled/<hex>``, a symlink
   whose target names the store's *epoch*: this boot and this attachment of
   its loop device (``<boot id>/<disk sequence number>/<token>``). A
   symlink is metadata only: no data block to be lost.
2. Once the create has answered, a process it leaves behind (the
   *settler*) flushes the store with syncfs(2) and then removes the
   marker, holding the layer's lock shared from before the flush until the
   marker is gone, so the layer it flushed is the layer whose marker it
   removes (removing or unpacking a layer needs the lock exclusively).
3. A layer with a marker from another epoch is *suspect*: a create that
   needs it moves it aside and unpacks it again, and check-store will not
   remount an image on it. A marker from this epoch changes nothing: the
   filesystem has been neither lost in a crash nor shut down and mounted
   again since the layer was written, so what the kernel holds is the layer.

Why that is as safe as the flush before the rename: XFS logs metadata
changes in the order they are made, and log recovery replays a prefix of
them. So if a crash keeps the rename, it keeps the marker made before it.
The marker goes only after a flush that returned without an error, or
with the layer (moved aside first). Whatever loses the data the kernel
held, a crash or XFS shutting the filesystem down after an I/O error, ends
the epoch: a new boot, or (to use the filesystem again without one) an
unmount, which detaches an autoclear loop device, and a mount, which
attaches one with a new disk sequence number (Linux 5.15). After it, a
layer at its final name either reached the disk whole or carries a marker
from an epoch that is over, and it is not used. The flush reports any
writeback error since the store was opened for it, which happens before
the layer's first byte is written, and the settler inherits that open file.

The cost: a settler killed before its flush (or whose flush fails) leaves
its markers, and those layers are unpacked again in the next epoch, even
after a clean reboot, which cannot be told from a crash. Any other store
(another filesystem, a block device of its own, a loop device without
autoclear) keeps the flush before the rename (:func:`begin` says which).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from grootfs_py import fsutil, linux, locks, log
from grootfs_py.errors import GrootError
from grootfs_py.store import chain_id_of, volume_name

if TYPE_CHECKING:
    from grootfs_py.store import Store

XFS_SUPER_MAGIC = 0x58465342
LOOP_MAJOR = 7
# How long a settler waits for check-store (which holds the store lock alone).
STORE_LOCK_TIMEOUT = 60.0


class Pending:
    """The markers one create has made, and the store opened before its first layer's data."""

    def __init__(self, fd: int, epoch: str) -> None:
        self.fd = fd
        self.epoch = epoch
        self.marked: dict[str, str] = {}  # chain id -> the marker's target


def directory(store: Store) -> str:
    return store.join("meta", "unsettled")


def marker(store: Store, chain_id: str) -> str:
    return os.path.join(directory(store), volume_name(chain_id))


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _epoch(fd: int) -> str | None:
    """The store's epoch (see above); None unless it is XFS on an autoclear loop device."""
    dev = os.fstat(fd).st_dev
    if os.major(dev) != LOOP_MAJOR or linux.filesystem_magic(fd) != XFS_SUPER_MAGIC:
        return None
    block = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    try:
        if _read(f"{block}/loop/autoclear") != "1":
            return None
        sequence = _read(f"{block}/diskseq")
    except OSError:  # no sysfs, or a kernel before diskseq
        return None
    return f"{linux.boot_id()}/{sequence}"


def epoch(store: Store) -> str | None:
    fd = os.open(store.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _epoch(fd)
    finally:
        os.close(fd)


def begin(store: Store) -> Pending | None:
    """Before this process writes its first layer: whether its layers may settle later.

    Opens the store (kept in :attr:`Pending.fd`, once per process) so that
    the flush reports every writeback error from now on. None: flush each
    layer before its rename.
    """
    if store.pending is not None:
        return store.pending
    fd = os.open(store.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    current = _epoch(fd)
    if current is None:
        os.close(fd)
        return None
    store.pending = Pending(fd, current)
    return store.pending


def mark(store: Store, pending: Pending, chain_id: str) -> None:
    """Mark the layer as unsettled in this epoch; its lock is held exclusively."""
    target = f"{pending.epoch}/{os.getpid()}-{os.urandom(4).hex()}"
    path = marker(store, chain_id)
    try:
        os.symlink(target, path)
    except FileNotFoundError:  # a store made before this directory was in its layout
        os.makedirs(directory(store), exist_ok=True)
        os.symlink(target, path)
    except FileExistsError:
        # Left by a crash, or by a layer that was moved aside: no volume goes
        # with it, so a moment without any marker is harmless.
        os.unlink(path)
        os.symlink(target, path)
    pending.marked[chain_id] = target


def suspect(store: Store, chain_id: str) -> bool:
    """Whether the layer was unpacked in an epoch that ended before it was flushed."""
    try:
        target = os.readlink(marker(store, chain_id))
    except FileNotFoundError:
        return False
    except OSError:  # not a symlink: not ours to trust
        return True
    return target.rpartition("/")[0] != epoch(store)


def forget(store: Store, chain_id: str) -> None:
    """Remove the layer's marker; the layer has been moved aside (its lock held exclusively)."""
    fsutil.unlink_quietly(marker(store, chain_id))


def markers(store: Store) -> dict[str, str]:
    """Every marker in the store: its file name -> the epoch it names ("" if unreadable)."""
    found = {}
    try:
        names = os.listdir(directory(store))
    except FileNotFoundError:
        return {}
    for name in names:
        try:
            found[name] = os.readlink(os.path.join(directory(store), name)).rpartition("/")[0]
        except OSError:
            found[name] = ""
    return found


def lost(store: Store) -> set[str]:
    """Chain ids of the layers whose markers name an epoch that is over: :func:`suspect`'s,
    for every layer at once."""
    current = epoch(store)
    return {chain_id_of(name) for name, named in markers(store).items() if named != current}


def _take(store: Store) -> Pending | None:
    """This process's pending layers, taken from the store; None if there are none to settle."""
    pending, store.pending = store.pending, None
    if pending is not None and not pending.marked:
        os.close(pending.fd)
        return None
    return pending


def _settle_logged(store: Store, pending: Pending) -> bool:
    """:func:`settle`, a failure logged: its markers stay, and those layers are unpacked
    again in the next epoch."""
    try:
        settle(store, pending)
    except (OSError, GrootError) as exc:
        log.error("settling layers failed", error=str(exc), layers=sorted(pending.marked))
        return False
    return True


def now(store: Store) -> None:
    """Settle this process's marked layers here and now (a caller that is not a command)."""
    pending = _take(store)
    if pending is None:
        return
    try:
        _settle_logged(store, pending)
    finally:
        os.close(pending.fd)


def detach(store: Store) -> None:
    """Leave a settler behind for this create's marked layers, if there are any.

    Called once the create has answered. The settler is a forked child in a
    session of its own, with nothing open but the store and the log file:
    no pipe of the caller's stays open (Garden reads stdout to its end) and
    no lock of this process is held any longer than by this process.
    """
    pending = _take(store)
    if pending is None:
        return
    if os.fork() != 0:
        os.close(pending.fd)
        return
    # The settler: a copy of this process that must not act as it. No
    # finalizer may run and close a number that closerange freed.
    import gc

    gc.disable()
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        start = 3
        for keep in sorted({pending.fd, log.file_fd() or pending.fd}):
            os.closerange(start, keep)
            start = keep + 1
        os.closerange(start, 1 << 20)
        fsutil.crash_point("settle-before-flush")
        if _settle_logged(store, pending):
            code = 0
    finally:
        os._exit(code)


def settle(store: Store, pending: Pending) -> None:
    """Flush the store, then remove the markers of the layers still as *pending* marked them."""
    with store.lock(shared=True, timeout=STORE_LOCK_TIMEOUT):
        held: list[int] = []
        ours: list[str] = []
        try:
            for chain_id, target in pending.marked.items():
                # Waits out a clean removing it (the marker goes with the layer).
                held.append(locks.acquire(store.layer_lock(chain_id), shared=True))
                path = marker(store, chain_id)
                with contextlib.suppress(OSError):
                    if os.readlink(path) == target:  # else the layer was made again since
                        ours.append(path)
            if ours:
                linux.syncfs(pending.fd)
                for path in ours:
                    os.unlink(path)
                log.debug("layers settled", layers=len(ours))
        finally:
            for fd in held:
                os.close(fd)
