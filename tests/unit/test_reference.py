import pytest

from grootfs_py.errors import InvalidArgumentError
from grootfs_py.sources.reference import Reference, parse
from grootfs_py.sources.registry import parse_challenge

HUB = "registry-1.docker.io"
DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("docker:///busybox", (HUB, "library/busybox", "latest", None)),
        ("docker:///cfgarden/empty:v0.1.1", (HUB, "cfgarden/empty", "v0.1.1", None)),
        ("docker://busybox", (HUB, "library/busybox", "latest", None)),
        ("docker://cfgarden/empty", (HUB, "cfgarden/empty", "latest", None)),
        ("docker://docker.io/library/ubuntu:22.04", (HUB, "library/ubuntu", "22.04", None)),
        ("docker://index.docker.io/ubuntu", (HUB, "library/ubuntu", "latest", None)),
        ("docker://127.0.0.1:5000/busybox", ("127.0.0.1:5000", "busybox", "latest", None)),
        ("docker://localhost/a/b/c:t", ("localhost", "a/b/c", "t", None)),
        (
            "docker://registry.local:5000/team/app:1.2",
            ("registry.local:5000", "team/app", "1.2", None),
        ),
        (f"docker://registry.local/app@{DIGEST}", ("registry.local", "app", None, DIGEST)),
        (f"docker:///busybox:1.36@{DIGEST}", (HUB, "library/busybox", "1.36", DIGEST)),
    ],
)
def test_docker_urls_follow_dockers_naming(url, expected):
    assert parse(url) == Reference(*expected)


def test_the_digest_is_what_the_manifest_is_fetched_by():
    assert parse(f"docker:///busybox:1.36@{DIGEST}").reference == DIGEST
    assert parse("docker:///busybox").reference == "latest"
    assert str(parse("docker:///busybox")) == f"{HUB}/library/busybox:latest"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("docker:///", "no repository"),
        ("docker://host:5000/", "no repository"),
        ("docker:///Busybox", "not a valid repository name"),
        ("docker:///busybox:bad tag", "not a valid tag"),
        ("docker:///busybox@sha256:short", "not a sha256 or sha512 digest"),
        ("docker:///a//b", "not a valid repository name"),
        ("docker:///../etc", "not a valid repository name"),
        ("docker://bad_host.com/app", "is not a registry host"),
    ],
)
def test_malformed_docker_urls_are_refused(url, why):
    with pytest.raises(InvalidArgumentError, match=why):
        parse(url)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/busybox:pull"',
            (
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/busybox:pull",
                },
            ),
        ),
        ('Basic realm="registry"', ("basic", {"realm": "registry"})),
        (
            "Bearer realm=https://x/t, service=reg",
            ("bearer", {"realm": "https://x/t", "service": "reg"}),
        ),
        ("", ("", {})),
    ],
)
def test_auth_challenges_are_parsed(header, expected):
    assert parse_challenge(header) == expected
