"""The test image factory writes images that real OCI tools accept."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

import imagefactory as f


def skopeo(*args: str) -> Any:
    # make deps installs skopeo; a missing one is a broken setup, not a skip.
    assert shutil.which("skopeo"), "skopeo is not installed: run make deps"
    out = subprocess.run(
        ["skopeo", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def blob(image: f.LayoutImage, digest: str) -> bytes:
    return Path(image.blob_path(digest)).read_bytes()


def members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
        return t.getmembers()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layout_is_accepted_by_skopeo(tmp_path: Path, compression: str) -> None:
    image = f.write_oci_layout(
        str(tmp_path), [[f.file("a", b"1")], [f.file("b", b"2")]], compression=compression
    )
    inspected = skopeo("inspect", f"oci:{tmp_path}:latest")
    assert inspected["Layers"] == image.layer_digests
    assert inspected["Digest"] == image.manifest_digest
    manifest = skopeo("inspect", "--raw", f"oci:{tmp_path}:latest")
    assert {layer["mediaType"] for layer in manifest["layers"]} == {f.MEDIA_LAYER[compression]}
    config = skopeo("inspect", "--config", f"oci:{tmp_path}:latest")
    assert config["rootfs"]["diff_ids"] == image.diff_ids


def test_layout_is_accepted_by_umoci(tmp_path: Path) -> None:
    assert shutil.which("umoci"), "umoci is not installed: run make deps"
    f.write_oci_layout(str(tmp_path / "l"), [f.busybox_layer(), [f.whiteout("etc/group")]])
    subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path / 'l'}:latest", str(tmp_path / "bundle")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    )
    rootfs = tmp_path / "bundle" / "rootfs"
    assert os.readlink(rootfs / "bin/sh") == "busybox"
    assert (rootfs / "etc/passwd").exists()
    assert not (rootfs / "etc/group").exists()


def test_every_blob_is_stored_under_its_digest(tmp_path: Path) -> None:
    image = f.write_oci_layout(str(tmp_path), [[f.file("a")]], compression=["zstd"])
    for path in (tmp_path / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    tar = (
        zstandard.ZstdDecompressor().decompressobj().decompress(blob(image, image.layer_digests[0]))
    )
    assert f.sha256(tar) == image.diff_ids[0]


def test_diff_ids_are_digests_of_uncompressed_tars_and_chain_ids_chain_them(
    tmp_path: Path,
) -> None:
    layers = [[f.file("a")], [f.file("b")], [f.file("c")]]
    image = f.write_oci_layout(str(tmp_path), list(layers))
    assert image.diff_ids == [f.sha256(f.layer_tar(layer)) for layer in layers]
    d = image.diff_ids
    c1 = "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d[2]}".encode()).hexdigest()
    assert image.chain_ids == [d[0], c1, c2]


def test_output_is_deterministic(tmp_path: Path) -> None:
    one = f.write_oci_layout(str(tmp_path / "1"), [f.busybox_layer()], compression=["gzip"])
    two = f.write_oci_layout(str(tmp_path / "2"), [f.busybox_layer()], compression=["gzip"])
    assert one.manifest_digest == two.manifest_digest
    assert one.layer_digests == two.layer_digests


def test_second_tag_is_added_to_the_same_layout(tmp_path: Path) -> None:
    first = f.write_oci_layout(str(tmp_path), [[f.file("a")]], tag="one")
    second = f.write_oci_layout(str(tmp_path), [[f.file("b")]], tag="two", env=["A=1"])
    again = f.write_oci_layout(str(tmp_path), [[f.file("c")]], tag="one")
    index = json.loads((tmp_path / "index.json").read_text())
    tags = {m["annotations"][f.REF_NAME]: m["digest"] for m in index["manifests"]}
    assert tags == {"one": again.manifest_digest, "two": second.manifest_digest}
    assert again.manifest_digest != first.manifest_digest
    assert skopeo("inspect", f"oci:{tmp_path}:two")["Env"] == ["A=1"]


@pytest.mark.parametrize("corrupt", f.CORRUPTIONS)
def test_corruption_spoils_only_the_last_layer_as_named(tmp_path: Path, corrupt: str) -> None:
    image = f.write_oci_layout(
        str(tmp_path), [[f.file("a")], [f.file("b", b"x" * 5000)]], corrupt=corrupt
    )
    manifest = json.loads(blob(image, image.manifest_digest))
    first, last = manifest["layers"]
    data = blob(image, last["digest"])
    assert f.sha256(blob(image, first["digest"])) == first["digest"]
    digest_ok = f.sha256(data) == last["digest"]
    size_ok = len(data) == last["size"]
    media_ok = last["mediaType"] == f.MEDIA_LAYER["gzip"]
    try:
        diff_ok = f.sha256(gzip.decompress(data)) == image.diff_ids[1]
    except (OSError, EOFError):
        diff_ok = None  # not decompressible at all
    expected = {
        "layer-digest": (False, True, True, True),
        "layer-size": (True, False, True, True),
        "diff-id": (True, True, True, False),
        "media-type": (True, True, False, True),
        "truncate-gzip": (True, True, True, None),
        "bad-gzip": (True, True, True, None),
    }[corrupt]
    assert (digest_ok, size_ok, media_ok, diff_ok) == expected


def test_layer_tar_keeps_names_modes_owners_xattrs_and_pax_mtimes() -> None:
    tar = f.layer_tar(
        [
            f.directory("d", mode=0o1777),
            f.file("d/f", b"data", mode=0o4755, uid=1000, gid=42, xattrs={"user.k": b"\xff"}),
            f.file("ns", mtime="1600000000.123456789"),
            f.symlink("s", "/abs"),
            f.hardlink("h", "d/f"),
            f.fifo("p"),
            f.chardev("c", 1, 3),
            f.whiteout("d/gone"),
            f.opaque("d"),
            f.opaque(""),
            f.raw("../escape", data=b"e"),
        ]
    )
    got = {m.name: m for m in members(tar)}
    assert list(got) == [
        "d",
        "d/f",
        "ns",
        "s",
        "h",
        "p",
        "c",
        "d/.wh.gone",
        "d/.wh..wh..opq",
        ".wh..wh..opq",
        "../escape",
    ]
    assert got["d"].isdir() and got["d"].mode == 0o1777
    assert (got["d/f"].mode, got["d/f"].uid, got["d/f"].gid) == (0o4755, 1000, 42)
    raw_xattr = got["d/f"].pax_headers["SCHILY.xattr.user.k"]
    assert raw_xattr.encode("utf-8", "surrogateescape") == b"\xff"
    assert got["ns"].pax_headers["mtime"] == "1600000000.123456789"
    assert got["s"].issym() and got["s"].linkname == "/abs"
    assert got["h"].islnk() and got["h"].linkname == "d/f"
    assert got["p"].isfifo() and got["c"].ischr()
    assert (got["c"].devmajor, got["c"].devminor) == (1, 3)


def test_tarball_is_plain_or_gzipped(tmp_path: Path) -> None:
    plain = f.write_tarball(str(tmp_path / "t.tar"), [f.file("a", b"1")])
    zipped = f.write_tarball(str(tmp_path / "t.tgz"), [f.file("a", b"1")], gzip=True)
    assert [m.name for m in members(Path(plain).read_bytes())] == ["a"]
    assert gzip.decompress(Path(zipped).read_bytes()) == Path(plain).read_bytes()


def test_busybox_layer_has_an_executable_busybox_and_applet_links() -> None:
    got = {m.name: m for m in members(f.layer_tar(f.busybox_layer()))}
    assert got["bin/busybox"].mode == 0o755 and got["bin/busybox"].size > 100_000
    assert all(got[f"bin/{a}"].linkname == "busybox" for a in f.BUSYBOX_APPLETS)
    assert {"etc/passwd", "etc/group"} <= set(got)
