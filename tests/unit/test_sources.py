import hashlib

import pytest

from grootfs_py.digest import check_digest
from grootfs_py.errors import ImageSourceError, InvalidArgumentError
from grootfs_py.sources import chain_ids
from grootfs_py.sources import manifest as m
from grootfs_py.sources.oci import parse_url

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("url", "path", "tag"),
    [
        ("oci:///srv/image", "/srv/image", None),
        ("oci:///srv/image:v1", "/srv/image", "v1"),
        ("oci:///srv/ima:ge/layout", "/srv/ima:ge/layout", None),
        ("oci:///srv/ima:ge/layout:latest", "/srv/ima:ge/layout", "latest"),
    ],
)
def test_oci_url_splits_path_and_tag(url, path, tag):
    assert parse_url(url) == (path, tag)


def test_oci_url_must_be_absolute():
    with pytest.raises(InvalidArgumentError, match="absolute"):
        parse_url("oci://relative/path")


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../etc/passwd",
        "sha256:" + "A" * 64,
        "md5:abc",
        "sha256:" + "a" * 63,
        "",
        "sha256/" + "a" * 64,
    ],
)
def test_malformed_digests_never_become_paths(digest):
    with pytest.raises(ImageSourceError, match="invalid digest"):
        check_digest(digest)


def test_chain_ids_follow_the_oci_definition():
    second = "sha256:" + hashlib.sha256(f"{D1} {D2}".encode()).hexdigest()
    assert chain_ids([D1, D2]) == [D1, second]


def _manifest(layer_type):
    return {
        "schemaVersion": 2,
        "mediaType": m.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": D1,
            "size": 2,
        },
        "layers": [{"mediaType": layer_type, "digest": D2, "size": 3}],
    }


@pytest.mark.parametrize(
    ("layer_type", "compression"),
    [
        ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
        ("application/vnd.oci.image.layer.v1.tar", "none"),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
    ],
)
def test_layer_media_types_choose_compression(layer_type, compression):
    manifest = m.parse_manifest(_manifest(layer_type), m.OCI_MANIFEST)
    assert m.LAYER_COMPRESSION[manifest.layers[0].media_type] == compression


def test_unknown_layer_media_type_is_refused():
    with pytest.raises(ImageSourceError, match="unknown media type `application/x-rar`"):
        m.parse_manifest(_manifest("application/x-rar"), m.OCI_MANIFEST)


def test_schema1_is_refused_clearly():
    with pytest.raises(ImageSourceError, match="schema 1 is not supported"):
        m.parse_manifest({"schemaVersion": 1}, m.media_type_of({"schemaVersion": 1}))


def test_config_diff_ids_must_match_layer_count():
    with pytest.raises(ImageSourceError, match="1 diff_ids for 2 layers"):
        m.parse_config({"rootfs": {"diff_ids": [D1]}}, 2)


def test_config_env_is_kept():
    config = m.parse_config({"rootfs": {"diff_ids": [D1]}, "config": {"Env": ["A=1"]}}, 1)
    assert config.env == ("A=1",)


def test_platform_selection_names_what_is_offered(monkeypatch):
    # The only stand-in here: this machine has one architecture, and the rule
    # under test is "pick the host's", so the host is pinned to amd64.
    monkeypatch.setattr(m, "host_platform", lambda: ("linux", "amd64"))
    index = {
        "manifests": [
            {
                "mediaType": m.OCI_MANIFEST,
                "digest": D1,
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm64"},
            },
            {
                "mediaType": m.OCI_MANIFEST,
                "digest": D2,
                "size": 1,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ]
    }
    assert m.select_platform(index).digest == D2
    index["manifests"].pop()
    with pytest.raises(ImageSourceError, match="offers linux/arm64"):
        m.select_platform(index)
