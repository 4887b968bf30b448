"""Images: one container's root filesystem, an overlay of shared layers.

A create claims ``images/<id>`` with mkdir (so two creates of one id cannot
both win) and holds the directory's flock until it is done, records the
image's layers while it still holds them shared (so clean never takes them
away), and writes ``image.json`` last: an image directory without it whose
lock is free is one whose create was killed. Every step registers its undo, and a
failed create unwinds all of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from grootfs_py import fsutil, linux, locks, log, metrics, overlay, settle, sources, volumes
from grootfs_py.errors import InvalidArgumentError, StoreError
from grootfs_py.idmap import IdMap
from grootfs_py.store import Store

OCI_VERSION = "1.0.2"
IMAGE_JSON = "image.json"


class CreateOptions(NamedTuple):
    without_mount: bool = False
    volatile_rootfs: bool = False
    disk_limit_size_bytes: int = 0
    exclude_image_from_quota: bool = False
    source: sources.SourceOptions = sources.SourceOptions()


def check_id(image_id: str) -> None:
    if "/" in image_id:
        raise InvalidArgumentError(f"id `{image_id}` contains invalid characters: `/`")
    if image_id in ("", ".", "..") or "\0" in image_id or image_id.startswith("."):
        raise InvalidArgumentError(f"id `{image_id}` is not a valid image id")


def create(
    store: Store, url: str, image_id: str, options: CreateOptions, *, settle_later: bool = False
) -> dict[str, Any]:
    """Create the image and return the runtime-spec JSON Garden reads.

    The layers it unpacked are on disk when it returns, unless *settle_later*:
    then the caller calls :func:`settle.detach` once it has answered (the
    command does), and until then their markers stand for the flush.
    """
    try:
        # Timed whether it succeeds or not, as GrootFS times it.
        with metrics.timed("ImageCreationTime"):
            return _create(store, url, image_id, options)
    finally:
        if not settle_later:
            settle.now(store)


def _create(store: Store, url: str, image_id: str, options: CreateOptions) -> dict[str, Any]:
    check_id(image_id)
    store.require_initialized()
    if store.rootless:
        _check_rootless(store, options)
    if options.disk_limit_size_bytes > 0 and not store.info().quotas:
        raise StoreError(
            "disk limits are not available: the store is not on XFS with project quotas"
        )
    idmap = store.idmap()
    image_dir = store.image_dir(image_id)
    with store.lock(shared=True, waits=metrics.SHARED_LOCKS):
        if os.path.lexists(image_dir) and not _take_over_unfinished(store, image_id):
            raise StoreError(f"image for id `{image_id}` already exists")
        image = sources.resolve(url, options.source)
        limit = options.disk_limit_size_bytes
        inclusive = limit > 0 and not options.exclude_image_from_quota
        chain_ids = [layer.chain_id for layer in image.layers]
        budget = None
        if inclusive:
            cached = sum(store.volume_size(c) for c in chain_ids if volumes.usable(store, c))
            if cached > limit:
                raise StoreError("disk limit is smaller than volume size")
            missing = [layer for layer in image.layers if not volumes.usable(store, layer.chain_id)]
            if sum(layer.blob_size or 0 for layer in missing) > limit - cached:
                # Checked before any download: the compressed bytes alone do not fit.
                raise StoreError("layers exceed disk quota")
            budget = volumes.Budget(limit - cached)
        with volumes.in_use(store, image.layers, idmap, budget):
            base_size = sum(store.volume_size(c) for c in chain_ids)
            quota_bytes = 0
            if limit > 0:
                quota_bytes = limit - base_size if inclusive else limit
                if quota_bytes < 0:
                    raise StoreError("disk limit is smaller than volume size")
            _make_image(
                store, url, image_id, options, idmap, image.env, chain_ids, base_size, quota_bytes
            )

    log.info("image created", id=image_id, layers=len(chain_ids), source=url)
    rel_dir = os.path.join("images", image_id)
    shorts = [overlay.short_name(c) for c in reversed(chain_ids)]
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {"user": {"uid": 0, "gid": 0}, "env": list(image.env), "cwd": ""},
        "root": {"path": os.path.join(image_dir, "rootfs")},
    }
    if options.without_mount:
        mount_options = overlay.absolute_options(store.path, rel_dir, shorts)
        if store.rootless:
            # Its layers mark opaque directories with user.overlay.* (see unpack.py).
            mount_options += ",userxattr"
        spec["mounts"] = [
            {
                "destination": "/",
                "type": "overlay",
                "source": "overlay",
                "options": [mount_options],
            }
        ]
    return spec


def _check_rootless(store: Store, options: CreateOptions) -> None:
    """Refuse, in one line, what a non-root user cannot do."""
    if not options.without_mount:
        raise InvalidArgumentError(
            "a non-root user cannot mount the image: create it with --without-mount "
            "(or create.without_mount) and mount the overlay from the output's mounts"
        )
    if options.disk_limit_size_bytes > 0:
        raise InvalidArgumentError(
            "disk limits need root: a non-root user cannot set XFS project quotas"
        )
    if store.idmap().identity:
        raise StoreError(
            "store has no id mappings: a non-root user needs a store that root initialised "
            "with --uid-mapping and --gid-mapping for it"
        )


def _make_image(
    store: Store,
    url: str,
    image_id: str,
    options: CreateOptions,
    idmap: IdMap,
    env: Sequence[str],
    chain_ids: list[str],
    base_size: int,
    quota_bytes: int,
) -> None:
    """Claim, fill, mount and record the image directory; undo it all on failure."""
    image_dir = store.image_dir(image_id)
    limit = options.disk_limit_size_bytes
    with contextlib.ExitStack() as undo:
        claim = _claim(store, image_id, image_dir)
        undo.callback(os.close, claim)
        undo.callback(store.remove_tree, image_dir)
        fsutil.crash_point("create-after-claim")
        project_id = 0
        if limit > 0:
            project_id = _limit_directory(store, image_id, image_dir, quota_bytes, undo)

        deps = store.dependency_file(image_id)
        fsutil.write_json(deps, {"layers": chain_ids})
        undo.callback(fsutil.unlink_quietly, deps)

        for sub, mode in (("diff", 0o755), ("workdir", 0o700), ("rootfs", 0o755)):
            os.mkdir(os.path.join(image_dir, sub), mode)
        for target in (image_dir, *(os.path.join(image_dir, s) for s in ("diff", "rootfs"))):
            os.chown(target, idmap.root_uid, idmap.root_gid)

        volatile = False
        if not options.without_mount:
            volatile = mount(store, image_id, chain_ids, volatile=options.volatile_rootfs)
            undo.callback(overlay.unmount, os.path.join(image_dir, "rootfs"))

        fsutil.crash_point("create-before-image-json")
        fsutil.write_json(
            os.path.join(image_dir, IMAGE_JSON),
            {
                "id": image_id,
                "source": url,
                "base_size": base_size,
                "quota_size_bytes": quota_bytes,
                "project_id": project_id,
                "mounted": not options.without_mount,
                "env": list(env),
                "layers": chain_ids,
                # A volatile upper is whole only within the boot that mounted it.
                **({"volatile_boot": linux.boot_id()} if volatile else {}),
            },
        )
        undo.pop_all()
        os.close(claim)


def mount(store: Store, image_id: str, chain_ids: Sequence[str], *, volatile: bool = False) -> bool:
    """Mount the image's overlay; True if the mount is volatile (see overlay.mount)."""
    shorts = [overlay.short_name(c) for c in reversed(chain_ids)]
    return overlay.mount(store.path, os.path.join("images", image_id), shorts, volatile=volatile)


# A clean can take an image directory for debris in the instant between our
# mkdir and our flock; then we claim again.
_CLAIM_ATTEMPTS = 3


def _claim(store: Store, image_id: str, image_dir: str) -> int:
    """mkdir the image directory and hold its flock; return the fd holding it.

    The flock tells clean that the create is alive: a directory without
    image.json whose lock is free belongs to a create that was killed.
    """
    for _ in range(_CLAIM_ATTEMPTS):
        try:
            os.mkdir(image_dir, 0o755)
        except FileExistsError:
            if _take_over_unfinished(store, image_id):
                continue
            raise StoreError(f"image for id `{image_id}` already exists") from None
        try:
            fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # a clean took it for debris even before we opened it
        try:
            locks.wait(fd, image_dir)
            if _same_inode(fd, image_dir):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise StoreError(f"claim image `{image_id}`: taken away by clean {_CLAIM_ATTEMPTS} times")


def _take_over_unfinished(store: Store, image_id: str) -> bool:
    """Remove the directory of a killed create of this id; False if it is a real image.

    Garden retries a create whose process died, and that retry must succeed.
    """
    image_dir = store.image_dir(image_id)
    try:
        fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return not os.path.lexists(image_dir)
    try:
        if not locks.try_lock(fd) or os.path.exists(os.path.join(image_dir, IMAGE_JSON)):
            return False  # complete, or its create is still running
        log.info("removing unfinished image of a killed create", id=image_id)
        remove(store, image_id)
        return True
    finally:
        os.close(fd)


def _same_inode(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _limit_directory(
    store: Store, image_id: str, image_dir: str, quota_bytes: int, undo: contextlib.ExitStack
) -> int:
    """Give *image_dir* its own project with a hard limit; return the project id.

    Runs before diff/ and workdir/ exist, so both inherit the project.
    """
    from grootfs_py import quota

    ids = quota.ProjectIds(store.join("projectids"))
    project_id = ids.allocate(image_id)
    undo.callback(ids.free, project_id)
    device = quota.device_of(store.path)
    try:
        quota.set_project(image_dir, project_id)
        # A zero limit means "no limit" to XFS; an image with no room left
        # gets the smallest limit there is instead.
        quota.set_limit(device, project_id, max(quota_bytes, 1))
    except OSError as exc:
        raise StoreError(f"apply disk limit to image `{image_id}`: {exc.strerror}") from None
    undo.callback(release_project, store, project_id)
    return project_id


def release_project(store: Store, project_id: int) -> None:
    """Drop the project's limit and free its id (its files must be gone)."""
    from grootfs_py import quota

    try:
        device: str | None = quota.device_of(store.path)
    except StoreError:
        device = None
    quota.release(device, quota.ProjectIds(store.join("projectids")), project_id)


def id_from_argument(store: Store, id_or_path: str) -> str | None:
    """The image id named by an id or by a path inside ``<store>/images/``."""
    if "/" not in id_or_path:
        return id_or_path
    images = store.join("images") + "/"
    path = os.path.abspath(id_or_path)
    if not path.startswith(images):
        return None  # Garden asks both stores; a path in the other one is not ours.
    return path[len(images) :].split("/", 1)[0] or None


def delete(store: Store, id_or_path: str) -> str | None:
    """Delete the image; return its id, or None when there is no such image."""
    image_id = id_from_argument(store, id_or_path)
    if image_id is None:
        return None
    check_id(image_id)
    image_dir = store.image_dir(image_id)
    if not os.path.lexists(image_dir):
        return None  # as GrootFS: no metric for an image that is not there
    with metrics.timed("ImageDeletionTime"):
        return _delete(store, image_id, image_dir)


def _delete(store: Store, image_id: str, image_dir: str) -> str | None:
    with store.lock(shared=True):
        try:
            fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            # A create of this id in progress finishes (or fails and unwinds) first.
            locks.wait(fd, image_dir)
            if not _same_inode(fd, image_dir) or not remove(store, image_id):
                return None  # a concurrent delete (or a failed create) took it
        finally:
            os.close(fd)
    log.info("image deleted", id=image_id)
    return image_id


def remove(store: Store, image_id: str) -> bool:
    """Unmount and remove an image, its records and its project; False if it is gone.

    The caller holds the image directory's lock. Also used by clean and
    check-store for the directories of creates that were killed.
    """
    image_dir = store.image_dir(image_id)
    project_id = 0
    chain_ids: list[str] = []
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        record = fsutil.read_json(os.path.join(image_dir, IMAGE_JSON))
        project_id = int(record.get("project_id", 0))
        chain_ids = [c for c in record.get("layers", ()) if isinstance(c, str)]
    overlay.unmount(os.path.join(image_dir, "rootfs"))
    trashed = store.trash(image_dir, f"image-{image_id}")
    if not trashed:
        return False
    fsutil.crash_point("delete-after-trash")
    from grootfs_py import mounts

    left = mounts.under(trashed)
    if left:
        # Never remove a tree through a live mount.
        raise StoreError(f"delete image {image_id}: {left[0]} is still mounted")
    fsutil.unlink_quietly(store.dependency_file(image_id))
    _mark_released(store, chain_ids)
    store.remove_tree(trashed)
    if project_id:
        release_project(store, project_id)
    return True


def _mark_released(store: Store, chain_ids: Sequence[str]) -> None:
    """Touch the size records of the layers an image let go of.

    A layer's record then dates its last release (or its unpack), which is
    how the metrics tell how long an unused layer has waited for a clean.
    """
    for chain_id in chain_ids:
        with contextlib.suppress(OSError):
            os.utime(store.volume_meta(chain_id))


def list_paths(store: Store) -> list[str]:
    store.require_initialized()
    return [
        store.image_dir(i)
        for i in store.image_ids()
        if os.path.exists(os.path.join(store.image_dir(i), IMAGE_JSON))
    ]


def read_image(store: Store, image_id: str) -> dict[str, Any]:
    check_id(image_id)
    store.require_initialized()
    try:
        data = fsutil.read_json(os.path.join(store.image_dir(image_id), IMAGE_JSON))
    except FileNotFoundError:
        raise StoreError(f"image `{image_id}` not found") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"read image `{image_id}`: {exc}") from None
    if not isinstance(data, dict):
        raise StoreError(f"read image `{image_id}`: invalid record")
    return data


def stats(store: Store, image_id: str) -> dict[str, Any]:
    record = read_image(store, image_id)
    base = int(record.get("base_size", 0))
    quota_bytes = int(record.get("quota_size_bytes", 0))
    project_id = int(record.get("project_id", 0))
    if project_id:
        from grootfs_py import quota

        if store.rootless:
            # quotactl answers a project's usage to CAP_SYS_ADMIN only.
            raise StoreError(
                f"read disk usage of image `{image_id}`: it has a disk limit, and reading "
                "an XFS project quota needs root"
            )
        try:
            exclusive, _ = quota.usage(quota.device_of(store.path), project_id)
        except OSError as exc:
            raise StoreError(f"read disk usage of image `{image_id}`: {exc.strerror}") from None
    else:
        diff = os.path.join(store.image_dir(image_id), "diff")
        exclusive, complete = fsutil.disk_usage_checked(diff)
        if not complete and store.rootless:
            # The container wrote directories of other ids that its user cannot list.
            from grootfs_py import userns

            exclusive = userns.disk_usage(store, diff)
    return {
        "disk_usage": {
            "total_bytes_used": base + exclusive,
            "exclusive_bytes_used": exclusive,
            "quota_size_bytes": quota_bytes,
            "committed_space_bytes": base + quota_bytes,
        }
    }
