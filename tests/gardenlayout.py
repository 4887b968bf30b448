"""Garden's two-layer app image: the OCI layout it writes for ``preloaded+layer:`` URLs.

Diego's rep sends ``preloaded+layer:<stack tar>?layer=<droplet URL>&layer_path=<dir>&
layer_digest=<hex>``; Garden (guardian's image plugin client) then writes an OCI layout
at ``<depot>/<handle>/image`` and calls ``create oci:///<depot>/<handle>/image <handle>``.
Built from shared/docs/garden-cell.md, so the tests meet the layout a cell really makes:

- no ``oci-layout`` file, one manifest in ``index.json``, every descriptor's size 0;
- the config names ``sha256:<base>`` and ``sha256:<layer_digest>`` as diff_ids, where
  ``<base>`` is sha256 of ``"<stack tar path>-<its mtime in ns>"``, the path unresolved;
- ``blobs/sha256/<base>`` is a symlink to the stack tar (uncompressed,
  ``application/vnd.oci.image.layer.v1.tar``);
- the droplet layer (``...tar+gzip``) has ``urls: [<droplet URL>]``, the base-directory
  annotation, and no blob in the layout.

Shared with the simulated cell's Garden emulator (tests/release).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

BASE_DIRECTORY_ANNOTATION = "org.cloudfoundry.experimental.image.base-directory"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def stack_layer_hex(stack_tar: str) -> str:
    """The stack's layer id as Garden and GrootFS name it: sha256("<path>-<mtime ns>")."""
    mtime_ns = os.stat(stack_tar).st_mtime_ns
    return hashlib.sha256(f"{stack_tar}-{mtime_ns}".encode()).hexdigest()


def chain_id(parent: str, diff_id: str) -> str:
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


@dataclass(frozen=True)
class GardenImage:
    path: str  # the layout directory, <depot>/<handle>/image
    stack_chain_id: str  # sha256:<base>: the stack's volume, shared with plain creates
    droplet_chain_id: str

    @property
    def url(self) -> str:
        """What Garden passes to ``create``."""
        return f"oci://{self.path}"


def _blob(layout: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return digest


def _json(value: object) -> bytes:
    # Go's encoding/json: no spaces; field order does not matter to a reader.
    return json.dumps(value, separators=(",", ":")).encode()


def write(
    layout: str,
    stack_tar: str,
    droplet_url: str,
    droplet_digest: str,
    base_directory: str = "/home/vcap",
) -> GardenImage:
    """Write Garden's two-layer layout at *layout* (created, must not exist)."""
    base = stack_layer_hex(stack_tar)
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    os.symlink(stack_tar, os.path.join(layout, "blobs", "sha256", base))
    config = _blob(
        layout,
        _json(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [f"sha256:{base}", f"sha256:{droplet_digest}"],
                },
            }
        ),
    )
    droplet: dict[str, object] = {
        "mediaType": MEDIA_TAR_GZIP,
        "digest": f"sha256:{droplet_digest}",
        "size": 0,
        "urls": [droplet_url],
    }
    if base_directory:
        droplet["annotations"] = {BASE_DIRECTORY_ANNOTATION: base_directory}
    manifest = _blob(
        layout,
        _json(
            {
                "schemaVersion": 2,
                "config": {"mediaType": MEDIA_CONFIG, "digest": f"sha256:{config}", "size": 0},
                "layers": [
                    {"mediaType": MEDIA_TAR, "digest": f"sha256:{base}", "size": 0},
                    droplet,
                ],
            }
        ),
    )
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": f"sha256:{manifest}", "size": 0}],
    }
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(_json(index))
    stack = f"sha256:{base}"
    return GardenImage(
        path=layout,
        stack_chain_id=stack,
        droplet_chain_id=chain_id(stack, f"sha256:{droplet_digest}"),
    )


def write_from_rootfs_url(layout: str, rootfs: str) -> GardenImage:
    """Garden's layout for a ``preloaded+layer:<tar>?layer=..&layer_path=..&layer_digest=..``."""
    scheme, _, rest = rootfs.partition(":")
    if scheme != "preloaded+layer":
        raise ValueError(f"not a preloaded+layer rootfs: {rootfs}")
    parts = urlsplit("x://" + rest) if not rest.startswith("/") else urlsplit(rest)
    query = parse_qs(parts.query)
    return write(
        layout,
        parts.path,
        query["layer"][0],
        query["layer_digest"][0],
        query.get("layer_path", [""])[0],
    )
