"""Garbage collection: remove layers that no image uses, and leftovers.

Clean runs alongside creates and deletes (it shares the store lock with
them) and decides what is garbage under the finer locks (see
:mod:`grootfs_py.locks`):

- a layer is removed only under its exclusive lock, after the dependency
  records are read again under that lock: a create holds the lock of every
  layer it uses shared until its image's record is written, so either clean
  sees the record or the create waits and finds the layer gone (and unpacks
  it again). Busy locks are skipped, never waited for.
- an ``-incomplete-`` layer is debris when its layer lock is free (unpacks
  hold it); an image directory without ``image.json`` when its own flock is
  free (creates hold it); a ``tmp/`` entry when the process named in it is
  gone; records and project ids when their image is gone; a layer's size
  record and flush marker (settle.py) when the layer is gone and its lock
  is free.

Removal is two-phase: renamed aside under the lock, deleted after it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Literal

from grootfs_py import fsutil, locks, log, metrics, overlay, settle, volumes
from grootfs_py.errors import StoreError
from grootfs_py.store import INCOMPLETE, Store, chain_id_of

DEFAULT_DEADLINE = 600.0

Outcome = Literal["completed", "below threshold", "already running"]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, doing: str = "") -> float:
        """Seconds left; raises once the deadline has passed."""
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise StoreError(
                f"clean store: passed its deadline of {self.seconds:g}s"
                + (f" {doing}" if doing else "")
            )
        return remaining


def committed_bytes(store: Store) -> int:
    """What the store has promised: every layer's size plus every image's quota."""
    total = sum(store.volume_size(c) for c in store.complete_volumes())
    for image_id in store.image_ids():
        with contextlib.suppress(OSError, ValueError):
            record = fsutil.read_json(os.path.join(store.image_dir(image_id), "image.json"))
            total += int(record.get("quota_size_bytes", 0))
    return total


def clean(
    store: Store, *, threshold_bytes: int = 0, deadline_seconds: float = DEFAULT_DEADLINE
) -> Outcome:
    """Collect unused layers and leftovers, one clean per store at a time."""
    store.require_initialized()
    deadline = Deadline(deadline_seconds)
    start_ns = time.monotonic_ns()
    only_clean = locks.try_acquire(store.join("locks", "clean.lock"))
    if only_clean is None:
        log.info("clean already running")
        return "already running"  # no metric: this run did no cleaning to time
    metrics.EXCLUSIVE_LOCKS.add(time.monotonic_ns() - start_ns)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(metrics.timed("ImageCleanTime"))
            try:
                timeout = min(locks.DEFAULT_TIMEOUT, deadline.left())
                stack.enter_context(
                    store.lock(shared=True, timeout=timeout, waits=metrics.SHARED_LOCKS)
                )
            except StoreError:
                deadline.left("waiting for the store lock")
                raise
            if threshold_bytes > 0:
                committed = committed_bytes(store)
                if committed <= threshold_bytes:
                    log.info(
                        "threshold not reached", committed=committed, threshold=threshold_bytes
                    )
                    return "below threshold"
            remove_debris(store, deadline)
            removed = _remove_unused_layers(store, deadline)
            _remove_dangling_links(store)
            _remove_orphan_sizes(store)
            _remove_orphan_markers(store)
    finally:
        os.close(only_clean)
    log.info("clean completed", layers_removed=removed)
    return "completed"


def remove_debris(store: Store, deadline: Deadline) -> None:
    """Remove what killed creates, deletes and cleans left behind."""
    _remove_incomplete_layers(store)
    deadline.left()
    _remove_incomplete_images(store)
    deadline.left()
    _remove_trash(store, deadline)
    # Records first, images second: a record is written after its image's
    # directory, so one seen first whose directory is gone afterwards is stale.
    records = store.dependencies()
    images = set(store.image_ids())
    for image_id in records:
        if image_id not in images and not os.path.lexists(store.image_dir(image_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.dependency_file(image_id))
                log.info("removed dependency record of missing image", id=image_id)
    _release_orphan_projects(store)


def _remove_incomplete_layers(store: Store) -> None:
    by_layer: dict[str, list[str]] = {}
    for name in os.listdir(store.join("volumes")):
        if INCOMPLETE in name:
            by_layer.setdefault(name.partition(INCOMPLETE)[0], []).append(name)
    for hex_id, names in by_layer.items():
        fd = locks.try_acquire(store.layer_lock(chain_id_of(hex_id)))
        if fd is None:
            continue  # being unpacked right now
        try:
            trashed = [store.trash(store.join("volumes", n), "incomplete") for n in names]
        finally:
            os.close(fd)
        for path in trashed:
            log.info("removing incomplete layer", path=path)
            store.remove_tree(path)


def _remove_incomplete_images(store: Store) -> None:
    from grootfs_py import images

    for image_id in store.image_ids():
        image_dir = store.image_dir(image_id)
        if os.path.exists(os.path.join(image_dir, images.IMAGE_JSON)):
            continue
        try:
            fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            if not locks.try_lock(fd):
                continue  # its create is alive
            if not os.path.exists(os.path.join(image_dir, images.IMAGE_JSON)):
                log.info("removing image its create left unfinished", id=image_id)
                images.remove(store, image_id)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_trash(store: Store, deadline: Deadline) -> None:
    """Delete what deletes and cleans renamed aside and were killed before deleting."""
    from grootfs_py import mounts

    for name in os.listdir(store.join("tmp")):
        deadline.left()
        # Names are <label>-<pid>-<random> (Store.trash): the owner deletes its own.
        pid = name.rsplit("-", 2)[-2] if name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path = store.join("tmp", name)
        for point in [*mounts.under(path), path]:
            overlay.unmount(point)
        log.info("removing leftover", path=path)
        try:
            store.remove_tree(path)
        except StoreError as exc:
            if not store.rootless:
                raise
            # Files of ids outside the user's mappings (root mounted the image):
            # only root can remove them; the rest of the clean still runs.
            log.error("cannot remove leftover without root", path=path, error=str(exc))


def _release_orphan_projects(store: Store) -> None:
    """Free project ids whose image is gone (a delete killed before freeing them)."""
    from grootfs_py import quota

    ids = quota.ProjectIds(store.join("projectids"))
    owners = ids.owners()  # before the images: ids are allocated after the mkdir
    images = set(store.image_ids())
    orphans = [pid for pid, owner in owners.items() if owner not in images]
    if not orphans:
        return
    device = quota.device_of(store.path) if store.info().quotas else None
    for project_id in orphans:
        if os.path.lexists(store.image_dir(owners[project_id])):
            continue
        quota.release(device, ids, project_id)
        log.info("freed orphan project id", project_id=project_id)


def _remove_unused_layers(store: Store, deadline: Deadline) -> int:
    in_use = {c for layers in store.dependencies().values() for c in layers}
    candidates = [c for c in store.complete_volumes() if c not in in_use]
    held: dict[str, int] = {}
    trashed: list[str] = []
    try:
        for chain_id in candidates:
            fd = locks.try_acquire(store.layer_lock(chain_id))
            if fd is not None:
                held[chain_id] = fd
        deadline.left()
        # Again, under the locks: a create records its image's layers before
        # it lets go of them.
        in_use = {c for layers in store.dependencies().values() for c in layers}
        for chain_id in held:
            if chain_id not in in_use:
                log.info("removing unused layer", chain_id=chain_id)
                if path := volumes.remove(store, chain_id):
                    trashed.append(path)
    finally:
        for fd in held.values():
            os.close(fd)
    for path in trashed:
        deadline.left()
        store.remove_tree(path)
    return len(trashed)


def _remove_dangling_links(store: Store) -> None:
    folder = store.join(overlay.LINKS_DIR)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            continue
        try:
            target = os.path.basename(os.readlink(path))
        except FileNotFoundError:
            continue
        fd = locks.try_acquire(store.layer_lock(chain_id_of(target)))
        if fd is None:
            continue  # its layer is being unpacked: the link is about to resolve
        try:
            if not os.path.exists(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        finally:
            os.close(fd)


def _remove_orphan_markers(store: Store) -> None:
    """Flush markers (settle.py) whose layer never got its name (an unpack killed after it)."""
    for name in settle.markers(store):
        chain_id = chain_id_of(name)
        _if_layer_gone(store, chain_id, partial(settle.forget, store, chain_id))


def _remove_orphan_sizes(store: Store) -> None:
    """Size records whose layer is gone (a clean killed after moving the layer aside)."""
    for name in os.listdir(store.join("meta")):
        if not name.startswith("volume-") or ".tmp-" in name:
            continue
        chain_id = chain_id_of(name[len("volume-") :])
        _if_layer_gone(store, chain_id, partial(fsutil.unlink_quietly, store.join("meta", name)))


def _if_layer_gone(store: Store, chain_id: str, remove: Callable[[], None]) -> None:
    """Call *remove* if the layer is not in the store and no unpack of it is running.

    An unpack holds the layer's lock and writes its size record and marker
    before the rename: with the lock, a record without its layer is debris.
    """
    if os.path.isdir(store.volume_dir(chain_id)):
        return
    fd = locks.try_acquire(store.layer_lock(chain_id))
    if fd is None:
        return
    try:
        if not os.path.isdir(store.volume_dir(chain_id)):
            remove()
    finally:
        os.close(fd)
