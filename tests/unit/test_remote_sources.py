"""Pure pieces of remote layers: certificate directories, base directories, URLs in errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from grootfs_py.errors import ImageSourceError
from grootfs_py.sources import manifest as m
from grootfs_py.sources.remote import shown
from grootfs_py.sources.transport import TLSSetupError, tls_files

# (files with contents, expected client pair names or None, expected CA names, error or None)
CERT_DIRS = [
    ({}, None, [], None),
    ({"remote-layer.crt": "ca"}, None, ["remote-layer.crt"], None),
    (
        {"remote-layer.crt": "ca", "remote-layer.cert": "c", "remote-layer.key": "k"},
        ("remote-layer.cert", "remote-layer.key"),
        ["remote-layer.crt"],
        None,
    ),
    ({"remote-layer.cert": "c"}, None, [], "remote-layer.cert has no matching remote-layer.key"),
    ({"remote-layer.key": "k"}, None, [], "remote-layer.key has no matching client certificate"),
    # BOSH renders unset properties as empty files: they count as absent.
    ({"remote-layer.cert": "", "remote-layer.key": "", "remote-layer.crt": ""}, None, [], None),
    ({"remote-layer.cert": "c", "remote-layer.key": ""}, None, [], "has no matching"),
    (
        {"a.crt": "1", "b.crt": "2", "x.cert": "c", "x.key": "k", "y.cert": "c", "y.key": "k"},
        ("x.cert", "x.key"),
        ["a.crt", "b.crt"],
        None,
    ),
    ({"README": "ignored", "ca.pem": "ignored"}, None, [], None),
]


@pytest.mark.parametrize(("files", "pair", "cas", "error"), CERT_DIRS)
def test_certificate_directory_rules(tmp_path: Path, files, pair, cas, error) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if error:
        with pytest.raises(TLSSetupError, match=error):
            tls_files(str(tmp_path))
        return
    got_pair, got_cas = tls_files(str(tmp_path))
    expected = None if pair is None else tuple(str(tmp_path / n) for n in pair)
    assert got_pair == expected
    assert list(got_cas) == [str(tmp_path / n) for n in cas]


def test_absent_certificate_directory_holds_nothing(tmp_path: Path) -> None:
    assert tls_files(str(tmp_path / "absent")) == (None, ())
    assert tls_files("") == (None, ())


def _desc(base: object) -> m.Descriptor:
    return m.Descriptor(
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        digest="sha256:" + "a" * 64,
        size=0,
        annotations={m.BASE_DIRECTORY_ANNOTATION: base},  # type: ignore[dict-item]
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("/home/vcap", "/home/vcap"), ("//home//vcap/", "/home/vcap"), ("/", ""), ("/a/./b", "/a/b")],
)
def test_base_directory_is_normalised(value: str, expected: str) -> None:
    assert m.base_directory(_desc(value)) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [("home/vcap", "not an absolute path"), ("/home/../etc", "contains `..`"), (7, "absolute")],
)
def test_base_directory_refused(value: object, why: str) -> None:
    with pytest.raises(ImageSourceError, match=why):
        m.base_directory(_desc(value))


def test_layer_urls_are_parsed_and_checked() -> None:
    data = {"mediaType": "x", "digest": "sha256:" + "b" * 64, "size": 0, "urls": ["http://h/d"]}
    assert m.Descriptor.parse(data, "layer").urls == ("http://h/d",)
    with pytest.raises(ImageSourceError, match="urls"):
        m.Descriptor.parse({**data, "urls": "http://h/d"}, "layer")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:secret@blobs:4443/read/d?md5=x&expires=1#f", "https://blobs:4443/read/d"),
        ("http://[::1]:8080/a", "http://[::1]:8080/a"),
        ("https://blobstore.service.cf.internal/d", "https://blobstore.service.cf.internal/d"),
    ],
)
def test_urls_in_messages_carry_no_credentials(url: str, expected: str) -> None:
    assert shown(url) == expected
