"""The store: its layout on disk, its metadata, its lock, its lifecycle.

::

    <store>/images/<id>/{rootfs,diff,workdir,image.json}
    <store>/volumes/<chain-id hex>/            one unpacked layer, shared
    <store>/volumes/<hex>-incomplete-<tag>/    a layer being unpacked
    <store>/l/<short> -> ../volumes/<hex>
    <store>/meta/namespace.json                id mappings, fixed at init
    <store>/meta/store.json                    backing file, quota support
    <store>/meta/volume-<hex>                  one layer's size
    <store>/meta/dependencies/image:<id>.json  the layers an image uses
    <store>/meta/unsettled/<hex> -> <epoch>/<token>   a layer not yet flushed (settle.py)
    <store>/locks/ <store>/tmp/ <store>/projectids/
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from grootfs_py import fsutil, log
from grootfs_py.errors import InvalidArgumentError, StoreError
from grootfs_py.idmap import IdMap
from grootfs_py.locks import DEFAULT_TIMEOUT, flock
from grootfs_py.metrics import LockWait

if TYPE_CHECKING:
    from grootfs_py import settle

NOT_INITIALIZED = "Store path is not initialized. Please run init-store."
LAYOUT = (
    "images",
    "volumes",
    "l",
    "meta",
    "meta/dependencies",
    "meta/unsettled",
    "locks",
    "tmp",
    "projectids",
)
INCOMPLETE = "-incomplete-"
NOT_YOURS = " (a non-root user needs a store that root initialised with its id mappings)"


class StoreInfo(NamedTuple):
    quotas: bool
    backing_store: str | None


def volume_name(chain_id: str) -> str:
    return chain_id.partition(":")[2]


def chain_id_of(volume: str) -> str:
    return ("sha256:" if len(volume) == 64 else "sha512:") + volume


class Store:
    def __init__(self, path: str, *, newuidmap_bin: str = "", newgidmap_bin: str = "") -> None:
        if not path:
            raise InvalidArgumentError("invalid argument: store path is empty")
        self.path = os.path.abspath(path)
        # Rootless use (see userns.py): the helpers that map a user's subordinate ids.
        self.newuidmap_bin = newuidmap_bin or "newuidmap"
        self.newgidmap_bin = newgidmap_bin or "newgidmap"
        self._idmap: IdMap | None = None
        # The layers this process has left to flush after it answers (settle.py).
        self.pending: settle.Pending | None = None

    @property
    def rootless(self) -> bool:
        """Run by a non-root user: layers are unpacked and removed in a user namespace."""
        return os.geteuid() != 0

    # Paths -----------------------------------------------------------------

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def image_dir(self, image_id: str) -> str:
        return self.join("images", image_id)

    def volume_dir(self, chain_id: str) -> str:
        return self.join("volumes", volume_name(chain_id))

    def volume_meta(self, chain_id: str) -> str:
        return self.join("meta", f"volume-{volume_name(chain_id)}")

    def dependency_file(self, image_id: str) -> str:
        return self.join("meta", "dependencies", f"image:{image_id}.json")

    def layer_lock(self, chain_id: str) -> str:
        return self.join("locks", f"layer-{volume_name(chain_id)}.lock")

    # State -----------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return os.path.exists(self.join("meta", "namespace.json"))

    def require_initialized(self) -> None:
        try:
            os.stat(self.join("meta", "namespace.json"))
        except FileNotFoundError:
            raise StoreError(NOT_INITIALIZED) from None
        except PermissionError:
            raise StoreError(f"read store {self.path}: Permission denied{NOT_YOURS}") from None

    def idmap(self) -> IdMap:
        if self._idmap is not None:
            return self._idmap
        try:
            self._idmap = IdMap.from_json(fsutil.read_json(self.join("meta", "namespace.json")))
            return self._idmap
        except FileNotFoundError:
            raise StoreError(NOT_INITIALIZED) from None
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"read store id mappings: {exc}") from None

    def info(self) -> StoreInfo:
        try:
            data = fsutil.read_json(self.join("meta", "store.json"))
            return StoreInfo(bool(data.get("quotas")), data.get("backing_store"))
        except FileNotFoundError:
            return StoreInfo(False, None)
        except (OSError, ValueError) as exc:
            raise StoreError(f"read store metadata: {exc}") from None

    @contextlib.contextmanager
    def lock(
        self, *, shared: bool, timeout: float | None = None, waits: LockWait | None = None
    ) -> Iterator[None]:
        """The store-wide lock: create, delete and clean share it; check-store takes it alone."""
        path = self.join("locks", "store.lock")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        with flock(path, shared=shared, timeout=timeout, waits=waits):
            yield

    # Lifecycle -------------------------------------------------------------

    def init(self, *, size_bytes: int, idmap: IdMap, direct_io: bool = False) -> None:
        """Make the store usable: backing filesystem (when sized), layout, mappings."""
        from grootfs_py import backing, linux, mounts

        if self.rootless:
            # GrootFS's words.
            raise StoreError(f"store {self.path} can only be initialized by Root user")
        quotas = False
        backing_file: str | None = None
        if size_bytes > 0:
            backing.create(self.path, size_bytes)
            quotas = backing.mount(self.path)
            backing_file = backing.backing_path(self.path)
            backing.set_direct_io(self.path, direct_io)
        else:
            if direct_io:
                raise InvalidArgumentError(
                    "invalid argument: direct I/O needs a store with a backing file "
                    "(--store-size-bytes)"
                )
            os.makedirs(self.path, exist_ok=True)
            mounted = mounts.find(self.path)
            quotas = mounted is not None and backing.quota_enabled(mounted)

        namespace = self.join("meta", "namespace.json")
        if os.path.exists(namespace) and self.idmap() != idmap:
            raise StoreError(
                "provided id mappings do not match those already configured in the store"
            )
        for sub in LAYOUT:
            os.makedirs(self.join(sub), exist_ok=True)
        if not os.path.exists(namespace):
            fsutil.write_json(namespace, idmap.to_json())
        fsutil.write_json(
            self.join("meta", "store.json"), {"quotas": quotas, "backing_store": backing_file}
        )
        # Container root must be able to reach its rootfs inside the store, and
        # with a user's mappings (rootless) that user owns the store to work in it.
        for target in (self.path, *(self.join(sub) for sub in LAYOUT)):
            os.chown(target, idmap.root_uid, idmap.root_gid)
        os.chmod(self.path, 0o700)
        # Once, so that a crash right after init-store cannot leave the
        # store's records empty (nothing else flushes them).
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            linux.syncfs(fd)
        finally:
            os.close(fd)
        log.info("store initialised", store=self.path, quotas=quotas, backing_store=backing_file)

    def delete(self) -> None:
        """Remove every image and layer, unmount and remove the store."""
        from grootfs_py import backing, mounts, overlay

        if self.rootless:
            # Root made it (and mounted its backing file): root takes it away.
            raise StoreError(f"store {self.path} can only be deleted by Root user")
        backing_file = backing.backing_path(self.path)
        if not os.path.exists(self.path) and not os.path.exists(backing_file):
            return

        for point in mounts.under(self.path):
            overlay.unmount(point)
        backing.unmount(self.path)
        self.remove_tree(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(backing_file)
        log.info("store deleted", store=self.path)

    def check_quota(self) -> None:
        """Raise unless the kernel enforces project quotas on this store."""
        from grootfs_py import quota

        self.require_initialized()
        if self.rootless:
            raise StoreError("check-quota needs root: it sets an XFS project quota")
        if not self.info().quotas:
            raise StoreError(
                "store cannot enforce disk quotas: it is not mounted with XFS project quotas"
            )
        scratch = self.join("tmp", f"check-quota-{os.getpid()}-{os.urandom(4).hex()}")
        with self.lock(shared=True):
            quota.prove(self.path, scratch, quota.ProjectIds(self.join("projectids")))

    # Volumes -----------------------------------------------------------------

    def volume_size(self, chain_id: str) -> int:
        try:
            return int(fsutil.read_json(self.volume_meta(chain_id))["size"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"read size of layer {chain_id}: {exc}") from None

    def complete_volumes(self) -> list[str]:
        """Chain IDs of every complete layer in the store."""
        try:
            names = os.listdir(self.join("volumes"))
        except FileNotFoundError:
            return []
        return [chain_id_of(n) for n in names if INCOMPLETE not in n]

    def dependencies(self) -> dict[str, list[str]]:
        """Image id -> chain IDs of its layers, for every recorded image."""
        deps: dict[str, list[str]] = {}
        folder = self.join("meta", "dependencies")
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return deps
        for name in names:
            if not (name.startswith("image:") and name.endswith(".json")):
                continue
            try:
                layers = fsutil.read_json(os.path.join(folder, name))["layers"]
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError) as exc:
                raise StoreError(f"read image dependencies {name}: {exc}") from None
            deps[name[len("image:") : -len(".json")]] = list(layers)
        return deps

    def image_ids(self) -> list[str]:
        try:
            return sorted(os.listdir(self.join("images")))
        except FileNotFoundError:
            return []

    def remove_tree(self, path: str) -> None:
        """Remove *path* and everything in it; a missing path is fine.

        Run by its user, a store holds files of the user's subordinate ids
        that the user cannot remove: what is left is removed again inside a
        user namespace with the store's mappings, where the user is root.
        """
        try:
            fsutil.remove_tree(path)
        except PermissionError:
            if not self.rootless or self.idmap().identity:
                raise
            from grootfs_py import userns

            userns.remove_trees(self, [path])

    def content_size(self, path: str) -> int:
        """:func:`fsutil.content_size` of *path*, walked in the user namespace if need be."""
        try:
            return fsutil.content_size(path)
        except PermissionError:
            if not self.rootless or self.idmap().identity:
                raise
            from grootfs_py import userns

            return userns.content_size(self, path)

    def trash(self, path: str, label: str) -> str:
        """Rename *path* aside into tmp/ (the first phase of a two-phase delete)."""
        target = self.join("tmp", f"{label}-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return ""
            raise StoreError(f"move {path} aside: {exc.strerror}") from None
        return target
