"""Garbage collection: remove layers that no image uses, and leftovers.

Clean takes the store lock exclusively, so while it runs no create or
delete is halfway: every ``-incomplete-`` layer, every entry in tmp/ and
every dependency record without an image is debris of a killed process.
"""

from __future__ import annotations

import contextlib
import os

from grootfs_py import fsutil, log, overlay, volumes
from grootfs_py.store import INCOMPLETE, Store

DEFAULT_DEADLINE = 600.0


def committed_bytes(store: Store) -> int:
    """What the store has promised: every layer's size plus every image's quota."""
    total = sum(store.volume_size(c) for c in store.complete_volumes())
    for image_id in store.image_ids():
        with contextlib.suppress(OSError, ValueError):
            record = fsutil.read_json(os.path.join(store.image_dir(image_id), "image.json"))
            total += int(record.get("quota_size_bytes", 0))
    return total


def clean(store: Store, *, threshold_bytes: int = 0, lock_timeout: float | None = None) -> bool:
    """Collect unused layers; False when the threshold says there is no need."""
    store.require_initialized()
    with store.lock(shared=False, timeout=lock_timeout):
        if threshold_bytes > 0:
            committed = committed_bytes(store)
            if committed <= threshold_bytes:
                log.info("threshold not reached", committed=committed, threshold=threshold_bytes)
                return False
        _remove_debris(store)
        deps = store.dependencies()
        in_use = {chain for layers in deps.values() for chain in layers}
        removed = 0
        for chain_id in store.complete_volumes():
            if chain_id not in in_use:
                volumes.remove(store, chain_id)
                removed += 1
        _remove_dangling_links(store)
    log.info("clean completed", layers_removed=removed)
    return True


def _remove_debris(store: Store) -> None:
    for name in os.listdir(store.join("volumes")):
        if INCOMPLETE in name:
            log.info("removing incomplete layer", name=name)
            fsutil.remove_tree(store.join("volumes", name))
    for name in os.listdir(store.join("tmp")):
        fsutil.remove_tree(store.join("tmp", name))
    images = set(store.image_ids())
    for image_id in store.dependencies():
        if image_id not in images:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.dependency_file(image_id))
    _release_orphan_projects(store, images)


def _release_orphan_projects(store: Store, images: set[str]) -> None:
    """Free project ids whose image is gone (a delete killed before freeing them)."""
    from grootfs_py import quota

    ids = quota.ProjectIds(store.join("projectids"))
    orphans = [pid for pid, owner in ids.owners().items() if owner not in images]
    if not orphans:
        return
    device = quota.device_of(store.path) if store.info().quotas else None
    for project_id in orphans:
        if device is not None:
            with contextlib.suppress(OSError):
                quota.set_limit(device, project_id, 0)
        ids.free(project_id)
        log.info("freed orphan project id", project_id=project_id)


def _remove_dangling_links(store: Store) -> None:
    folder = store.join(overlay.LINKS_DIR)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
