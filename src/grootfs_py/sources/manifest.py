"""Pure functions over OCI / Docker image JSON: descriptors, manifests, configs.

Shared by every source that reads image JSON (OCI layouts, registries).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

from grootfs_py import compression
from grootfs_py.digest import check_digest
from grootfs_py.errors import ImageSourceError
from grootfs_py.sources import Image, Layer, chain_ids

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
CONFIGS = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)

LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": compression.GZIP,
}

# Cloud Foundry's annotation: unpack the layer under this directory (Garden's droplets).
BASE_DIRECTORY_ANNOTATION = "org.cloudfoundry.experimental.image.base-directory"

# Image JSON is small; a hostile source must not make us parse gigabytes.
MAX_JSON_BYTES = 8 << 20

_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


class Descriptor(NamedTuple):
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] | None = None
    urls: tuple[str, ...] = ()  # where a layer not in the layout can be fetched

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ImageSourceError(f"invalid {what}: descriptor is not an object")
        media_type = data.get("mediaType", "")
        size = data.get("size")
        if not isinstance(media_type, str) or not isinstance(size, int) or size < 0:
            raise ImageSourceError(f"invalid {what}: descriptor lacks mediaType or size")
        platform_ = data.get("platform")
        annotations = data.get("annotations")
        urls = data.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ImageSourceError(f"invalid {what}: urls is not a list of strings")
        return cls(
            media_type=media_type,
            digest=check_digest(data.get("digest", "")),
            size=size,
            platform=platform_ if isinstance(platform_, dict) else None,
            # Annotations are strings (OCI); others are dropped, not trusted to be.
            annotations={k: v for k, v in annotations.items() if isinstance(v, str)}
            if isinstance(annotations, dict)
            else None,
            urls=tuple(urls),
        )


class Manifest(NamedTuple):
    config: Descriptor
    layers: tuple[Descriptor, ...]


class ImageConfig(NamedTuple):
    diff_ids: tuple[str, ...]
    env: tuple[str, ...]


def load_json(data: bytes, what: str) -> dict[str, Any]:
    from grootfs_py import jsonload

    doc = jsonload.loads(data, what, max_bytes=MAX_JSON_BYTES)
    if not isinstance(doc, dict):
        raise ImageSourceError(f"invalid {what}: not a JSON object")
    return doc


def media_type_of(doc: dict[str, Any], fallback: str = "") -> str:
    media_type = doc.get("mediaType") or fallback
    if not media_type:
        # OCI made mediaType optional in early versions; tell the kinds apart by shape.
        if "manifests" in doc:
            return OCI_INDEX
        if "layers" in doc:
            return OCI_MANIFEST
        if doc.get("schemaVersion") == 1:
            return DOCKER_SCHEMA1[0]
    return str(media_type)


def parse_manifest(doc: dict[str, Any], media_type: str) -> Manifest:
    if media_type in DOCKER_SCHEMA1:
        raise ImageSourceError(
            "Docker image manifest schema 1 is not supported: push the image again "
            "with a current client (schema 2 or OCI)"
        )
    if media_type not in MANIFESTS:
        raise ImageSourceError(f"unsupported manifest media type `{media_type}`")
    config = Descriptor.parse(doc.get("config"), "manifest config")
    if config.media_type not in CONFIGS:
        raise ImageSourceError(f"unsupported config media type `{config.media_type}`")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ImageSourceError("invalid manifest: no layers")
    parsed = tuple(Descriptor.parse(layer, "manifest layer") for layer in layers)
    for layer in parsed:
        if layer.media_type not in LAYER_COMPRESSION:
            raise ImageSourceError(
                f"unknown media type `{layer.media_type}` for layer {layer.digest}"
            )
    if not parsed:
        raise ImageSourceError("invalid manifest: the image has no layers")
    return Manifest(config=config, layers=parsed)


def parse_config(doc: dict[str, Any], layer_count: int) -> ImageConfig:
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageSourceError("invalid image config: no rootfs.diff_ids")
    checked = tuple(check_digest(d) for d in diff_ids)
    if len(checked) != layer_count:
        raise ImageSourceError(
            f"invalid image config: {len(checked)} diff_ids for {layer_count} layers"
        )
    runtime = doc.get("config")
    env = runtime.get("Env") if isinstance(runtime, dict) else None
    env_list = tuple(e for e in env if isinstance(e, str)) if isinstance(env, list) else ()
    return ImageConfig(diff_ids=checked, env=env_list)


def host_platform() -> tuple[str, str]:
    machine = os.uname().machine
    return "linux", _ARCHITECTURES.get(machine, machine)


def select_platform(doc: dict[str, Any]) -> Descriptor:
    """The manifest of a multi-platform index that runs on this host."""
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ImageSourceError("invalid image index: no manifests")
    want_os, want_arch = host_platform()
    offered = []
    for entry in entries:
        desc = Descriptor.parse(entry, "image index")
        plat = desc.platform or {}
        offered.append(f"{plat.get('os', '?')}/{plat.get('architecture', '?')}")
        if plat.get("os") == want_os and plat.get("architecture") == want_arch:
            return desc
    raise ImageSourceError(
        f"no image for platform {want_os}/{want_arch}: the index offers "
        + (", ".join(offered) or "nothing")
    )


def image(
    manifest: Manifest,
    config: ImageConfig,
    open_blob: Callable[[Descriptor], BinaryIO],
    *,
    verify: bool = True,
) -> Image:
    """The image a manifest and its config describe, layers bottom to top.

    Without *verify* (``--skip-layer-validation``) the layers carry no
    digest, size or diff_id to check; their published size is kept for
    the disk-limit check either way.
    """
    chains = chain_ids(list(config.diff_ids))
    layers = []
    parent = ""
    for desc, diff_id, chain_id in zip(manifest.layers, config.diff_ids, chains, strict=True):

        def opener(desc: Descriptor = desc) -> BinaryIO:
            return open_blob(desc)

        layers.append(
            Layer(
                chain_id=chain_id,
                media_type=desc.media_type,
                compression=LAYER_COMPRESSION[desc.media_type],
                open=opener,
                digest=desc.digest if verify else None,
                size=desc.size if verify else None,
                diff_id=diff_id if verify else None,
                blob_size=desc.size,
                base_directory=base_directory(desc),
                parent_chain_id=parent,
                published_digest=desc.digest,
            )
        )
        parent = chain_id
    return Image(layers=tuple(layers), env=config.env)


def base_directory(desc: Descriptor) -> str:
    """The layer's base-directory annotation, checked: absolute, no ``..``; "" when unset.

    Normalised (repeated and trailing slashes dropped); "/" is the layer root.
    Whether it passes through a symlink is for the unpacker to find out.
    """
    value = (desc.annotations or {}).get(BASE_DIRECTORY_ANNOTATION, "")
    if not value:
        return ""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ImageSourceError(
            f"invalid base directory `{value}` for layer {desc.digest}: not an absolute path"
        )
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageSourceError(
            f"invalid base directory `{value}` for layer {desc.digest}: contains `..`"
        )
    return "/" + "/".join(parts) if parts else ""
