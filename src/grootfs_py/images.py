"""Images: one container's root filesystem, an overlay of shared layers.

A create claims ``images/<id>`` with mkdir (so two creates of one id cannot
both win), records the image's layers before mounting (so clean never takes
them away), and writes ``image.json`` last: an image directory without it
is one whose create did not finish. Every step registers its undo, and a
failed create unwinds all of them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, NamedTuple

from grootfs_py import fsutil, log, overlay, sources, volumes
from grootfs_py.errors import InvalidArgumentError, StoreError
from grootfs_py.store import Store

OCI_VERSION = "1.0.2"
IMAGE_JSON = "image.json"


class CreateOptions(NamedTuple):
    without_mount: bool = False
    disk_limit_size_bytes: int = 0
    exclude_image_from_quota: bool = False
    source: sources.SourceOptions = sources.SourceOptions()


def check_id(image_id: str) -> None:
    if "/" in image_id:
        raise InvalidArgumentError(f"id `{image_id}` contains invalid characters: `/`")
    if image_id in ("", ".", "..") or "\0" in image_id or image_id.startswith("."):
        raise InvalidArgumentError(f"id `{image_id}` is not a valid image id")


def create(store: Store, url: str, image_id: str, options: CreateOptions) -> dict[str, Any]:
    """Create the image and return the runtime-spec JSON Garden reads."""
    check_id(image_id)
    store.require_initialized()
    if options.disk_limit_size_bytes > 0 and not store.info().quotas:
        raise StoreError(
            "disk limits are not available: the store is not on XFS with project quotas"
        )
    idmap = store.idmap()
    image_dir = store.image_dir(image_id)
    with store.lock(shared=True):
        if os.path.lexists(image_dir):
            raise StoreError(f"image for id `{image_id}` already exists")
        image = sources.resolve(url, options.source)
        limit = options.disk_limit_size_bytes
        inclusive = limit > 0 and not options.exclude_image_from_quota
        chain_ids = [layer.chain_id for layer in image.layers]
        budget = None
        if inclusive:
            cached = sum(
                store.volume_size(c) for c in chain_ids if os.path.isdir(store.volume_dir(c))
            )
            if cached > limit:
                raise StoreError("disk limit is smaller than volume size")
            missing = [
                layer
                for layer in image.layers
                if not os.path.isdir(store.volume_dir(layer.chain_id))
            ]
            if sum(layer.blob_size or 0 for layer in missing) > limit - cached:
                # Checked before any download: the compressed bytes alone do not fit.
                raise StoreError("layers exceed disk quota")
            budget = volumes.Budget(limit - cached)
        volumes.ensure(store, image.layers, idmap, budget)
        base_size = sum(store.volume_size(c) for c in chain_ids)
        quota_bytes = 0
        if limit > 0:
            quota_bytes = limit - base_size if inclusive else limit
            if quota_bytes < 0:
                raise StoreError("disk limit is smaller than volume size")

        with contextlib.ExitStack() as undo:
            try:
                os.mkdir(image_dir, 0o755)
            except FileExistsError:
                raise StoreError(f"image for id `{image_id}` already exists") from None
            undo.callback(fsutil.remove_tree, image_dir)
            project_id = 0
            if limit > 0:
                project_id = _limit_directory(store, image_id, image_dir, quota_bytes, undo)

            deps = store.dependency_file(image_id)
            fsutil.write_json(deps, {"layers": chain_ids})
            undo.callback(_unlink_quietly, deps)

            for sub, mode in (("diff", 0o755), ("workdir", 0o700), ("rootfs", 0o755)):
                os.mkdir(os.path.join(image_dir, sub), mode)
            for target in (image_dir, *(os.path.join(image_dir, s) for s in ("diff", "rootfs"))):
                os.chown(target, idmap.root_uid, idmap.root_gid)

            shorts = [overlay.short_name(c) for c in reversed(chain_ids)]
            rel_dir = os.path.join("images", image_id)
            if not options.without_mount:
                overlay.mount(store.path, rel_dir, shorts)
                undo.callback(overlay.unmount, os.path.join(image_dir, "rootfs"))

            fsutil.write_json(
                os.path.join(image_dir, IMAGE_JSON),
                {
                    "id": image_id,
                    "source": url,
                    "base_size": base_size,
                    "quota_size_bytes": quota_bytes,
                    "project_id": project_id,
                    "mounted": not options.without_mount,
                    "env": list(image.env),
                },
            )
            undo.pop_all()

    log.info("image created", id=image_id, layers=len(chain_ids), source=url)
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {"user": {"uid": 0, "gid": 0}, "env": list(image.env), "cwd": ""},
        "root": {"path": os.path.join(image_dir, "rootfs")},
    }
    if options.without_mount:
        spec["mounts"] = [
            {
                "destination": "/",
                "type": "overlay",
                "source": "overlay",
                "options": [overlay.absolute_options(store.path, rel_dir, shorts)],
            }
        ]
    return spec


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
    undo.callback(_release_project, store, project_id)
    return project_id


def _release_project(store: Store, project_id: int) -> None:
    """Drop the project's limit and free its id (its files must be gone)."""
    from grootfs_py import quota

    with contextlib.suppress(OSError, StoreError):
        quota.set_limit(quota.device_of(store.path), project_id, 0)
    quota.ProjectIds(store.join("projectids")).free(project_id)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
        return None
    project_id = 0
    with contextlib.suppress(OSError, ValueError, AttributeError):
        project_id = int(fsutil.read_json(os.path.join(image_dir, IMAGE_JSON)).get("project_id", 0))
    with store.lock(shared=True):
        overlay.unmount(os.path.join(image_dir, "rootfs"))
        trashed = store.trash(image_dir, f"image-{image_id}")
        if not trashed:
            return None  # a concurrent delete took it
        from grootfs_py import mounts

        left = mounts.under(trashed)
        if left:
            # Never remove a tree through a live mount.
            raise StoreError(f"delete image {image_id}: {left[0]} is still mounted")
        _unlink_quietly(store.dependency_file(image_id))
        fsutil.remove_tree(trashed)
        if project_id:
            _release_project(store, project_id)
    log.info("image deleted", id=image_id)
    return image_id


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

        try:
            exclusive, _ = quota.usage(quota.device_of(store.path), project_id)
        except OSError as exc:
            raise StoreError(f"read disk usage of image `{image_id}`: {exc.strerror}") from None
    else:
        exclusive = fsutil.disk_usage(os.path.join(store.image_dir(image_id), "diff"))
    return {
        "disk_usage": {
            "total_bytes_used": base + exclusive,
            "exclusive_bytes_used": exclusive,
            "quota_size_bytes": quota_bytes,
            "committed_space_bytes": base + quota_bytes,
        }
    }
