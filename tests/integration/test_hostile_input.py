"""Hostile images and arguments: one clean line on stdout, never a forged second one.

Found by the fuzzing campaign of issue 13 (and kept found by tests/fuzz):
names that carry newlines or terminal escapes, JSON nested 100,000 deep.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile

import pytest

import imagefactory as f
from grootfs_py import mounts
from oneline import failure_line

FORGED = 'nope\n{"ociVersion":"1.0.2","root":{"path":"/etc"}}\x1b[2J'


def _run(grootfs, store, *args):
    result = grootfs(*args, store=store, check=False)
    return failure_line(result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize(
    ("entries", "shown"),
    [
        (
            [f.hardlink("link", FORGED)],
            r'nope\n{"ociVersion":"1.0.2","root":{"path":"/etc"}}\x1b[2J',
        ),
        ([f.raw("../\x1b]0;owned\x07\r\nx")], r"../\x1b]0;owned\x07\r\nx"),
        ([f.symlink("s", "/etc"), f.file("s/evil\u2028\x85name")], r"s/evil\u2028\x85name"),
        (
            [f.raw("../bytes", pax={"path": "../caf\udcff\udcfe"})],
            r"../caf\xff\xfe",
        ),
    ],
    ids=["hardlink-target", "escape-codes-in-name", "unicode-separators", "undecodable-bytes"],
)
def test_hostile_names_are_escaped_in_the_one_error_line(
    grootfs, dir_store, tmp_path, entries, shown
):
    layout = f.write_oci_layout(str(tmp_path / "l"), [entries])
    line = _run(grootfs, dir_store, "create", f"oci://{layout.path}", "c")
    assert line.startswith("unpack layer")
    assert shown in line


def _write_blob(layout: str, data: bytes) -> tuple[str, int]:
    digest = f.sha256(data)
    with open(os.path.join(layout, "blobs", *digest.split(":")), "wb") as fh:
        fh.write(data)
    return digest, len(data)


def _point_index_at(layout: str, digest: str, size: int) -> None:
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": f.MEDIA_MANIFEST, "digest": digest, "size": size}],
    }
    with open(os.path.join(layout, "index.json"), "w") as fh:
        json.dump(index, fh)


def _deep(kind: str) -> bytes:
    opened, closed = ("[", "]") if kind == "arrays" else ('{"a":', "}")
    return (opened * 100_000 + "1" + closed * 100_000).encode()


@pytest.mark.parametrize("kind", ["arrays", "objects"])
@pytest.mark.parametrize("document", ["index.json", "manifest", "image config"])
def test_deeply_nested_json_is_refused_with_the_depth_bound(
    grootfs, dir_store, tmp_path, document, kind
):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]])
    deep = _deep(kind)
    if document == "index.json":
        with open(os.path.join(layout.path, "index.json"), "wb") as fh:
            fh.write(deep)
    elif document == "manifest":
        _point_index_at(layout.path, *_write_blob(layout.path, deep))
    else:
        config_digest, config_size = _write_blob(layout.path, deep)
        with open(layout.blob_path(layout.manifest_digest), "rb") as fh:
            manifest = json.load(fh)
        manifest["config"].update(digest=config_digest, size=config_size)
        _point_index_at(layout.path, *_write_blob(layout.path, json.dumps(manifest).encode()))
    line = _run(grootfs, dir_store, "create", f"oci://{layout.path}", "c")
    assert "nested deeper than 100 levels" in line
    assert document in line


def test_oversized_index_is_refused_with_the_size_bound(grootfs, dir_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]])
    with open(os.path.join(layout.path, "index.json"), "wb") as fh:
        fh.write(b'{"manifests": [], "pad": "' + b"x" * (9 << 20) + b'"}')
    line = _run(grootfs, dir_store, "create", f"oci://{layout.path}", "c")
    assert line == "invalid OCI layout index.json: larger than 8388608 bytes"


def test_deeply_nested_config_file_is_refused(grootfs, dir_store, tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{" * 100_000)
    line = _run(grootfs, dir_store, "--config", str(config), "list")
    assert line == "invalid config file: nested deeper than 100 levels"


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_config_that_is_not_a_regular_file_is_refused_without_blocking(
    grootfs, dir_store, tmp_path, kind
):
    config = tmp_path / "config.yml"
    if kind == "fifo":
        os.mkfifo(config)  # no writer: a plain open() would block forever
    else:
        config.mkdir()
    line = _run(grootfs, dir_store, "--config", str(config), "list")
    assert line.startswith(f"invalid config path: {config}: a {kind.replace('fifo', 'FIFO')}")


def test_delete_echoes_a_hostile_id_on_one_escaped_line(grootfs, dir_store):
    result = grootfs("delete", "gone\n{}\x1b[2J", store=dir_store)
    assert result.stdout == "Image `gone\\n{}\\x1b[2J` not found. Skipping delete.\n"


def test_list_prints_one_escaped_line_per_image(grootfs, tmp_path, require_root):
    # A store whose path holds a newline: each image path is still one line.
    store = str(tmp_path / "st\nore")
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]])
    grootfs("init-store", store=store)
    try:
        grootfs("create", "--without-mount", f"oci://{layout.path}", "one", store=store)
        grootfs("create", "--without-mount", f"oci://{layout.path}", "two", store=store)
        lines = grootfs("list", store=store).stdout.splitlines()
        escaped = store.replace("\n", "\\n")
        assert sorted(lines) == [f"{escaped}/images/one", f"{escaped}/images/two"]
    finally:
        grootfs("delete-store", store=store)


def test_a_tar_with_tarfile_bytes_names_is_not_a_traceback(grootfs, dir_store, tmp_path):
    # A GNU long name of raw bytes that are not UTF-8, escaping the layer.
    tar = tmp_path / "raw.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as out:
        info = tarfile.TarInfo("../" + "\xe9" * 120 + "\n")
        out.addfile(info)
    line = _run(grootfs, dir_store, "create", str(tar), "c")
    assert "\\xe9" in line and "\\n" in line


def test_an_unexpected_exception_is_one_internal_error_line(tmp_path):
    # Injected on purpose: an unforeseen bug cannot be produced by real input on
    # demand, so a child interpreter makes one function raise and runs the real main.
    log_file = tmp_path / "log"
    script = (
        "import sys\n"
        "from grootfs_py import cli, images\n"
        "def broken(store):\n"
        "    raise RuntimeError('boom\\n{\"forged\": true}')\n"
        "images.list_paths = broken\n"
        f"argv = ['--store', {str(tmp_path)!r}, '--log-file', {str(log_file)!r}, 'list']\n"
        "sys.exit(cli.main(argv))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout == 'internal error: RuntimeError: boom\\n{"forged": true}\n'
    assert result.stderr == ""
    record = json.loads(log_file.read_text().splitlines()[-1])
    assert record["message"] == "grootfs.list.internal-error"
    assert record["log_level"] == 2  # error
    assert "Traceback (most recent call last)" in record["data"]["trace"]
    assert "RuntimeError: boom" in record["data"]["trace"]


def _gzip_bomb(size: int) -> bytes:
    """A gzipped layer tar of one file of *size* zero bytes (about 1/1000 of it compressed)."""
    import zlib

    header = tarfile.TarInfo("bomb")
    header.size = size
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [gz.compress(header.tobuf(tarfile.PAX_FORMAT))]
    chunk = bytes(1 << 20)
    for _ in range(size // len(chunk)):
        out.append(gz.compress(chunk))
    out.append(gz.compress(bytes(2 * tarfile.BLOCKSIZE)))
    out.append(gz.flush())
    return b"".join(out)


def test_a_gzip_bomb_past_the_free_space_fails_cleanly(grootfs, small_xfs_store, tmp_path):
    store = small_xfs_store
    base = [f.file("base", b"b" * 10_000)]
    layout = f.write_oci_layout(str(tmp_path / "l"), [base, [f.file("placeholder")]])
    # The bomb replaces the top layer's blob; --skip-layer-validation spares
    # hashing 600 MiB here to state its digests (the unpack path is the same).
    bomb = _gzip_bomb(600 << 20)
    assert len(bomb) < 1 << 20
    with open(layout.blob_path(layout.layer_digests[1]), "wb") as fh:
        fh.write(bomb)
    url = f"oci://{layout.path}"
    line = _run(grootfs, store, "create", "--skip-layer-validation", url, "c")
    named = (layout.layer_digests[1], layout.chain_ids[1])  # unverified: either may name it
    assert any(line.startswith(f"unpack layer {name}: ") for name in named), line
    assert line.endswith(": no space left in the store")
    # Nothing of the bomb is left: no incomplete volume, image, meta record or mount.
    volumes = os.listdir(os.path.join(store, "volumes"))
    assert volumes in ([], [layout.chain_ids[0].split(":")[1]])
    assert os.listdir(os.path.join(store, "images")) == []
    assert os.listdir(os.path.join(store, "tmp")) == []
    assert os.listdir(os.path.join(store, "meta", "dependencies")) == []
    assert mounts.under(store) == []
    assert grootfs("check-store", store=store).returncode == 0
    # The space came back: a real image still fits.
    small = f.write_oci_layout(str(tmp_path / "small"), [base, [f.file("x", b"x" * 100_000)]])
    grootfs("create", f"oci://{small.path}", "after", store=store)
    grootfs("delete", "after", store=store)


def _make_special(path: str, kind: str) -> None:
    """Replace *path* by a FIFO, a character device (like /dev/zero), or a directory."""
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # reads zeros forever
    else:
        os.mkdir(path)


def _create_within(store: str, log: str, url: str, timeout: float = 60) -> str:
    """create, as a process that must end by itself in *timeout* seconds; its one line."""
    argv = [sys.executable, "-m", "grootfs_py", "--store", store, "--log-file", log]
    result = subprocess.run(
        [*argv, "create", url, "c"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,  # a hang fails the test instead of blocking it
    )
    return failure_line(result.returncode, result.stdout, result.stderr)


SPECIALS = ["fifo", "device", "directory"]


@pytest.mark.parametrize("kind", SPECIALS)
@pytest.mark.parametrize("which", ["layer", "manifest", "index.json"])
def test_a_layout_file_that_is_not_regular_is_refused_without_blocking(
    dir_store, grootfs_log, tmp_path, which, kind
):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]])
    path = {
        "layer": layout.blob_path(layout.layer_digests[0]),
        "manifest": layout.blob_path(layout.manifest_digest),
        "index.json": os.path.join(layout.path, "index.json"),
    }[which]
    _make_special(path, kind)
    line = _create_within(dir_store, str(grootfs_log), f"oci://{layout.path}")
    assert "not a regular file" in line
    assert os.listdir(os.path.join(dir_store, "images")) == []


@pytest.mark.parametrize("link", [False, True], ids=["path", "symlink-to-it"])
@pytest.mark.parametrize("kind", SPECIALS)
def test_a_stack_tar_that_is_not_regular_is_refused_without_blocking(
    dir_store, grootfs_log, tmp_path, kind, link
):
    target = str(tmp_path / "rootfs.tar")
    _make_special(target, kind)
    path = target
    if link:
        path = str(tmp_path / "link.tar")
        os.symlink(target, path)
    line = _create_within(dir_store, str(grootfs_log), path)
    if kind == "directory":
        assert line == "invalid base image: directory provided instead of a tar file"
    else:
        assert line.startswith("invalid base image: ")
        assert "not a regular file" in line
