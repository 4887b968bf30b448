"""Layers in the store: unpacked once, verified, then renamed into place.

A layer is unpacked into ``volumes/<hex>-incomplete-<tag>`` and becomes
``volumes/<hex>`` only after its digests are verified, its size recorded
and its filesystem flushed: a directory without the marker in its name is
always a whole layer. A killed unpack leaves an ``-incomplete-`` directory
that nothing will use and that clean removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import zlib
from collections.abc import Sequence
from typing import BinaryIO, cast

from grootfs_py import fsutil, log, overlay
from grootfs_py.digest import VerifyingReader
from grootfs_py.errors import GrootError, StoreError, UnpackError
from grootfs_py.idmap import IdMap
from grootfs_py.sources import Layer
from grootfs_py.store import INCOMPLETE, Store, volume_name


def ensure(store: Store, layers: Sequence[Layer], idmap: IdMap) -> None:
    """Make sure every layer is complete in the store, with its short link."""
    for layer in layers:
        if not os.path.isdir(store.volume_dir(layer.chain_id)):
            _unpack(store, layer, idmap)
        link(store, layer.chain_id)


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


def _open_verified(layer: Layer) -> tuple[VerifyingReader, VerifyingReader]:
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
    return compressed, uncompressed


def _unpack(store: Store, layer: Layer, idmap: IdMap) -> None:
    from grootfs_py import linux
    from grootfs_py.unpack import unpack_layer

    final = store.volume_dir(layer.chain_id)
    tmp = f"{final}{INCOMPLETE}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(tmp, 0o755)
    log.info("unpacking layer", layer=layer.label, chain_id=layer.chain_id)
    try:
        os.chown(tmp, idmap.root_uid, idmap.root_gid)
        compressed, uncompressed = _open_verified(layer)
        with contextlib.closing(compressed._inner):
            try:
                result = unpack_layer(cast(BinaryIO, uncompressed), tmp, idmap, layer=layer.label)
                uncompressed.finish()
                compressed.finish()
            except GrootError:
                raise
            except (OSError, EOFError, ValueError, zlib.error) as exc:
                raise UnpackError(f"unpack layer {layer.label}: {exc}") from None
            except Exception as exc:
                # zstandard.ZstdError is neither of the above.
                if type(exc).__name__ != "ZstdError":
                    raise
                raise UnpackError(f"unpack layer {layer.label}: {exc}") from None
        fsutil.write_json(store.volume_meta(layer.chain_id), {"size": result.size_bytes})
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            linux.syncfs(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another create finished the same layer first; theirs is as good.
            fsutil.remove_tree(tmp)
    except BaseException:
        fsutil.remove_tree(tmp)
        raise
    log.info("layer ready", layer=layer.label, size=result.size_bytes)


def remove(store: Store, chain_id: str) -> None:
    """Remove a layer in two phases: rename aside, then delete at leisure."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store.join(overlay.LINKS_DIR, overlay.short_name(chain_id)))
    trashed = store.trash(store.volume_dir(chain_id), f"volume-{volume_name(chain_id)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store.volume_meta(chain_id))
    if trashed:
        fsutil.remove_tree(trashed)


def regenerate_sizes(store: Store) -> None:
    """Rebuild every complete layer's size record from what is on disk."""
    store.require_initialized()
    for chain_id in store.complete_volumes():
        size = fsutil.content_size(store.volume_dir(chain_id))
        fsutil.write_json(store.volume_meta(chain_id), {"size": size})
        log.info("layer size recorded", chain_id=chain_id, size=size)
