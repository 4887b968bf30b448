"""check-store: verify the store's invariants and, when asked, repair what is safe.

It takes the store lock exclusively, so no create, delete or clean is
halfway while it looks: whatever is unfinished is debris of a killed
process. A repair never removes a complete image or a layer an image uses;
what needs the image's source (a missing layer) is reported, not repaired.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from grootfs_py import fsutil, images, linux, log, mounts, overlay, settle, volumes
from grootfs_py.errors import GrootError
from grootfs_py.store import INCOMPLETE, Store, chain_id_of, volume_name


class Problem(NamedTuple):
    text: str
    repair: Callable[[], object] | None = None


def check(store: Store, *, repair: bool = False) -> list[tuple[str, bool]]:
    """Every problem found, one line each, with whether it was repaired."""
    store.require_initialized()
    found: list[tuple[str, bool]] = []
    with store.lock(shared=False):
        # Each pass looks at the store as the passes before it left it.
        for section in (_leftovers, _images, _mounts, _layers, _records):
            for problem in section(store):
                fixed = False
                if repair and problem.repair is not None:
                    try:
                        problem.repair()
                        fixed = True
                    except (OSError, GrootError) as exc:
                        log.error("repair failed", problem=problem.text, error=str(exc))
                found.append((problem.text, fixed))
    return found


def _leftovers(store: Store) -> list[Problem]:
    problems = []
    for image_id in store.image_ids():
        if not os.path.exists(os.path.join(store.image_dir(image_id), images.IMAGE_JSON)):
            problems.append(
                Problem(
                    f"image {image_id}: unfinished (no image.json)",
                    partial(images.remove, store, image_id),
                )
            )
    for name in sorted(os.listdir(store.join("volumes"))):
        if INCOMPLETE in name:
            path = store.join("volumes", name)
            problems.append(
                Problem(f"layer {name}: unfinished unpack", partial(store.remove_tree, path))
            )
    for name in sorted(os.listdir(store.join("tmp"))):
        path = store.join("tmp", name)
        problems.append(
            Problem(f"tmp/{name}: unfinished removal", partial(_remove_unmounted, store, path))
        )
    return problems


def _remove_unmounted(store: Store, path: str) -> None:
    for point in [*mounts.under(path), path]:
        overlay.unmount(point)
    store.remove_tree(path)


def _image_record(store: Store, image_id: str) -> dict[str, Any] | None:
    try:
        record = fsutil.read_json(os.path.join(store.image_dir(image_id), images.IMAGE_JSON))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _images(store: Store) -> list[Problem]:
    from grootfs_py import quota

    problems: list[Problem] = []
    volumes_present = set(store.complete_volumes())
    records = store.dependencies()
    owners = quota.ProjectIds(store.join("projectids")).owners()
    mounted = {m.mount_point for m in mounts.table()}
    lost = settle.lost(store)
    for image_id in store.image_ids():
        record = _image_record(store, image_id)
        if record is None:
            if os.path.exists(os.path.join(store.image_dir(image_id), images.IMAGE_JSON)):
                problems.append(Problem(f"image {image_id}: image.json is unreadable"))
            continue
        layers = record.get("layers")
        recorded = records.get(image_id)
        if layers is None:
            layers = recorded or []
        elif recorded != layers:
            what = "no dependency record" if recorded is None else "dependency record differs"
            dependency = store.dependency_file(image_id)
            problems.append(
                Problem(
                    f"image {image_id}: {what} from its image.json",
                    partial(fsutil.write_json, dependency, {"layers": layers}),
                )
            )
        missing = [c for c in layers if c not in volumes_present]
        for chain_id in missing:
            problems.append(Problem(f"image {image_id}: layer {chain_id} is missing"))
        rootfs = os.path.join(store.image_dir(image_id), "rootfs")
        if record.get("mounted") and os.path.realpath(rootfs) not in mounted:
            problems.append(_unmounted(store, image_id, layers, record, missing, lost))
        project_id = int(record.get("project_id", 0) or 0)
        if project_id and owners.get(project_id) != image_id:
            fix: Callable[[], object] | None = None
            if project_id not in owners:
                path = store.join("projectids", str(project_id))
                fix = partial(_write, path, image_id)
            problems.append(Problem(f"image {image_id}: project id {project_id} not recorded", fix))
    return problems


def _unmounted(
    store: Store,
    image_id: str,
    layers: list[str],
    record: dict[str, Any],
    missing: list[str],
    lost: set[str],
) -> Problem:
    """An image whose rootfs should be mounted and is not: remounted if that is safe."""
    volatile_boot = record.get("volatile_boot")
    if volatile_boot and volatile_boot != linux.boot_id():
        # Its syncs were skipped: after a crash its upper may be torn, and a
        # clean reboot cannot be told from a crash.
        return Problem(
            f"image {image_id}: rootfs is not mounted, and its volatile upper "
            "may not have survived the reboot since: delete the image"
        )
    if missing:
        return Problem(f"image {image_id}: rootfs is not mounted")
    for chain_id in layers:
        if chain_id in lost:
            return Problem(
                f"image {image_id}: rootfs is not mounted, and its layer {chain_id} "
                "was not flushed before its store was last lost: delete the image"
            )
    remount = partial(_remount, store, image_id, layers, volatile=bool(volatile_boot))
    return Problem(f"image {image_id}: rootfs is not mounted", remount)


def _write(path: str, text: str) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)


def _remount(store: Store, image_id: str, chain_ids: list[str], *, volatile: bool) -> None:
    for chain_id in chain_ids:
        volumes.link(store, chain_id)
    if volatile:
        # Unmounted in this boot, so nothing was lost: the kernel leaves the
        # marker for whoever knows that to remove.
        work = os.path.join(store.image_dir(image_id), "workdir")
        store.remove_tree(os.path.join(work, *overlay.VOLATILE_MARKER))
    images.mount(store, image_id, chain_ids, volatile=volatile)


def _mounts(store: Store) -> list[Problem]:
    problems = []
    images_dir = os.path.realpath(store.join("images")) + "/"
    for point in mounts.under(store.path):
        rest = point[len(images_dir) :] if point.startswith(images_dir) else ""
        image_id, _, sub = rest.partition("/")
        if image_id and sub == "rootfs":
            record = _image_record(store, image_id)
            if record is not None and record.get("mounted"):
                continue
        problems.append(
            Problem(f"mount {point}: belongs to no image", partial(overlay.unmount, point))
        )
    return problems


def _layers(store: Store) -> list[Problem]:
    problems = []
    present = store.complete_volumes()
    lost = settle.lost(store)
    problems += _markers(store, present, lost)
    links = store.join(overlay.LINKS_DIR)
    for chain_id in present:
        if chain_id in lost:
            continue  # reported by _markers, to be unpacked again
        short = overlay.short_name(chain_id)
        target = f"../volumes/{volume_name(chain_id)}"
        try:
            actual = os.readlink(os.path.join(links, short))
        except FileNotFoundError:
            actual = None
        if actual != target:
            problems.append(
                Problem(
                    f"layer {chain_id}: link l/{short} is "
                    + ("missing" if actual is None else f"wrong ({actual})"),
                    partial(_relink, store, chain_id, short),
                )
            )
        try:
            store.volume_size(chain_id)
            has_size = os.path.exists(store.volume_meta(chain_id))
        except GrootError:
            has_size = False
        if not has_size:
            problems.append(
                Problem(
                    f"layer {chain_id}: no size record",
                    partial(_record_size, store, chain_id),
                )
            )
    for name in sorted(os.listdir(links)):
        path = os.path.join(links, name)
        if not os.path.isdir(path):
            problems.append(
                Problem(f"link l/{name}: does not resolve", partial(fsutil.unlink_quietly, path))
            )
    for name in sorted(os.listdir(store.join("meta"))):
        if name.startswith("volume-") and ".tmp-" not in name:
            chain_id = chain_id_of(name[len("volume-") :])
            if not os.path.isdir(store.volume_dir(chain_id)):
                path = store.join("meta", name)
                problems.append(
                    Problem(
                        f"layer {chain_id}: size record without layer",
                        partial(fsutil.unlink_quietly, path),
                    )
                )
    return problems


def _markers(store: Store, present: list[str], lost: set[str]) -> list[Problem]:
    """Markers of layers not yet flushed (settle.py) that no settler will remove."""
    problems = []
    complete = set(present)
    used = {c for layers in store.dependencies().values() for c in layers}
    for name in sorted(settle.markers(store)):
        path = os.path.join(settle.directory(store), name)
        chain_id = chain_id_of(name)
        if chain_id not in complete:
            problems.append(
                Problem(
                    f"layer {chain_id}: flush marker without the layer",
                    partial(fsutil.unlink_quietly, path),
                )
            )
        elif chain_id in lost:
            text = f"layer {chain_id}: not flushed before its store was last lost"
            if chain_id in used:
                # What it needs is the images' source: a create unpacks it again.
                problems.append(Problem(f"{text}, and images use it"))
            else:
                problems.append(Problem(text, partial(_remove_layer, store, chain_id)))
    return problems


def _remove_layer(store: Store, chain_id: str) -> None:
    store.remove_tree(volumes.remove(store, chain_id))


def _record_size(store: Store, chain_id: str) -> None:
    size = store.content_size(store.volume_dir(chain_id))
    fsutil.write_json(store.volume_meta(chain_id), {"size": size})


def _relink(store: Store, chain_id: str, short: str) -> None:
    fsutil.unlink_quietly(store.join(overlay.LINKS_DIR, short))
    volumes.link(store, chain_id)


def _records(store: Store) -> list[Problem]:
    from grootfs_py import quota

    problems = []
    image_set = set(store.image_ids())
    for image_id in sorted(store.dependencies()):
        if image_id not in image_set:
            path = store.dependency_file(image_id)
            problems.append(
                Problem(
                    f"dependency record of missing image {image_id}",
                    partial(fsutil.unlink_quietly, path),
                )
            )
    ids = quota.ProjectIds(store.join("projectids"))
    for project_id, owner in sorted(ids.owners().items()):
        record = _image_record(store, owner) if owner in image_set else None
        if record is None or int(record.get("project_id", 0) or 0) != project_id:
            problems.append(
                Problem(
                    f"project id {project_id}: its image {owner} does not use it",
                    partial(images.release_project, store, project_id),
                )
            )
    return problems
