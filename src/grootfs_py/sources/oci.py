"""OCI image layouts on local disk: ``oci:///absolute/path[:tag]``."""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Any, BinaryIO, cast

from grootfs_py import fsutil
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
    """One layout on disk. ``oci-layout`` is not required: Garden's layouts have none.

    With *skip_validation* (``create.skip_layer_validation``) sizes are not
    checked, as Garden's descriptors all say 0; JSON blobs are still named by
    their digest and checked against it.
    """

    def __init__(self, path: str, *, skip_validation: bool = False, certificates: str = "") -> None:
        self.path = path
        self.skip_validation = skip_validation
        self.certificates = certificates
        self._remote: Any = None
        if not os.path.isdir(path):
            raise ImageSourceError("Image source doesn't exist")

    def blob_path(self, digest: str) -> str:
        algorithm, _, hexpart = check_digest(digest).partition(":")
        return os.path.join(self.path, "blobs", algorithm, hexpart)

    def read_json_blob(self, desc: m.Descriptor, what: str) -> dict[str, Any]:
        if desc.size > m.MAX_JSON_BYTES:
            raise ImageSourceError(f"invalid {what} {desc.digest}: {desc.size} bytes is too large")
        limit = m.MAX_JSON_BYTES if self.skip_validation else desc.size
        data = self._read(self.blob_path(desc.digest), limit + 1, f"{what} {desc.digest}")
        algorithm, _, expected = desc.digest.partition(":")
        if len(data) > m.MAX_JSON_BYTES:
            raise ImageSourceError(f"invalid {what} {desc.digest}: too large")
        size_ok = self.skip_validation or len(data) == desc.size
        if not size_ok or hashlib.new(algorithm, data).hexdigest() != expected:
            raise ImageSourceError(f"{what} {desc.digest}: digest or size mismatch")
        return m.load_json(data, what)

    def open_blob(self, desc: m.Descriptor) -> BinaryIO:
        """The layer's bytes: from its first http(s) URL if it has any, else from blobs/.

        As GrootFS (containers/image) does: URLs of other schemes are
        skipped, and a layer with no usable URL is read from the layout. A
        blob (often a symlink, to a stack tar for Garden) must resolve to a
        regular file: a FIFO or a device is refused, never opened.
        """
        web = [u for u in desc.urls if u.partition(":")[0].lower() in ("http", "https")]
        if web:
            if self._remote is None:
                from grootfs_py.sources import remote

                self._remote = remote.RemoteLayers(self.certificates)
            return cast(BinaryIO, self._remote.open(web, desc.digest))
        path = self.blob_path(desc.digest)
        try:
            return fsutil.open_regular(path)
        except FileNotFoundError:
            if desc.urls:
                scheme = desc.urls[0].partition(":")[0]
                raise ImageSourceError(
                    f"read layer {desc.digest}: URL scheme `{scheme}` is not supported "
                    "(http and https only) and the blob is not in the layout"
                ) from None
            raise ImageSourceError(f"read layer {desc.digest}: {path}: no such file") from None
        except OSError as exc:
            raise ImageSourceError(f"read layer {desc.digest}: {path}: {exc.strerror}") from None

    def index(self) -> dict[str, Any]:
        path = os.path.join(self.path, "index.json")
        data = self._read(path, m.MAX_JSON_BYTES + 1, "index.json")
        return m.load_json(data, "OCI layout index.json")

    def _read(self, path: str, limit: int, what: str) -> bytes:
        try:
            with fsutil.open_regular(path) as f:
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


def load(url: str, *, skip_layer_validation: bool = False, certificates_path: str = "") -> Image:
    path, tag = parse_url(url)
    layout = Layout(path, skip_validation=skip_layer_validation, certificates=certificates_path)
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
