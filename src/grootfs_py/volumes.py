"""Layers in the store: unpacked once, verified, then renamed into place.

A layer is unpacked into ``volumes/<hex>-incomplete-<tag>`` and becomes
``volumes/<hex>`` only after its digests are verified, its size recorded
and its filesystem flushed (or, on the store init-store makes, a marker
made that stands for the flush until the create has answered: settle.py).
A directory without ``-incomplete-`` in its name is always a whole layer,
or one whose marker names an epoch that is over, which nothing uses. A
killed unpack leaves an ``-incomplete-`` directory that nothing will use
and that clean removes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from grootfs_py import fsutil, locks, log, metrics, overlay, settle
from grootfs_py.digest import VerifyingReader
from grootfs_py.errors import (
    GrootError,
    ImageSourceError,
    StoreError,
    UnpackError,
    VerificationError,
)
from grootfs_py.idmap import IdMap
from grootfs_py.sources import Layer
from grootfs_py.store import INCOMPLETE, Store, volume_name

if TYPE_CHECKING:
    from grootfs_py.tarstream import FileSource

# Layers fetched and unpacked at once. Unpacking is mostly syscalls and
# decompression (both release the GIL); more than a few at once only
# multiplies memory and contends for the disk.
MAX_PARALLEL_LAYERS = 3


class Budget:
    """Uncompressed bytes a create may still unpack under an inclusive disk limit.

    Shared by the layers unpacking at once; the first read past it fails
    that layer, which then removes its incomplete directory.
    """

    def __init__(self, limit: int) -> None:
        import threading

        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def spend(self, n: int) -> None:
        with self._lock:
            self.used += n
            if self.used > self.limit:
                raise StoreError("uncompressed layer size exceeds quota")


class _Budgeted(io.RawIOBase):
    def __init__(self, inner: VerifyingReader, budget: Budget) -> None:
        super().__init__()
        self._inner = inner
        self._budget = budget

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self._budget.spend(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def in_use(
    store: Store, layers: Sequence[Layer], idmap: IdMap, budget: Budget | None = None
) -> Iterator[None]:
    """Make sure every layer is complete in the store, with its short link, and keep it.

    For the whole block each layer's lock is held shared, so clean cannot
    remove it: the caller records its dependency on the layers inside the
    block, and clean looks at dependencies only under the exclusive lock.
    Missing layers are fetched and unpacked concurrently, each under its
    exclusive lock (a second create needing it waits, then reuses it; if
    the first one died, its lock died with it and the second unpacks), at
    most :data:`MAX_PARALLEL_LAYERS` at a time. Layers already in the store
    are never opened (for a registry: never requested). If one fails, no
    new layer starts, the running ones finish or fail (each removes its own
    incomplete directory), and the first failure in layer order is raised.
    """
    fds: list[int] = []
    try:
        missing: dict[str, Layer] = {}
        for layer in layers:
            if layer.chain_id in missing:
                continue
            fd = locks.acquire(
                store.layer_lock(layer.chain_id), shared=True, waits=metrics.SHARED_LOCKS
            )
            if usable(store, layer.chain_id):
                fds.append(fd)
            else:
                os.close(fd)
                missing[layer.chain_id] = layer
        if missing:
            settle.begin(store)
        while missing:
            # A layer with a base directory copies directories from the layer
            # below it, so it waits until that one is in the store.
            ready = [
                layer
                for layer in missing.values()
                if not layer.base_directory or layer.parent_chain_id not in missing
            ]
            if len(ready) == 1:
                fds.append(_acquire(store, ready[0], idmap, budget))
            else:
                _acquire_concurrently(store, ready, idmap, budget, fds)
            for layer in ready:
                del missing[layer.chain_id]
        for layer in layers:
            link(store, layer.chain_id)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def usable(store: Store, chain_id: str) -> bool:
    """Whether the layer is in the store and can be used: there, and not suspect (settle.py)."""
    return os.path.isdir(store.volume_dir(chain_id)) and not settle.suspect(store, chain_id)


def _acquire(store: Store, layer: Layer, idmap: IdMap, budget: Budget | None) -> int:
    """Unpack the layer unless it is there, and return an fd holding its lock shared.

    Only the shared lock is ever waited for; the exclusive one is only tried.
    A create holds the shared locks of the layers it has while it gets the
    others, so waiting for an exclusive lock could wait for a create that
    waits for us. Who holds the exclusive lock (an unpack, a clean) waits
    for nothing.
    """
    path = store.layer_lock(layer.chain_id)
    final = store.volume_dir(layer.chain_id)
    start_ns = time.monotonic_ns()
    end = time.monotonic() + locks.DEFAULT_TIMEOUT
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise StoreError(
                f"timed out after {locks.DEFAULT_TIMEOUT:g}s waiting for layer {layer.chain_id}"
            )
        fd = locks.acquire(path, shared=True, timeout=left)  # waits out an unpack or a clean
        if usable(store, layer.chain_id):
            if start_ns:  # another create unpacked it while we waited
                metrics.EXCLUSIVE_LOCKS.add(time.monotonic_ns() - start_ns)
            return fd
        os.close(fd)
        unpacker = locks.try_acquire(path)
        if unpacker is None:
            time.sleep(0.01)  # another create got there first, or is only looking
            continue
        # GrootFS's ExclusiveLockingTime: how long getting a missing layer's lock took.
        metrics.EXCLUSIVE_LOCKS.add(time.monotonic_ns() - start_ns)
        start_ns = 0
        try:
            if not usable(store, layer.chain_id):
                if os.path.isdir(final):
                    log.info(
                        "layer was not flushed before its store was last lost: unpacking it again",
                        layer=layer.label,
                        chain_id=layer.chain_id,
                    )
                    store.remove_tree(remove(store, layer.chain_id))
                _unpack(store, layer, idmap, budget)
        finally:
            os.close(unpacker)


def _acquire_concurrently(
    store: Store, layers: list[Layer], idmap: IdMap, budget: Budget | None, fds: list[int]
) -> None:
    """:func:`_acquire` every layer in threads; the fds of those that succeed go to *fds*."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    workers = min(MAX_PARALLEL_LAYERS, len(layers))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layer") as pool:
        futures = [pool.submit(_acquire, store, layer, idmap, budget) for layer in layers]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            for future in futures:
                future.cancel()
        wait(futures)
    errors = []
    for future in futures:
        if future.cancelled():
            continue
        if (error := future.exception()) is not None:
            errors.append(error)
        else:
            fds.append(future.result())
    if errors:
        raise errors[0]


def link(store: Store, chain_id: str) -> str:
    """Create (or check) the layer's short link under l/; return its name."""
    short = overlay.short_name(chain_id)
    path = store.join(overlay.LINKS_DIR, short)
    target = f"../volumes/{volume_name(chain_id)}"
    try:
        os.symlink(target, path)
    except FileExistsError:
        existing = os.readlink(path)
        if existing != target:
            raise StoreError(f"layer link {path} points to {existing}, expected {target}") from None
    return short


def _open_verified(layer: Layer) -> tuple[VerifyingReader, BinaryIO | None, VerifyingReader]:
    """The layer's checked compressed bytes, the decompressor if any, its checked output."""
    from grootfs_py import compression

    raw = layer.open()
    compressed = VerifyingReader(
        raw,
        digest=layer.digest,
        size=layer.size,
        digest_message="layerID digest mismatch",
    )
    stream = compression.decompress(compressed, layer.compression)  # type: ignore[arg-type]
    uncompressed = VerifyingReader(
        stream, digest=layer.diff_id, digest_message="diffID digest mismatch"
    )
    decompressor = None if layer.compression == compression.NONE else stream
    return compressed, decompressor, uncompressed


def _blame_the_blob(compressed: VerifyingReader, error: BaseException) -> None:
    """Raise the layerID mismatch if the blob behind a failed unpack was not the promised one.

    Corruption usually surfaces as a decompression or tar error first; what
    the user needs to hear is that the bytes were wrong. Network failures
    are reported as they are.
    """
    if isinstance(error, ImageSourceError):
        return
    try:
        compressed.finish()
    except VerificationError:
        raise
    except Exception:
        return


class _Flusher:
    """Flush the store's filesystem on a thread of its own while a big layer is written.

    Crash safety needs a layer's data on disk before its rename: one
    syncfs(2) after the unpack. Alone, that waits for the whole layer to be
    written out (~0.15 s of a 0.7 s cold create of a 206 MB stack tar here).
    Started every :attr:`EVERY` bytes copied, the kernel writes out what is
    already there while the unpack goes on, and the final syncfs finds
    little left (0.71 -> 0.59 s, medians of 9, bench/bench_cold_ab.py).
    Only an early start: the final syncfs still runs, so the guarantee does
    not depend on this thread, and its errors are left to that one.
    """

    EVERY = 16 << 20

    def __init__(self, path: str) -> None:
        import threading

        self._path = path
        self._pending = 0
        self._kick = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)

    def __enter__(self) -> _Flusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._kick.set()
        self._thread.join()

    def wrote(self, n: int) -> None:
        """Count *n* bytes written; past :attr:`EVERY` since the last one, start a flush."""
        self._pending += n
        if self._pending >= self.EVERY:
            self._pending = 0
            self._kick.set()

    def _run(self) -> None:
        from grootfs_py import linux

        fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while True:
                self._kick.wait()
                self._kick.clear()
                if self._stop:
                    return
                with contextlib.suppress(OSError):
                    linux.syncfs(fd)
        finally:
            os.close(fd)


def _positioned(layer: Layer, raw: BinaryIO, budget: Budget | None) -> FileSource | None:
    """The layer as a :class:`FileSource` when it is a plain tar file with nothing to verify.

    That is a stack tar (``create /path/rootfs.tar``): its data is then
    copied file to file by the kernel instead of read and written by Python.
    """
    from grootfs_py import compression
    from grootfs_py.tarstream import FileSource

    if layer.compression != compression.NONE or layer.digest or layer.diff_id or layer.size:
        return None
    try:
        fd = raw.fileno()
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return FileSource(fd, budget.spend if budget is not None else None) if regular else None


def _unpack_into(
    store: Store,
    source: BinaryIO | FileSource,
    tmp: str,
    idmap: IdMap,
    layer: Layer,
    parent: str,
) -> int:
    """Unpack the tar *source* into *tmp*, in a user namespace for a rootless store; its size.

    A positioned :class:`FileSource` is never given for a rootless store: the
    namespace's helper reads the tar from a pipe.
    """
    if store.rootless:
        from grootfs_py import userns

        return userns.unpack(
            store,
            cast(BinaryIO, source),
            tmp,
            layer=layer.label,
            base_directory=layer.base_directory,
            parent=parent,
        )
    from grootfs_py.unpack import unpack_layer

    return unpack_layer(
        source, tmp, idmap, layer=layer.label, base_directory=layer.base_directory, parent=parent
    ).size_bytes


def _unpack_verified(
    store: Store,
    layer: Layer,
    tmp: str,
    idmap: IdMap,
    budget: Budget | None,
    compressed: VerifyingReader,
    decompressor: BinaryIO | None,
    uncompressed: VerifyingReader,
    parent: str,
) -> int:
    """Unpack the layer's stream into *tmp*, checking its digests and sizes as it goes.

    Returns the layer's size in bytes.
    """
    try:
        try:
            stream = uncompressed if budget is None else _Budgeted(uncompressed, budget)
            size = _unpack_into(store, cast(BinaryIO, stream), tmp, idmap, layer, parent)
            while uncompressed.read(1 << 20):
                pass
        finally:
            if decompressor is not None:
                # Joins the inflating thread: nothing else reads the blob before.
                decompressor.close()
        # Compressed bytes first: a corrupt blob is a layerID mismatch even
        # when it still decompresses (to the wrong tar).
        compressed.finish()
        uncompressed.finish()
    except VerificationError:
        raise
    except Exception as exc:
        _blame_the_blob(compressed, exc)
        if isinstance(exc, GrootError):
            raise
        # zlib.error, EOFError, zstandard.ZstdError...: a corrupt stream.
        if isinstance(exc, OSError | EOFError | ValueError | zlib.error) or (
            type(exc).__name__ == "ZstdError"
        ):
            raise UnpackError(f"unpack layer {layer.label}: {exc}") from None
        raise
    return size


def _unpack(store: Store, layer: Layer, idmap: IdMap, budget: Budget | None = None) -> None:
    # GrootFS's DownloadTime spans the whole layer: fetched, unpacked and in place.
    with metrics.timed("DownloadTime"):
        _fetch_and_unpack(store, layer, idmap, budget)


def _fetch_and_unpack(store: Store, layer: Layer, idmap: IdMap, budget: Budget | None) -> None:
    from grootfs_py import linux

    final = store.volume_dir(layer.chain_id)
    tmp = f"{final}{INCOMPLETE}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(tmp, 0o755)
    log.info("unpacking layer", layer=layer.label, chain_id=layer.chain_id)
    pending = store.pending  # None: flush before the rename
    # Opened before the first byte is written: the flush reports every
    # writeback error from here on.
    sync_fd = -1
    if pending is None:
        sync_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not store.rootless:
            os.chown(tmp, idmap.root_uid, idmap.root_gid)
        compressed, decompressor, uncompressed = _open_verified(layer)
        parent = store.volume_dir(layer.parent_chain_id) if layer.parent_chain_id else ""
        # UnpackTime: reading the stream into the directory, verified (the
        # download streams through it, so its time is in there too).
        with contextlib.closing(compressed._inner), metrics.timed("UnpackTime"):
            positioned = None if store.rootless else _positioned(layer, compressed._inner, budget)
            if positioned is not None and pending is not None:
                # Nothing to verify: the digest readers stay unread.
                size = _unpack_into(store, positioned, tmp, idmap, layer, parent)
            elif positioned is not None:
                with _Flusher(tmp) as flusher:
                    positioned.on_copy = flusher.wrote
                    size = _unpack_into(store, positioned, tmp, idmap, layer, parent)
            else:
                size = _unpack_verified(
                    store, layer, tmp, idmap, budget, compressed, decompressor, uncompressed, parent
                )
        fsutil.write_json(store.volume_meta(layer.chain_id), {"size": size})
        if pending is None:
            linux.syncfs(sync_fd)
        fsutil.crash_point("create-before-layer-rename")
        if pending is not None:
            settle.mark(store, pending, layer.chain_id)
            fsutil.crash_point("create-after-layer-mark")
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another create finished the same layer first; theirs is as good.
            # Our marker now stands on theirs, which our flush may not cover:
            # it stays, and only costs an unpack after a reboot.
            if pending is not None:
                pending.marked.pop(layer.chain_id, None)
            store.remove_tree(tmp)
    except BaseException:
        store.remove_tree(tmp)
        raise
    finally:
        if sync_fd >= 0:
            os.close(sync_fd)
    # Linked now, not when the whole image is ready: a create whose next layer
    # fails keeps this one cached, and a cached layer has its link (check-store).
    link(store, layer.chain_id)
    log.info("layer ready", layer=layer.label, size=size)


def remove(store: Store, chain_id: str) -> str:
    """First phase of removing a layer (its lock held exclusively): take it out of use.

    The volume is renamed aside first, atomically: from then on the layer is
    simply missing (a create unpacks it again); the link and size record left
    behind by a kill are debris that clean and check-store recognise. Returns
    the path to delete at leisure (without the lock), or "".
    """
    trashed = store.trash(store.volume_dir(chain_id), f"volume-{volume_name(chain_id)}")
    fsutil.crash_point("clean-after-layer-trash")
    settle.forget(store, chain_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store.join(overlay.LINKS_DIR, overlay.short_name(chain_id)))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store.volume_meta(chain_id))
    return trashed


def regenerate_sizes(store: Store) -> None:
    """Rebuild every complete layer's size record from what is on disk."""
    store.require_initialized()
    for chain_id in store.complete_volumes():
        with locks.flock(store.layer_lock(chain_id), shared=True):
            if not os.path.isdir(store.volume_dir(chain_id)):
                continue  # removed by a clean meanwhile
            size = store.content_size(store.volume_dir(chain_id))
            fsutil.write_json(store.volume_meta(chain_id), {"size": size})
        log.info("layer size recorded", chain_id=chain_id, size=size)
