"""Registry fixtures: one storage directory, filled once, served by several real registries.

Images are pushed with skopeo into an open registry; the other registries
(htpasswd, token, TLS, client-certificate) serve the same storage, so every
variant has every image.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import imagefactory as f
import registry as r

USER, PASSWORD = r.USER, r.PASSWORD


@dataclass(frozen=True)
class Pushed:
    """What the test registries hold."""

    storage: Path
    open: r.Registry  # anonymous, plain HTTP: the one images are pushed into
    images: dict[str, f.LayoutImage]  # name -> the layout it was pushed from


def _busybox_image(path: Path) -> f.LayoutImage:
    return f.write_oci_layout(
        str(path), [f.busybox_layer()], env=["PATH=/bin", "GREETING=from-the-registry"]
    )


def _layers(n: int, label: str, size: int = 200_000) -> list[list[f.Entry]]:
    # Incompressible-ish data, so each blob is big enough to be cut off half-way.
    return [
        [f.directory(f"layer{i}"), f.file(f"layer{i}/data", os.urandom(size))] for i in range(n)
    ] + [[f.file("which", label.encode())]]


def _put_index(reg: r.Registry, name: str, tag: str, media_type: str, entries: list[dict]) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()
    r.put_manifest(reg.host, name, tag, body, media_type)


def _entry(image: f.LayoutImage, media_type: str, arch: str) -> dict:
    size = os.path.getsize(image.blob_path(image.manifest_digest))
    return {
        "mediaType": media_type,
        "digest": image.manifest_digest,
        "size": size,
        "platform": {"os": "linux", "architecture": arch},
    }


@pytest.fixture(scope="session")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    work = tmp_path_factory.mktemp("registry")
    storage = work / "storage"
    layouts = work / "layouts"
    images: dict[str, f.LayoutImage] = {}
    images["busybox:latest"] = _busybox_image(layouts / "busybox")
    images["multi:v1"] = f.write_oci_layout(str(layouts / "multi"), _layers(2, "multi"))
    images["five:v1"] = f.write_oci_layout(str(layouts / "five"), _layers(4, "five"))
    images["zstd:v1"] = f.write_oci_layout(
        str(layouts / "zstd"), _layers(1, "zstd"), compression="zstd"
    )
    images["bad-diffid:v1"] = f.write_oci_layout(
        str(layouts / "bad-diffid"), _layers(1, "bad"), corrupt="diff-id"
    )
    with r.Registry(work / "open", storage) as reg:
        for name, image in images.items():
            r.push(image.path, image.tag, reg.host, name)
        # Docker schema 2 (skopeo converts the OCI manifest and media types).
        r.push(images["busybox:latest"].path, "latest", reg.host, "docker2:v1", fmt="v2s2")
        # Multi-platform: the amd64 entry is busybox, the arm64 one is "multi",
        # so the files show which one was chosen.
        oci_manifest = "application/vnd.oci.image.manifest.v1+json"
        arm, amd = images["multi:v1"], images["busybox:latest"]
        r.push(arm.path, arm.tag, reg.host, "multiarch:arm")
        r.push(amd.path, amd.tag, reg.host, "multiarch:amd")
        _put_index(
            reg,
            "multiarch",
            "oci",
            "application/vnd.oci.image.index.v1+json",
            [_entry(arm, oci_manifest, "arm64"), _entry(amd, oci_manifest, "amd64")],
        )
        _put_index(
            reg,
            "multiarch",
            "elsewhere",
            "application/vnd.oci.image.index.v1+json",
            [_entry(arm, oci_manifest, "arm64"), _entry(arm, oci_manifest, "s390x")],
        )
        # A Docker manifest list over Docker schema 2 manifests.
        r.push(arm.path, arm.tag, reg.host, "dockerlist:arm", fmt="v2s2")
        r.push(amd.path, amd.tag, reg.host, "dockerlist:amd", fmt="v2s2")
        docker_manifest = "application/vnd.docker.distribution.manifest.v2+json"
        entries = []
        for tag, arch in (("arm", "arm64"), ("amd", "amd64")):
            data, digest = _get_manifest(reg.host, "dockerlist", tag, docker_manifest)
            entries.append(
                {
                    "mediaType": docker_manifest,
                    "digest": digest,
                    "size": len(data),
                    "platform": {"os": "linux", "architecture": arch},
                }
            )
        _put_index(
            reg,
            "dockerlist",
            "v1",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            entries,
        )
        yield Pushed(storage, reg, images)
    shutil.rmtree(work, ignore_errors=True)


def _get_manifest(host: str, name: str, tag: str, accept: str) -> tuple[bytes, str]:
    import http.client

    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.request("GET", f"/v2/{name}/manifests/{tag}", headers={"Accept": accept})
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, data
        return data, str(response.getheader("Docker-Content-Digest"))
    finally:
        conn.close()


@pytest.fixture
def open_registry(pushed: Pushed) -> r.Registry:
    return pushed.open


@pytest.fixture(scope="session")
def htpasswd_registry(
    pushed: Pushed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[r.Registry]:
    work = tmp_path_factory.mktemp("htpasswd-registry")
    users = r.htpasswd_file(work / "htpasswd", {USER: PASSWORD})
    with r.Registry(work, pushed.storage, htpasswd=users) as reg:
        yield reg


@dataclass(frozen=True)
class TokenRegistry:
    registry: r.Registry
    tokens: r.TokenServer


@pytest.fixture(scope="session")
def token_registry(
    pushed: Pushed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TokenRegistry]:
    work = tmp_path_factory.mktemp("token-registry")
    tokens = r.TokenServer(work, {USER: PASSWORD})
    reg = r.Registry(work, pushed.storage, token=(tokens.realm, tokens.signer.cert))
    with r.running(tokens, reg):
        yield TokenRegistry(reg, tokens)


@dataclass(frozen=True)
class TlsRegistry:
    registry: r.Registry
    ca: r.Cert
    client: r.Cert | None = None


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> tuple[r.Cert, r.Cert, r.Cert]:
    work = tmp_path_factory.mktemp("certs")
    ca = r.make_ca(work, "test-ca")
    server = r.make_cert(work, "server", ca, server=True)
    client = r.make_cert(work, "client", ca, server=False)
    return ca, server, client


@pytest.fixture(scope="session")
def tls_registry(
    pushed: Pushed, tls_material: tuple[r.Cert, r.Cert, r.Cert], tmp_path_factory
) -> Iterator[TlsRegistry]:
    ca, server, _ = tls_material
    with r.Registry(tmp_path_factory.mktemp("tls-registry"), pushed.storage, tls=server) as reg:
        yield TlsRegistry(reg, ca)


@pytest.fixture(scope="session")
def mtls_registry(
    pushed: Pushed, tls_material: tuple[r.Cert, r.Cert, r.Cert], tmp_path_factory
) -> Iterator[TlsRegistry]:
    ca, server, client = tls_material
    work = tmp_path_factory.mktemp("mtls-registry")
    with r.Registry(work, pushed.storage, tls=server, client_ca=ca.cert) as reg:
        yield TlsRegistry(reg, ca, client)


@pytest.fixture
def proxy(open_registry: r.Registry) -> Iterator[r.FaultProxy]:
    """A fault-injecting proxy in front of the open registry, fresh for each test."""
    with r.running(p := r.FaultProxy(open_registry.host)):
        yield p
