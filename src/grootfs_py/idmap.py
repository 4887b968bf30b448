"""User-namespace id mappings as pure values and functions.

A mapping ``ns:host:size`` says that ids ``ns .. ns+size-1`` inside the
container are ids ``host .. host+size-1`` on the host. Garden's unprivileged
store uses ``0:4294967294:1`` and ``1:1:4294967293``. With no mappings at
all, ids are kept as they are.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from grootfs_py.errors import InvalidArgumentError

MAX_ID = 2**32 - 1


class IdMapping(NamedTuple):
    namespace_id: int
    host_id: int
    size: int

    @classmethod
    def parse(cls, text: str) -> IdMapping:
        parts = text.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            ns, host, size = (int(p, 10) for p in parts)
        except ValueError:
            raise InvalidArgumentError(
                f"invalid id mapping `{text}`: expected namespace-id:host-id:size"
            ) from None
        if min(ns, host) < 0 or size < 1 or ns + size - 1 > MAX_ID or host + size - 1 > MAX_ID:
            raise InvalidArgumentError(f"invalid id mapping `{text}`: ids out of range")
        return cls(ns, host, size)

    def __str__(self) -> str:
        return f"{self.namespace_id}:{self.host_id}:{self.size}"

    def to_json(self) -> dict[str, int]:
        return {"namespace_id": self.namespace_id, "host_id": self.host_id, "size": self.size}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> IdMapping:
        return cls(int(data["namespace_id"]), int(data["host_id"]), int(data["size"]))


def _check_disjoint(mappings: tuple[IdMapping, ...], kind: str) -> None:
    ranges = sorted((m.namespace_id, m.namespace_id + m.size) for m in mappings)
    for (_, end), (start, _) in itertools.pairwise(ranges):
        if start < end:
            raise InvalidArgumentError(f"invalid {kind} mappings: namespace ranges overlap")


class IdMap(NamedTuple):
    """The uid and gid mappings of one store; build checked ones with :meth:`of`."""

    uids: tuple[IdMapping, ...] = ()
    gids: tuple[IdMapping, ...] = ()

    @classmethod
    def of(cls, uids: tuple[IdMapping, ...], gids: tuple[IdMapping, ...]) -> IdMap:
        _check_disjoint(uids, "uid")
        _check_disjoint(gids, "gid")
        return cls(uids, gids)

    @property
    def identity(self) -> bool:
        return not self.uids and not self.gids

    def host_uid(self, uid: int) -> int:
        return _translate(self.uids, uid, "uid")

    def host_gid(self, gid: int) -> int:
        return _translate(self.gids, gid, "gid")

    @property
    def root_uid(self) -> int:
        """The host uid that the container's root (uid 0) owns files as."""
        return self.host_uid(0)

    @property
    def root_gid(self) -> int:
        return self.host_gid(0)

    def inside(self) -> IdMap:
        """The same ranges seen from inside a user namespace made with these mappings.

        There the kernel translates ids: the unpacker chowns to the ids the
        layer names, and only ids outside every range are refused.
        """
        return IdMap(
            tuple(IdMapping(m.namespace_id, m.namespace_id, m.size) for m in self.uids),
            tuple(IdMapping(m.namespace_id, m.namespace_id, m.size) for m in self.gids),
        )

    def to_json(self) -> dict[str, list[dict[str, int]]]:
        return {
            "uid_mappings": [m.to_json() for m in self.uids],
            "gid_mappings": [m.to_json() for m in self.gids],
        }

    @classmethod
    def from_json(cls, data: dict[str, list[dict[str, int]]]) -> IdMap:
        return cls.of(
            tuple(IdMapping.from_json(m) for m in data.get("uid_mappings", [])),
            tuple(IdMapping.from_json(m) for m in data.get("gid_mappings", [])),
        )


def map_arguments(mappings: tuple[IdMapping, ...]) -> list[str]:
    """newuidmap/newgidmap's arguments after the pid: ``ns host size`` for each range."""
    return [str(n) for m in mappings for n in m]


def _translate(mappings: tuple[IdMapping, ...], ns_id: int, kind: str) -> int:
    if not mappings:
        return ns_id
    for m in mappings:
        offset = ns_id - m.namespace_id
        if 0 <= offset < m.size:
            return m.host_id + offset
    raise InvalidArgumentError(f"{kind} {ns_id} is not mapped in this store")
