"""Image sources: where manifests, configs and layer streams come from.

Every source turns an image URL into an :class:`Image`: the layers bottom to
top, each with what is needed to name it in the store (its chain ID), to
open its compressed bytes, and to verify them. Sources know nothing about
the store or about unpacking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

from grootfs_py.errors import ImageSourceError


class Layer(NamedTuple):
    chain_id: str  # "sha256:<hex>"; names the layer's volume in the store
    media_type: str
    compression: str  # compression.GZIP / ZSTD / NONE
    open: Callable[[], BinaryIO]  # the compressed bytes, streamed
    digest: str | None = None  # of the compressed bytes; None: nothing to check
    size: int | None = None
    diff_id: str | None = None  # of the uncompressed tar
    blob_size: int | None = None  # compressed size as published, verified or not
    base_directory: str = ""  # unpack under this absolute directory ("": the root)
    parent_chain_id: str = ""  # the layer below; "" for the bottom one
    published_digest: str = ""  # as the manifest names it, verified or not

    @property
    def label(self) -> str:
        return self.digest or self.published_digest or self.chain_id


class SourceOptions(NamedTuple):
    """How to fetch: what the caller allows and the credentials it has."""

    skip_layer_validation: bool = False
    insecure_registries: tuple[str, ...] = ()
    username: str = ""
    password: str = ""
    # Registries: <path>/<host:port>/ else <path>/; remote layers of OCI layouts: <path>/.
    client_certificates_path: str = ""
    cache_dir: str = ""  # where registry image configs are kept (content-addressed)


class Image(NamedTuple):
    layers: tuple[Layer, ...]
    env: tuple[str, ...] = ()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: the first is its diff_id, each next hashes parent + " " + diff_id."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            digest = hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
            chains.append(f"sha256:{digest}")
    return chains


def resolve(url: str, options: SourceOptions | None = None) -> Image:
    """The image an URL names: ``oci://``, ``docker://`` or a local tar path."""
    options = options or SourceOptions()
    if url.startswith("oci://"):
        from grootfs_py.sources import oci

        return oci.load(
            url,
            skip_layer_validation=options.skip_layer_validation,
            certificates_path=options.client_certificates_path,
        )
    if url.startswith("docker://"):
        # Imported only here: the HTTP stack costs more than a warm create of a local image.
        from grootfs_py.sources import registry

        return registry.load(url, options)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ImageSourceError(f"unsupported image URL scheme `{scheme}`")
    from grootfs_py.sources import tarball

    return tarball.load(url)
