"""Garden's two-layer app images: the layout Garden writes, the droplet from nginx over mTLS.

The blobstore is Debian's nginx on loopback requiring a client certificate,
as Cloud Foundry's WebDAV blobstore does; the certificate directory holds
Garden's ``remote-layer.{crt,cert,key}``. The layout is written by
``gardenlayout`` as Garden writes it (no oci-layout file, sizes 0, the stack
blob a symlink to the stack tar, the droplet only a URL).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import blobstore as b
import gardenlayout as g
import imagefactory as f
import registry as r
from grootfs_py import mounts

VCAP = 2000


@dataclass
class Cell:
    """A blobstore, the certificates a cell has for it, and a stack on disk."""

    blobstore: b.Blobstore
    certs: Path  # Garden's /var/vcap/jobs/garden/certs
    stack_tar: str  # as Diego names it: through a symlinked package directory
    work: Path
    ca: r.Cert
    client: r.Cert

    def droplet(self, name: str, entries: list[f.Entry], *, gzip: bool = True) -> tuple[str, str]:
        """Publish a droplet; return its URL and the hex sha256 of what is served."""
        tar = f.layer_tar(entries)
        data = f.compress(tar, "gzip") if gzip else tar
        (self.blobstore.root / name).write_bytes(data)
        return f"{self.blobstore.url}/{name}", hashlib.sha256(data).hexdigest()

    def layout(self, name: str, url: str, digest: str, base: str = "/home/vcap") -> g.GardenImage:
        return g.write(str(self.work / "depot" / name / "image"), self.stack_tar, url, digest, base)

    def config(self, store: str, **create: object) -> dict[str, object]:
        settings: dict[str, object] = {
            "skip_layer_validation": True,
            "remote_layer_client_certificates_path": str(self.certs),
        }
        settings.update(create)
        return {"store": store, "create": settings}


STACK = [
    f.directory("etc"),
    f.file("etc/os-release", b"ID=cflinuxfs4\n"),
    f.directory("home", mode=0o751, uid=0, gid=0),
    f.directory("home/vcap", mode=0o750, uid=VCAP, gid=VCAP),
    f.file("home/vcap/.profile", b"# stack\n", uid=VCAP, gid=VCAP),
    f.directory("usr"),
    f.symlink("linked", "usr"),
]


def _app(marker: bytes) -> list[f.Entry]:
    # A droplet without a "./" entry, so /home/vcap keeps the stack's owner and mode.
    return [
        f.directory("app", uid=VCAP, gid=VCAP),
        f.file("app/run.sh", b"#!/bin/sh\necho " + marker + b"\n", mode=0o755, uid=VCAP),
        f.hardlink("app/run-again.sh", "app/run.sh"),
        f.whiteout(".profile"),
    ]


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cell]:
    work = tmp_path_factory.mktemp("cell")
    ca = r.make_ca(work / "pki", "blobstore-ca")
    server = r.make_cert(work / "pki", "blobstore", ca, server=True)
    client = r.make_cert(work / "pki", "cell", ca, server=False)
    certs = work / "certs"
    certs.mkdir()
    shutil.copy(ca.cert, certs / "remote-layer.crt")
    shutil.copy(client.cert, certs / "remote-layer.cert")
    shutil.copy(client.key, certs / "remote-layer.key")
    data = work / "data" / "packages" / "cflinuxfs4" / "abc123"
    data.mkdir(parents=True)
    f.write_tarball(str(data / "rootfs.tar"), STACK)
    (work / "packages").mkdir()
    (work / "packages" / "cflinuxfs4").symlink_to(data)
    root = work / "blobs"
    root.mkdir()
    with b.Blobstore(work / "nginx", root, tls=server, client_ca=ca.cert) as store:
        yield Cell(store, certs, str(work / "packages/cflinuxfs4/rootfs.tar"), work, ca, client)


def _volumes(store: str) -> set[str]:
    return set(os.listdir(os.path.join(store, "volumes")))


def _snapshot(store: str) -> dict[str, object]:
    def listing(sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(store, sub)))

    return {sub: listing(sub) for sub in ("images", "volumes", "l", "tmp", "meta/dependencies")} | {
        "mounts": mounts.under(store)
    }


def test_two_layer_app_unpacks_the_droplet_under_home_vcap(grootfs, xfs_store, cell):
    url, digest = cell.droplet("app1.tgz", _app(b"one"))
    image = cell.layout("app1", url, digest)
    result = grootfs("create", image.url, "app1", config=cell.config(xfs_store))
    rootfs = Path(xfs_store, "images", "app1", "rootfs")
    assert str(rootfs) in result.stdout
    run = rootfs / "home/vcap/app/run.sh"
    assert run.read_bytes() == b"#!/bin/sh\necho one\n"
    # The hardlink resolved under the base directory, in the droplet's own layer.
    again = rootfs / "home/vcap/app/run-again.sh"
    assert os.stat(again).st_ino == os.stat(run).st_ino
    # The whiteout hid the stack's /home/vcap/.profile, not a /.profile.
    assert not (rootfs / "home/vcap/.profile").exists()
    assert (rootfs / "etc/os-release").exists()
    # The droplet layer made /home and /home/vcap with the stack's modes and owners.
    droplet_volume = Path(xfs_store, "volumes", image.droplet_chain_id.split(":")[1])
    home, vcap = os.stat(droplet_volume / "home"), os.stat(droplet_volume / "home/vcap")
    assert (stat.S_IMODE(home.st_mode), home.st_uid) == (0o751, 0)
    assert (stat.S_IMODE(vcap.st_mode), vcap.st_uid, vcap.st_gid) == (0o750, VCAP, VCAP)
    assert _volumes(xfs_store) == {
        image.stack_chain_id.split(":")[1],
        image.droplet_chain_id.split(":")[1],
    }
    assert cell.blobstore.requests("/app1.tgz") == [
        f"GET /app1.tgz 200 {os.path.getsize(cell.blobstore.root / 'app1.tgz')}"
    ]


def test_plain_stack_and_apps_share_one_stack_volume(grootfs, xfs_store, cell):
    config = cell.config(xfs_store)
    # A privileged task on the plain stack (Garden's preloaded: rootfs passes the path).
    grootfs("create", cell.stack_tar, "task", config=config)
    stack_volumes = _volumes(xfs_store)
    assert stack_volumes == {g.stack_layer_hex(cell.stack_tar)}
    url, digest = cell.droplet("app2.tgz", _app(b"two"))
    grootfs("create", cell.layout("app2", url, digest).url, "app2", config=config)
    assert len(_volumes(xfs_store) - stack_volumes) == 1, "only the droplet is new"
    url3, digest3 = cell.droplet("app3.tgz", _app(b"three"))
    grootfs("create", cell.layout("app3", url3, digest3).url, "app3", config=config)
    assert len(_volumes(xfs_store) - stack_volumes) == 2
    # The same droplet again (a second instance): nothing fetched, nothing unpacked.
    before = _volumes(xfs_store)
    grootfs("create", cell.layout("app2-i1", url, digest).url, "app2-i1", config=config)
    assert _volumes(xfs_store) == before
    assert len(cell.blobstore.requests("/app2.tgz")) == 1


def test_stack_path_is_not_resolved_when_naming_its_layer(grootfs, xfs_store, cell):
    resolved = os.path.realpath(cell.stack_tar)
    assert resolved != cell.stack_tar
    grootfs("create", cell.stack_tar, "by-link", config=cell.config(xfs_store))
    grootfs("create", resolved, "by-real-path", config=cell.config(xfs_store))
    assert _volumes(xfs_store) == {g.stack_layer_hex(cell.stack_tar), g.stack_layer_hex(resolved)}


def test_garden_layout_needs_skip_layer_validation(grootfs, xfs_store, cell):
    url, digest = cell.droplet("strict.tgz", _app(b"strict"))
    image = cell.layout("strict", url, digest)
    config = cell.config(xfs_store, skip_layer_validation=False)
    result = grootfs("create", image.url, "strict", config=config, check=False)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"manifest sha256:{_manifest_hex(image)}: digest or size mismatch"
    ]


def _manifest_hex(image: g.GardenImage) -> str:
    import json

    index = json.loads(Path(image.path, "index.json").read_text())
    return str(index["manifests"][0]["digest"]).split(":")[1]


def test_empty_certificate_files_count_as_absent(grootfs, xfs_store, cell, tmp_path):
    """BOSH renders unset properties as empty files: a plain-TLS blobstore still works."""
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(cell.ca.cert, certs / "remote-layer.crt")
    (certs / "remote-layer.cert").write_text("")
    (certs / "remote-layer.key").write_text("")
    root = tmp_path / "root"
    root.mkdir()
    server = r.Cert(*(Path(p) for p in _server_cert(cell)))
    with b.Blobstore(tmp_path / "nginx", root, tls=server) as plain:
        tar = f.compress(f.layer_tar(_app(b"tls")), "gzip")
        (root / "d.tgz").write_bytes(tar)
        image = cell.layout("empty-certs", f"{plain.url}/d.tgz", hashlib.sha256(tar).hexdigest())
        config = cell.config(xfs_store, remote_layer_client_certificates_path=str(certs))
        grootfs("create", image.url, "c", config=config)
    assert Path(xfs_store, "images/c/rootfs/home/vcap/app/run.sh").exists()


def _server_cert(cell: Cell) -> tuple[Path, Path]:
    return cell.work / "pki/blobstore.pem", cell.work / "pki/blobstore.key"


# -- bad input: one line, exit 1, nothing left ----------------------------------------


def _fails(grootfs, store: str, url: str, config: dict[str, object], stack: str) -> str:
    before = _snapshot(store)
    result = grootfs("create", url, "bad", config=config, check=False)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one line on stdout, got {result.stdout!r}"
    after = _snapshot(store)
    # The stack may stay (it is whole and shared); nothing else.
    assert set(after["volumes"]) - set(before["volumes"]) <= {stack}  # type: ignore[arg-type]
    assert not any("-incomplete-" in v for v in after["volumes"])  # type: ignore[union-attr]
    for key in ("images", "tmp", "meta/dependencies", "mounts"):
        assert after[key] == before[key], key
    return lines[0]


@pytest.fixture
def bad(grootfs, xfs_store, cell):
    """Fail a create and return its line, checking the store kept nothing but the stack."""

    def run(url: str, **create: object) -> str:
        config = cell.config(xfs_store, **create)
        return _fails(grootfs, xfs_store, url, config, g.stack_layer_hex(cell.stack_tar))

    return run


def test_unreachable_droplet_url_is_named(bad, cell):
    port = r.free_port()
    image = cell.layout("unreachable", f"https://127.0.0.1:{port}/d.tgz", "ab" * 32)
    line = bad(image.url)
    assert f"https://127.0.0.1:{port}/d.tgz" in line
    assert "connection refused (tried 4 times)" in line


@pytest.mark.parametrize("status", [404, 500, 503])
def test_droplet_http_errors_name_the_url_without_credentials(bad, cell, status):
    path = "missing.tgz" if status == 404 else f"status/{status}"
    host = cell.blobstore.url.replace("https://", "https://cc-user:s3cret@")
    url = f"{host}/{path}?md5=abc&expires=99&signature=t0ken"
    line = bad(cell.layout(f"status-{status}", url, f"{status:064d}").url)
    assert f"{cell.blobstore.url}/{path}: HTTP {status}" in line
    if status != 404:
        assert "(tried 4 times)" in line
    assert "s3cret" not in line and "t0ken" not in line and "cc-user" not in line


def test_scheme_other_than_http_is_refused(bad, cell):
    line = bad(cell.layout("ftp", "ftp://127.0.0.1/d.tgz", "cd" * 32).url)
    assert "URL scheme `ftp` is not supported (http and https only)" in line


def test_client_certificate_the_server_rejects(bad, cell, tmp_path):
    other_ca = r.make_ca(tmp_path / "pki", "other-ca")
    other = r.make_cert(tmp_path / "pki", "intruder", other_ca, server=False)
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(cell.ca.cert, certs / "remote-layer.crt")
    shutil.copy(other.cert, certs / "remote-layer.cert")
    shutil.copy(other.key, certs / "remote-layer.key")
    url, digest = cell.droplet("rejected.tgz", _app(b"rejected"))
    line = bad(
        cell.layout("rejected", url, digest).url,
        remote_layer_client_certificates_path=str(certs),
    )
    assert f"the server refused the client certificate {certs}/remote-layer.cert" in line


def test_missing_client_certificate_is_explained(bad, cell, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(cell.ca.cert, certs / "remote-layer.crt")
    url, digest = cell.droplet("nocert.tgz", _app(b"nocert"))
    line = bad(
        cell.layout("nocert", url, digest).url, remote_layer_client_certificates_path=str(certs)
    )
    assert "requires a client certificate and none is configured" in line


@pytest.mark.parametrize("orphan", ["remote-layer.cert", "remote-layer.key"])
def test_certificate_without_its_pair_names_the_file(bad, cell, tmp_path, orphan):
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(cell.client.cert if orphan.endswith(".cert") else cell.client.key, certs / orphan)
    url, digest = cell.droplet("orphan.tgz", _app(b"orphan"))
    line = bad(
        cell.layout(f"orphan-{orphan}", url, digest).url,
        remote_layer_client_certificates_path=str(certs),
    )
    assert str(certs / orphan) in line


def test_untrusted_server_certificate(bad, cell, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(cell.client.cert, certs / "remote-layer.cert")
    shutil.copy(cell.client.key, certs / "remote-layer.key")
    url, digest = cell.droplet("untrusted.tgz", _app(b"untrusted"))
    line = bad(
        cell.layout("untrusted", url, digest).url,
        remote_layer_client_certificates_path=str(certs),
    )
    assert "certificate does not verify" in line


def test_droplet_that_is_not_gzip(bad, cell):
    url, digest = cell.droplet("plain.tgz", _app(b"plain"), gzip=False)
    line = bad(cell.layout("not-gzip", url, digest).url)
    assert line.startswith(f"unpack layer sha256:{digest}")


def test_base_directory_missing_in_parent_layer(bad, cell):
    url, digest = cell.droplet("nobase.tgz", _app(b"nobase"))
    line = bad(cell.layout("nobase", url, digest, base="/home/nobody/app").url)
    assert "base directory not found in parent layer: /home/nobody" in line


def test_base_directory_through_a_symlink_in_parent_layer(bad, cell):
    url, digest = cell.droplet("vialink.tgz", _app(b"vialink"))
    line = bad(cell.layout("vialink", url, digest, base="/linked/app").url)
    assert "/linked is a symlink in the parent layer" in line


@pytest.mark.parametrize(
    ("base", "why"), [("home/vcap", "not an absolute path"), ("/home/../etc", "contains `..`")]
)
def test_base_directory_must_be_absolute_and_plain(bad, cell, base, why):
    url, digest = cell.droplet("badbase.tgz", _app(b"badbase" + base.encode()))
    line = bad(cell.layout(f"badbase-{why[:3]}", url, digest, base=base).url)
    assert f"invalid base directory `{base}`" in line and why in line


def _make_fifo(path: str) -> None:
    os.mkfifo(path)


def _make_chardev(path: str) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))


@pytest.mark.parametrize(
    ("make", "kind"),
    [(_make_fifo, "a FIFO"), (_make_chardev, "a character device"), (os.mkdir, "a directory")],
    ids=["fifo", "chardev", "directory"],
)
def test_stack_blob_that_is_not_a_regular_file(grootfs, xfs_store, cell, tmp_path, make, kind):
    stack = str(tmp_path / "rootfs.tar")
    f.write_tarball(stack, STACK)
    image = g.write(str(tmp_path / "image"), stack, f"{cell.blobstore.url}/x", "ef" * 32)
    os.unlink(stack)
    make(stack)
    # If create ever opened the FIFO it would block: a writer unblocks it after a while,
    # so the test fails instead of hanging.
    unblock = threading.Timer(30, lambda: _open_writer(stack)) if kind == "a FIFO" else None
    if unblock:
        unblock.start()
    try:
        before = _snapshot(xfs_store)
        result = grootfs("create", image.url, "bad", config=cell.config(xfs_store), check=False)
    finally:
        if unblock:
            unblock.cancel()
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"read layer {image.stack_chain_id}: {image.path}/blobs/sha256/"
        f"{image.stack_chain_id.split(':')[1]}: {kind}, not a regular file"
    ]
    assert _snapshot(xfs_store) == before


def _open_writer(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)


def test_plain_stack_path_that_is_a_fifo_is_refused(grootfs, xfs_store, tmp_path):
    fifo = tmp_path / "rootfs.tar"
    os.mkfifo(fifo)
    result = grootfs("create", str(fifo), "bad", store=xfs_store, check=False)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"invalid base image: {fifo} is a FIFO, not a regular file"
    ]


# -- faults between the cell and the blobstore ------------------------------------------


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, r.FaultProxy]]:
    """A plain-HTTP nginx serving /blobs/, behind the registry tests' fault proxy."""
    work = tmp_path_factory.mktemp("flaky")
    root = work / "root"
    (root / "blobs").mkdir(parents=True)
    with b.Blobstore(work / "nginx", root) as store:
        proxy = r.FaultProxy(f"127.0.0.1:{store.port}")
        with r.running(proxy):
            yield root, proxy


def _flaky_droplet(flaky, cell: Cell, name: str, marker: bytes) -> g.GardenImage:
    root, proxy = flaky
    # Big and incompressible enough that half of it is more than the proxy's minimum.
    entries = [*_app(marker), f.file("app/blob.bin", os.urandom(300_000))]
    data = f.compress(f.layer_tar(entries), "gzip")
    (root / "blobs" / name).write_bytes(data)
    url = f"http://127.0.0.1:{proxy.port}/blobs/{name}"
    return cell.layout(name, url, hashlib.sha256(data).hexdigest())


def test_droplet_download_cut_off_is_resumed(grootfs, xfs_store, cell, flaky):
    _, proxy = flaky
    seen = proxy.reset(reset_blobs=1)
    image = _flaky_droplet(flaky, cell, "cut.tgz", b"cut")
    grootfs("create", image.url, "cut", config=cell.config(xfs_store))
    assert Path(xfs_store, "images/cut/rootfs/home/vcap/app/run.sh").read_bytes().endswith(b"cut\n")
    gets = [s for s in seen.seen if "/blobs/cut.tgz" in s]
    assert len(gets) == 2 and gets[1].startswith("GET /blobs/cut.tgz bytes="), gets


def test_droplet_5xx_is_retried(grootfs, xfs_store, cell, flaky):
    _, proxy = flaky
    seen = proxy.reset(refuse_status=503, status_count=2)
    image = _flaky_droplet(flaky, cell, "busy.tgz", b"busy")
    grootfs("create", image.url, "busy", config=cell.config(xfs_store))
    assert Path(xfs_store, "images/busy/rootfs/home/vcap/app/run.sh").exists()
    assert len([s for s in seen.seen if "/blobs/busy.tgz" in s]) == 3


def test_silent_blobstore_counts_as_a_failed_try(grootfs, xfs_store, cell, flaky, monkeypatch):
    _, proxy = flaky
    seen = proxy.reset(stall_blobs=1, stall_seconds=4)
    monkeypatch.setenv("GROOTFS_REGISTRY_TIMEOUT", "1")
    image = _flaky_droplet(flaky, cell, "stall.tgz", b"stall")
    grootfs("create", image.url, "stall", config=cell.config(xfs_store))
    assert Path(xfs_store, "images/stall/rootfs/home/vcap/app/run.sh").exists()
    gets = [s for s in seen.seen if "/blobs/stall.tgz" in s]
    assert len(gets) == 2 and "bytes=1024-" in gets[1], gets
