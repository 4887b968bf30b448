"""``docker://`` image references, parsed the way Docker names images.

``docker://[host[:port]]/repo[:tag|@sha256:digest]``. Without a host the
image is on Docker Hub and a one-part name gets ``library/``. As in Docker,
the first path component is a host only if it looks like one (has a dot or
a port, or is ``localhost``), so ``docker://cfgarden/empty`` is on Docker
Hub too. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from grootfs_py.digest import check_digest
from grootfs_py.errors import InvalidArgumentError

DOCKER_HUB = "registry-1.docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io", DOCKER_HUB)
DEFAULT_TAG = "latest"

# The distribution spec's grammar for names and tags.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)


class Reference(NamedTuple):
    registry: str  # host[:port]
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or DEFAULT_TAG}"
        return f"{self.registry}/{self.repository}{suffix}"


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse(url: str) -> Reference:
    """Parse a ``docker://`` URL; raise :class:`InvalidArgumentError` if it is not one."""

    def bad(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"invalid image URL `{url}`: {why}")

    if not url.startswith("docker://"):
        raise bad("not a docker:// URL")
    rest = url[len("docker://") :]
    if rest.startswith("/"):
        registry, path = DOCKER_HUB, rest[1:]
    else:
        first, sep, remainder = rest.partition("/")
        if sep and _looks_like_host(first):
            registry, path = first, remainder
        else:
            registry, path = DOCKER_HUB, rest
    if not _HOST.match(registry):
        raise bad(f"`{registry}` is not a registry host")
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB

    path, at, digest = path.partition("@")
    if at:
        try:
            check_digest(digest)
        except Exception:
            raise bad(f"`{digest}` is not a sha256 or sha512 digest") from None
    head, colon, tag = path.rpartition(":")
    if colon and "/" not in tag:
        path = head
        if not _TAG.match(tag):
            raise bad(f"`{tag}` is not a valid tag")
    else:
        tag = ""
    if not path:
        raise bad("no repository")
    if not _REPOSITORY.match(path):
        raise bad(f"`{path}` is not a valid repository name")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return Reference(registry, path, tag or (None if at else DEFAULT_TAG), digest or None)
