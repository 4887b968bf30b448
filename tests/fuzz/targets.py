"""Fuzz targets: one function per parser, bytes in, expected errors swallowed.

Each target feeds one input to the real parser and returns normally when the
parser accepted it or refused it the documented way (the error kind the CLI
turns into one line). Anything else it raises is a finding: an exception
kind no caller expects (a traceback), or a refusal whose message would not
print as one line.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable

from grootfs_py import cli, config, jsonload, tarstream
from grootfs_py.errors import GrootError
from grootfs_py.sources import manifest, oci, reference


class Finding(AssertionError):
    """An invariant of a parser's output broke (not an exception it raised)."""


def _one_line(message: str) -> None:
    shown = cli.escape(message)
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in shown):
        raise Finding(f"escaped message keeps a control character: {shown!r}")
    shown.encode("utf-8")  # printable on a UTF-8 stdout: no lone surrogate left


def tar(data: bytes) -> None:
    """The tar reader: every entry and all of its data, to the end of the archive."""
    reader = tarstream.Reader(io.BytesIO(data))
    try:
        while (entry := reader.next()) is not None:
            while reader.read(1 << 16):
                pass
            _one_line(entry.name + entry.linkname)
    except tarstream.TarFormatError as exc:
        _one_line(str(exc))


def image_json(data: bytes) -> None:
    """index.json, manifests, indexes and configs: what oci.load and registry.load parse."""
    try:
        doc = manifest.load_json(data, "manifest")
        media_type = manifest.media_type_of(doc)
        if media_type in manifest.INDEXES or "manifests" in doc:
            if isinstance(doc.get("manifests"), list):
                oci._pick_manifest(doc, None, "/fuzz")
                oci._pick_manifest(doc, "latest", "/fuzz")
            manifest.select_platform(doc)
        else:
            manifest.parse_manifest(doc, media_type)
    except GrootError as exc:
        _one_line(str(exc))
    try:  # the same document as an image config
        manifest.parse_config(manifest.load_json(data, "image config"), 1)
    except GrootError as exc:
        _one_line(str(exc))


def image_reference(data: bytes) -> None:
    """docker:// references and oci:// URLs; a parsed reference prints back to itself."""
    text = data.decode("utf-8", "surrogateescape")
    try:
        ref = reference.parse("docker://" + text)
    except GrootError as exc:
        _one_line(str(exc))
    else:
        # What is pulled survives printing (a tag beside a digest is dropped: the digest wins).
        again = reference.parse("docker://" + str(ref))
        if (again.registry, again.repository, again.reference) != (
            ref.registry,
            ref.repository,
            ref.reference,
        ):
            raise Finding(f"{text!r} parses to {ref!r} but its string to {again!r}")
    try:
        oci.parse_url("oci://" + text)
    except GrootError as exc:
        _one_line(str(exc))


def config_file(data: bytes) -> None:
    """The config loader, YAML or JSON, then the checks every command makes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # config.load refuses it before parsing (tested in tests/unit)
    try:
        config.parse(text).validate()
    except GrootError as exc:
        _one_line(str(exc))


def json_bounds(data: bytes) -> None:
    """jsonload: whatever the bytes, a value or the caller's error, never RecursionError."""
    try:
        jsonload.loads(data, "document", max_bytes=1 << 20)
    except GrootError as exc:
        _one_line(str(exc))


# Set by guided.py to a scratch tmpfs inside a read-only mount namespace (sandbox.py).
SANDBOX = ""


def unpack(data: bytes) -> None:
    """The unpacker, as root: entries into a fresh directory; nothing may land outside it."""
    from grootfs_py import fsutil
    from grootfs_py.idmap import IdMap
    from grootfs_py.unpack import unpack_layer

    if not SANDBOX:
        raise RuntimeError("the unpack target runs only inside sandbox.enter()")
    top = tempfile.mkdtemp(dir=SANDBOX)
    dest = os.path.join(top, "layer")
    os.mkdir(dest)
    try:
        unpack_layer(io.BytesIO(data), dest, IdMap.of((), ()), layer="sha256:fuzz")
    except GrootError as exc:
        _one_line(str(exc))
        if "Read-only file system" in str(exc):
            raise Finding(f"a write outside the layer: {exc}") from None
    finally:
        beside = os.listdir(top)
        fsutil.remove_tree(top)
    if beside != ["layer"] or os.listdir(SANDBOX):
        raise Finding(f"the unpack wrote beside its layer: {beside}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "tar": tar,
    "image-json": image_json,
    "reference": image_reference,
    "config": config_file,
    "json-bounds": json_bounds,
    "unpack": unpack,
}
