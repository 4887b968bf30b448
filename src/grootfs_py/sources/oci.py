"""OCI image layouts on local disk: ``oci:///absolute/path[:tag]``."""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Any, BinaryIO

from grootfs_py.digest import check_digest
from grootfs_py.errors import ImageSourceError, InvalidArgumentError
from grootfs_py.sources import Image
from grootfs_py.sources import manifest as m

REF_ANNOTATION = "org.opencontainers.image.ref.name"


def parse_url(url: str) -> tuple[str, str | None]:
    """Split ``oci:///path[:tag]`` into the layout path and the tag."""
    rest = url[len("oci://") :]
    if not rest.startswith("/"):
        raise InvalidArgumentError(f"invalid image URL `{url}`: the layout path must be absolute")
    head, sep, tail = rest.rpartition(":")
    if sep and "/" not in tail and head:
        return head, tail or None
    return rest, None


class Layout:
    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isdir(path):
            raise ImageSourceError("Image source doesn't exist")

    def blob_path(self, digest: str) -> str:
        algorithm, _, hexpart = check_digest(digest).partition(":")
        return os.path.join(self.path, "blobs", algorithm, hexpart)

    def read_json_blob(self, desc: m.Descriptor, what: str) -> dict[str, Any]:
        if desc.size > m.MAX_JSON_BYTES:
            raise ImageSourceError(f"invalid {what} {desc.digest}: {desc.size} bytes is too large")
        data = self._read(self.blob_path(desc.digest), desc.size + 1, f"{what} {desc.digest}")
        algorithm, _, expected = desc.digest.partition(":")
        if len(data) != desc.size or hashlib.new(algorithm, data).hexdigest() != expected:
            raise ImageSourceError(f"{what} {desc.digest}: digest or size mismatch")
        return m.load_json(data, what)

    def open_blob(self, desc: m.Descriptor) -> BinaryIO:
        try:
            return open(self.blob_path(desc.digest), "rb")
        except OSError as exc:
            raise ImageSourceError(f"read layer {desc.digest}: {exc.strerror}") from None

    def index(self) -> dict[str, Any]:
        path = os.path.join(self.path, "index.json")
        data = self._read(path, m.MAX_JSON_BYTES + 1, "index.json")
        return m.load_json(data, "OCI layout index.json")

    def _read(self, path: str, limit: int, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read(limit)
        except OSError as exc:
            reason = "no such file" if exc.errno == errno.ENOENT else exc.strerror
            raise ImageSourceError(f"read {what} from OCI layout {self.path}: {reason}") from None


def _pick_manifest(index: dict[str, Any], tag: str | None, layout: str) -> m.Descriptor:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageSourceError(f"invalid OCI layout {layout}: index.json has no manifests")
    descs = [m.Descriptor.parse(e, "index.json") for e in entries]
    tags = [(d.annotations or {}).get(REF_ANNOTATION) for d in descs]
    if tag is None:
        if len(descs) == 1:
            return descs[0]
        tag = "latest"
    for desc, name in zip(descs, tags, strict=True):
        if name == tag:
            return desc
    known = ", ".join(sorted(t for t in tags if t)) or "none"
    raise ImageSourceError(f"image tag `{tag}` not found in OCI layout {layout} (tags: {known})")


def load(url: str, *, skip_layer_validation: bool = False) -> Image:
    path, tag = parse_url(url)
    layout = Layout(path)
    desc = _pick_manifest(layout.index(), tag, path)
    doc = layout.read_json_blob(desc, "manifest")
    media_type = m.media_type_of(doc, desc.media_type)
    if media_type in m.INDEXES:
        desc = m.select_platform(doc)
        doc = layout.read_json_blob(desc, "manifest")
        media_type = m.media_type_of(doc, desc.media_type)
    manifest = m.parse_manifest(doc, media_type)
    config = m.parse_config(
        layout.read_json_blob(manifest.config, "image config"), len(manifest.layers)
    )
    return m.image(manifest, config, layout.open_blob, verify=not skip_layer_validation)
