"""Build layer tars, OCI image layouts and plain tarballs for tests.

Everything is deterministic (fixed mtimes, no user or group names, gzip
without a timestamp, sorted JSON keys), so the same call always yields the
same digests.
"""

from __future__ import annotations

import functools
import gzip as gzip_module
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any

MTIME = 1_600_000_000
CREATED = "2020-09-13T12:26:40Z"

MEDIA_OCI_LAYOUT = "1.0.0"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"
CORRUPTIONS = ("layer-digest", "layer-size", "diff-id", "media-type", "truncate-gzip", "bad-gzip")
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


@dataclass(frozen=True)
class Entry:
    """One tar member, written exactly as given (no name normalisation)."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int | str = MTIME  # a str is a PAX time with a fraction: "1600000000.123456789"
    xattrs: tuple[tuple[str, bytes], ...] = ()
    devmajor: int = 0
    devminor: int = 0
    pax: tuple[tuple[str, str], ...] = field(default=())


def _xattrs(xattrs: dict[str, bytes] | None) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted((xattrs or {}).items()))


def file(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int | str = MTIME,
    xattrs: dict[str, bytes] | None = None,
) -> Entry:
    return Entry(
        name,
        tarfile.REGTYPE,
        data,
        mode=mode,
        uid=uid,
        gid=gid,
        mtime=mtime,
        xattrs=_xattrs(xattrs),
    )


def directory(
    name: str,
    *,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime: int | str = MTIME,
    xattrs: dict[str, bytes] | None = None,
) -> Entry:
    return Entry(
        name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=_xattrs(xattrs)
    )


def symlink(
    name: str, target: str, *, uid: int = 0, gid: int = 0, mtime: int | str = MTIME
) -> Entry:
    return Entry(name, tarfile.SYMTYPE, linkname=target, mode=0o777, uid=uid, gid=gid, mtime=mtime)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, linkname=target)


def fifo(name: str, *, mode: int = 0o644) -> Entry:
    return Entry(name, tarfile.FIFOTYPE, mode=mode)


def chardev(name: str, major: int = 1, minor: int = 3) -> Entry:
    return Entry(name, tarfile.CHRTYPE, mode=0o666, devmajor=major, devminor=minor)


def blockdev(name: str, major: int = 7, minor: int = 0) -> Entry:
    return Entry(name, tarfile.BLKTYPE, mode=0o660, devmajor=major, devminor=minor)


def whiteout(path: str) -> Entry:
    """The OCI whiteout deleting *path* from lower layers: "a/b" -> "a/.wh.b"."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return Entry(f"{parent}/.wh.{name}" if parent else f".wh.{name}")


def opaque(dirpath: str) -> Entry:
    """The OCI marker hiding all lower-layer contents of *dirpath*."""
    dirpath = dirpath.strip("/")
    return Entry(f"{dirpath}/.wh..wh..opq" if dirpath else ".wh..wh..opq")


def raw(
    name: str,
    type: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    linkname: str = "",
    *,
    pax: dict[str, str] | None = None,
) -> Entry:
    """Any member, hostile names included; *pax* adds raw PAX header records."""
    mode = 0o777 if type == tarfile.SYMTYPE else 0o755 if type == tarfile.DIRTYPE else 0o644
    return Entry(name, type, data, linkname, mode=mode, pax=tuple(sorted((pax or {}).items())))


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type = entry.type
    info.size = len(entry.data) if entry.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.linkname = entry.linkname
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    pax: dict[str, str] = {}
    if isinstance(entry.mtime, str):
        info.mtime = int(entry.mtime.partition(".")[0])
        pax["mtime"] = entry.mtime
    else:
        info.mtime = entry.mtime
    for key, value in entry.xattrs:
        # tarfile writes str PAX values back to bytes with surrogateescape.
        pax[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    pax.update(entry.pax)
    info.pax_headers = pax
    return info


def layer_tar(entries: list[Entry], *, padding: int = 0) -> bytes:
    """An uncompressed PAX tar of *entries*, then *padding* extra zero bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = _tarinfo(entry)
            tar.addfile(info, io.BytesIO(entry.data) if info.size else None)
    return out.getvalue() + b"\0" * padding


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else sha256(f"{chain[-1]} {diff_id}".encode()))
    return chain


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip_module.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _write_blob(layout: str, data: bytes, digest: str | None = None) -> str:
    digest = digest or sha256(data)
    path = os.path.join(layout, "blobs", *digest.split(":", 1))
    with open(path, "wb") as f:
        f.write(data)
    return digest


@dataclass(frozen=True)
class LayoutImage:
    """What write_oci_layout wrote: digests as the manifest and config state them."""

    path: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]
    chain_ids: list[str]
    tag: str = "latest"

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.path, "blobs", *digest.split(":", 1))

    @property
    def ref(self) -> str:
        """The image as grootfs names it: oci:///path:tag."""
        return f"oci://{self.path}:{self.tag}"


def write_oci_layout(
    path: str,
    layers: list[list[Entry] | bytes],
    *,
    tag: str = "latest",
    compression: str | list[str] = "gzip",
    env: list[str] | None = None,
    corrupt: str | None = None,
) -> LayoutImage:
    """Write (or add the tag *tag* to) the OCI image layout at *path*.

    A layer is a list of entries or an uncompressed tar. *corrupt* spoils
    the last layer: "layer-digest" (blob content differs from its digest,
    size right), "layer-size" (manifest size one too big), "diff-id"
    (config diff_id wrong), "media-type" (unknown layer media type),
    "truncate-gzip" / "bad-gzip" (blob cut in half / not compressed data at
    all, with digest and size in the manifest matching the spoiled blob).
    """
    if corrupt is not None and corrupt not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corrupt!r}")
    kinds = compression if isinstance(compression, list) else [compression] * len(layers)
    if len(kinds) != len(layers):
        raise ValueError("one compression per layer")
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(path, "oci-layout"), "wb") as f:
        f.write(_json({"imageLayoutVersion": MEDIA_OCI_LAYOUT}))

    descriptors: list[dict[str, object]] = []
    diff_ids: list[str] = []
    for i, (layer, kind) in enumerate(zip(layers, kinds, strict=True)):
        tar = layer if isinstance(layer, bytes) else layer_tar(layer)
        blob = compress(tar, kind)
        diff_id = sha256(tar)
        media_type = MEDIA_LAYER[kind]
        digest: str | None = None
        size = len(blob)
        if i == len(layers) - 1:
            if corrupt == "truncate-gzip":
                blob = blob[: len(blob) // 2]
            elif corrupt == "bad-gzip":
                blob = b"this is not a compressed layer\n" * 8
            elif corrupt == "layer-digest":
                digest = sha256(blob + b"spoiled")
            elif corrupt == "diff-id":
                diff_id = sha256(b"not the diff id")
            elif corrupt == "media-type":
                media_type = "application/vnd.example.unknown.layer"
            size = len(blob) + (1 if corrupt == "layer-size" else 0)
        digest = _write_blob(path, blob, digest)
        descriptors.append({"mediaType": media_type, "digest": digest, "size": size})
        diff_ids.append(diff_id)

    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {"Env": DEFAULT_ENV if env is None else env},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": "imagefactory"} for _ in layers],
    }
    config_blob = _json(config)
    config_digest = _write_blob(path, config_blob)
    manifest_blob = _json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {
                "mediaType": MEDIA_CONFIG,
                "digest": config_digest,
                "size": len(config_blob),
            },
            "layers": descriptors,
        }
    )
    manifest_digest = _write_blob(path, manifest_blob)

    index_path = os.path.join(path, "index.json")
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path, "rb") as f:
            index = json.load(f)
    manifests = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
    manifests.append(
        {
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_blob),
            "annotations": {REF_NAME: tag},
            "platform": {"architecture": "amd64", "os": "linux"},
        }
    )
    index["manifests"] = manifests
    with open(index_path, "wb") as f:
        f.write(_json(index))

    return LayoutImage(
        path=path,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=[str(d["digest"]) for d in descriptors],
        diff_ids=diff_ids,
        chain_ids=chain_ids(diff_ids),
        tag=tag,
    )


def write_tarball(path: str, entries: list[Entry], *, gzip: bool = False) -> str:
    """A plain rootfs tarball (the `docker export` kind), optionally gzipped."""
    data = layer_tar(entries)
    with open(path, "wb") as f:
        f.write(compress(data, "gzip") if gzip else data)
    return path


BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "id", "stat")


@functools.cache
def _busybox() -> bytes:
    with open(BUSYBOX, "rb") as f:
        return f.read()


def busybox_layer() -> list[Entry]:
    """A tiny runnable root filesystem: static busybox, a few applets, passwd and group."""
    return [
        directory("bin"),
        file("bin/busybox", _busybox(), mode=0o755),
        *(symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
        directory("etc"),
        file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\n"
            b"vcap:x:1000:1000::/home/vcap:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        file("etc/group", b"root:x:0:\nvcap:x:1000:\nnogroup:x:65534:\n"),
        directory("root", mode=0o700),
        directory("tmp", mode=0o1777),
    ]
