"""What the store holds, measured for the metrics a command sends at its end.

Read from the store's records, as GrootFS does: a layer's size is its
``meta/volume-<hex>`` record, a layer is used when some image's dependency
record names it, an image's committed quota is the ``quota_size_bytes`` of its
``image.json``, and the backing store's usage is what the file system says
(statfs). Imported only when metrics are on. Nothing here raises: a figure
that cannot be read is logged and not sent (sending 0 would be a lie).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import NamedTuple

from grootfs_py import fsutil, log, metrics
from grootfs_py.errors import GrootError
from grootfs_py.store import Store


class LayerUsage(NamedTuple):
    used_bytes: int
    unused_bytes: int
    # The newest of unpack and last release (see images.remove) of the
    # unused layer released longest ago; None when every layer is used.
    oldest_unused_since: float | None


def layers(store: Store) -> LayerUsage:
    """Sizes of the layers some image uses and of those none uses."""
    in_use = {c for chain_ids in store.dependencies().values() for c in chain_ids}
    used = unused = 0
    oldest: float | None = None
    for chain_id in store.complete_volumes():
        size = store.volume_size(chain_id)
        if chain_id in in_use:
            used += size
            continue
        unused += size
        with contextlib.suppress(FileNotFoundError):  # removed by a clean meanwhile
            since = os.stat(store.volume_meta(chain_id)).st_mtime
            oldest = since if oldest is None else min(oldest, since)
    return LayerUsage(used, unused, oldest)


def committed_quota(store: Store) -> int:
    """The sum of the images' disk quotas (what their projects may still grow by)."""
    total = 0
    for image_id in store.image_ids():
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            record = fsutil.read_json(os.path.join(store.image_dir(image_id), "image.json"))
            total += int(record.get("quota_size_bytes", 0))
    return total


def filesystem(store: Store) -> tuple[int, int]:
    """(size, used) in bytes of the file system holding the store."""
    st = os.statvfs(store.path)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def send_layers(store: Store, fs_size: int | None = None) -> int | None:
    """Record GrootFS's two layer sizes and our cache figures; return the layers' total."""
    try:
        found = layers(store)
        if fs_size is None:
            fs_size = filesystem(store)[0]
    except (OSError, GrootError) as exc:
        log.error("measure layers for metrics", error=str(exc))
        return None
    metrics.value("UnusedLayersSize", found.unused_bytes, metrics.BYTES)
    metrics.value("UsedLayersSize", found.used_bytes, metrics.BYTES)
    total = found.used_bytes + found.unused_bytes
    metrics.value("DiskCachePercentage", _percent(total, fs_size), metrics.PERCENTAGE)
    metrics.value(
        "DiskPurgeableCachePercentage", _percent(found.unused_bytes, fs_size), metrics.PERCENTAGE
    )
    age = 0.0 if found.oldest_unused_since is None else time.time() - found.oldest_unused_since
    metrics.value("OldestUnusedLayerAge", max(age, 0.0), metrics.SECONDS)
    return total


def send_after_create(store: Store, *, with_clean: bool) -> None:
    """What GrootFS sends after a create, plus DiskCommittedPercentage.

    With ``--with-clean`` the layer sizes are left to the clean it starts,
    which sends them once it is done, as GrootFS does.
    """
    try:
        fs_size, fs_used = filesystem(store)
    except OSError as exc:
        log.error("measure store for metrics", error=exc.strerror)
        return
    total = None if with_clean else send_layers(store, fs_size)
    try:
        if total is None:
            total = sum(store.volume_size(c) for c in store.complete_volumes())
        committed = committed_quota(store)
    except (OSError, GrootError) as exc:
        log.error("measure store for metrics", error=str(exc))
        return
    metrics.value("DownloadedLayersSizeInBytes", total, metrics.BYTES)
    metrics.value("CommittedQuotaInBytes", committed, metrics.BYTES)
    metrics.value("UsedBackingStoreInBytes", fs_used, metrics.BYTES)
    metrics.value(
        "DiskCommittedPercentage", _percent(total + committed, fs_size), metrics.PERCENTAGE
    )
