"""Read the kernel's mount table (/proc/self/mountinfo)."""

from __future__ import annotations

import os
from typing import NamedTuple


class MountInfo(NamedTuple):
    mount_point: str
    fstype: str
    source: str
    options: frozenset[str]  # per-mount and per-superblock options together


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def table() -> list[MountInfo]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    mounts = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split(" ")
        fstype, source, super_opts = [*right.split(" "), "", "", ""][:3]
        opts = frozenset(fields[5].split(",")) | frozenset(super_opts.split(","))
        mounts.append(MountInfo(_unescape(fields[4]), fstype, _unescape(source), opts))
    return mounts


def find(path: str) -> MountInfo | None:
    """The mount whose mount point is exactly *path* (the topmost, if stacked)."""
    path = os.path.realpath(path)
    found = None
    for m in table():
        if m.mount_point == path:
            found = m
    return found


def under(path: str) -> list[str]:
    """Mount points strictly below *path*, deepest first (the order to unmount)."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    if not _may_appear(prefix):
        return []
    points = {m.mount_point for m in table() if m.mount_point.startswith(prefix)}
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def _may_appear(prefix: str) -> bool:
    """False when no mount point in the table starts with *prefix*.

    Every delete asks this of its trashed image, almost always for nothing:
    a substring search of the raw table costs a fraction of parsing its
    hundreds of lines (a cell has one overlay per container). A mount point
    follows a space in its line, escaped as the kernel escapes it; a prefix
    with a character it escapes takes the full parse.
    """
    if any(c in prefix for c in " \t\n\\"):
        return True
    with open("/proc/self/mountinfo", "rb") as f:
        raw = f.read()
    return b" " + os.fsencode(prefix) in raw
