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
        volumes.ensure(store, image.layers, idmap)

        with contextlib.ExitStack() as undo:
            try:
                os.mkdir(image_dir, 0o755)
            except FileExistsError:
                raise StoreError(f"image for id `{image_id}` already exists") from None
            undo.callback(fsutil.remove_tree, image_dir)

            chain_ids = [layer.chain_id for layer in image.layers]
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

            base_size = sum(store.volume_size(c) for c in chain_ids)
            fsutil.write_json(
                os.path.join(image_dir, IMAGE_JSON),
                {
                    "id": image_id,
                    "source": url,
                    "base_size": base_size,
                    "quota_size_bytes": 0,
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
    quota = int(record.get("quota_size_bytes", 0))
    exclusive = fsutil.disk_usage(os.path.join(store.image_dir(image_id), "diff"))
    return {
        "disk_usage": {
            "total_bytes_used": base + exclusive,
            "exclusive_bytes_used": exclusive,
            "quota_size_bytes": quota,
            "committed_space_bytes": base + quota,
        }
    }
