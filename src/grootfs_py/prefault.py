"""Copy-on-write prefaulting for the fork server's standby children.

A command forked from a warm interpreter writes to ~500-700 of the pages it
shares with its parent (reference counts, allocator pools, interpreter
state), and each first write is a copy-on-write fault. On the machines this
was measured on that is 2-4 us a page, about half of a warm create's time in
its child. The kernel can take those copies ahead of time:
MADV_POPULATE_WRITE (Linux 5.14) faults a range in writable without changing
its contents, so a standby child forked before its request arrives pays for
the copies while it waits, not while Garden does.

Which pages: the ones earlier children wrote. A child asked to learn reads
its own /proc/self/pagemap before it exits: a page of a mapping it inherited
that is present and no longer shared (PM_MMAP_EXCLUSIVE) is one it has
written since the fork. The forker keeps the union and hands it to every
standby it forks. Nothing here changes what a command does: a prefaulted
page holds what it held; only when the copy is made moves.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Iterable, Sequence

from grootfs_py.linux import PAGE_SIZE, _libc

MADV_POPULATE_WRITE = 23  # Linux 5.14
MAX_RUNS = 4096  # what a learning child reports at most (64 KiB)

Run = tuple[int, int]  # start address, end address (exclusive), page-aligned

# In a pagemap entry's top byte: bit 63 (present) is 0x80, bit 56
# (PM_MMAP_EXCLUSIVE: mapped by this process only) is 0x01.
_WRITTEN = bytes(1 if b & 0x81 == 0x81 else 0 for b in range(256))
_RUN_OF_ONES = re.compile(b"\x01+")


def private_writable(maps: str) -> list[Run]:
    """The private writable mappings in the text of a /proc/<pid>/maps."""
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) >= 2 and fields[1][:2] == "rw" and fields[1][3:4] == "p":
            start, _, end = fields[0].partition("-")
            found.append((int(start, 16), int(end, 16)))
    return found


def own_mappings() -> list[Run]:
    with open("/proc/self/maps") as f:
        return private_writable(f.read())


def written(mappings: Sequence[Run]) -> list[Run]:
    """The pages of *mappings* this process has written since it was forked.

    Only meaningful in a forked child, for mappings it inherited: a page it
    has not written is still shared with its parent.
    """
    runs: list[Run] = []
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, end in mappings:
            entries = os.pread(fd, (end - start) // PAGE_SIZE * 8, start // PAGE_SIZE * 8)
            flags = entries[7::8].translate(_WRITTEN)
            for m in _RUN_OF_ONES.finditer(flags):
                runs.append((start + m.start() * PAGE_SIZE, start + m.end() * PAGE_SIZE))
    finally:
        os.close(fd)
    return runs[:MAX_RUNS]


def union(a: Iterable[Run], b: Iterable[Run]) -> list[Run]:
    """The runs covering every page of *a* and of *b*, sorted, adjacent ones joined."""
    merged: list[Run] = []
    for start, end in sorted((*a, *b)):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged[:MAX_RUNS]


def populate(runs: Iterable[Run]) -> int:
    """Take this process's own copy of every page of *runs*; the pages populated.

    A run that is no longer (wholly) mapped is skipped from its hole on. A
    kernel without MADV_POPULATE_WRITE (EINVAL) populates nothing: its
    children fault as they would have.
    """
    libc = _libc()
    done = 0
    for start, end in runs:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_POPULATE_WRITE):
            if ctypes.get_errno() == errno.EINVAL:
                return done
            continue  # ENOMEM (a hole), EFAULT (would not fault in)
        done += (end - start) // PAGE_SIZE
    return done


def encode(runs: Sequence[Run]) -> bytes:
    return b"".join(start.to_bytes(8, "little") + end.to_bytes(8, "little") for start, end in runs)


def decode(data: bytes) -> list[Run]:
    """Runs from *encode*; anything not a whole number of page-aligned runs is dropped."""
    runs = []
    for i in range(0, len(data) - len(data) % 16, 16):
        start = int.from_bytes(data[i : i + 8], "little")
        end = int.from_bytes(data[i + 8 : i + 16], "little")
        if start < end and not (start | end) % PAGE_SIZE:
            runs.append((start, end))
    return runs[:MAX_RUNS]
