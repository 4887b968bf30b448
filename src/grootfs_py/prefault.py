"""Copy-on-write prefaulting for the fork server's standby children.

A command forked from a warm interpreter writes to ~500-700 of the pages it
shares with its parent (reference counts, allocator pools, interpreter
state), and each first write is a copy-on-write fault. On the machines this
was measured on that is 2-4 us a page, about half of a warm create's time in
its child. The kernel can take those copies ahead of time:
MADV_POPULATE_WRITE (Linux 5.14) faults a range in writable without changing
its contents, so a standby child forked before its request arrives pays for
the copies while it waits, not while Garden does.

Which pages: the ones earlier children wrote. The forker reads its own
/proc/self/pagemap just before it forks a child asked to learn, and the
child's /proc/<pid>/pagemap once its command is done: a page of a mapping it
inherited is written if it is present now and was absent then, or now sits
in another page frame (its copy). The forker reads it, not the child, so
that the scan's own allocations are not counted as the command's (they were
~190 pages of a stats command's ~640, each copied for nothing in every
standby after). Page frame numbers are shown to CAP_SYS_ADMIN only; without
them (a rootless server) a page counts as written if it is present and no
longer shared (PM_MMAP_EXCLUSIVE), which also counts a page the forker
itself wrote since the fork. The forker keeps what was learned and hands it
to every standby it forks. Nothing here changes what a command does: a
prefaulted page holds what it held; only when the copy is made moves.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Sequence

from grootfs_py.linux import PAGE_SIZE, _libc

MADV_POPULATE_WRITE = 23  # Linux 5.14
MAX_RUNS = 4096  # runs a standby is handed at most
SYS_PROCESS_MADVISE = 440  # x86-64 and arm64 (the generic table) alike
UIO_MAXIOV = 1024  # ranges per process_madvise(2) call

Run = tuple[int, int]  # start address, end address (exclusive), page-aligned

# A pagemap entry: bit 63 present, bit 56 PM_MMAP_EXCLUSIVE (mapped by this
# process only), bits 0-54 the page frame number (0 unless CAP_SYS_ADMIN).
_PRESENT = 1 << 63
_EXCLUSIVE = 1 << 56
_FRAME = (1 << 55) - 1


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


def snapshot(mappings: Sequence[Run]) -> list[bytes]:
    """This process's pagemap entries for *mappings*: what :func:`written` compares with.

    Taken by a forker right before it forks a child asked to learn.
    """
    return _entries("self", mappings) or []


def written(pid: int, mappings: Sequence[Run], before: Sequence[bytes]) -> list[Run] | None:
    """The pages of *mappings* that child *pid* has written since it was forked.

    *before*: the parent's :func:`snapshot` of *mappings*, taken just before
    the fork. None if the child's pagemap cannot be read (it has exited).
    """
    now = _entries(str(pid), mappings)
    if now is None:
        return None
    runs: list[Run] = []
    for (start, _end), then, entries in zip(mappings, before, now, strict=True):
        if entries == then:
            continue  # nothing of this mapping was written
        first = -1
        pairs = zip(memoryview(entries).cast("Q"), memoryview(then).cast("Q"), strict=True)
        for i, (entry, old) in enumerate(pairs):
            if not entry & _PRESENT:
                was_written = False
            elif entry & _FRAME:
                was_written = not old & _PRESENT or old & _FRAME != entry & _FRAME
            else:  # frame numbers hidden: no longer shared is the best sign left
                was_written = bool(entry & _EXCLUSIVE)
            if was_written and first < 0:
                first = i
            elif not was_written and first >= 0:
                runs.append((start + first * PAGE_SIZE, start + i * PAGE_SIZE))
                first = -1
        if first >= 0:
            runs.append((start + first * PAGE_SIZE, start + len(entries) // 8 * PAGE_SIZE))
    return runs[:MAX_RUNS]


def _entries(pid: str, mappings: Sequence[Run]) -> list[bytes] | None:
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        found = []
        for start, end in mappings:
            size = (end - start) // PAGE_SIZE * 8
            entries = os.pread(fd, size, start // PAGE_SIZE * 8)
            if len(entries) != size:
                return None  # the process has exited (a zombie has no pages)
            found.append(entries)
        return found
    except OSError:
        return None
    finally:
        os.close(fd)


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


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("length", ctypes.c_size_t))


class Plan:
    """Runs to populate, with the vector process_madvise(2) takes, built once.

    A forker builds a plan when it learns, and every standby it forks then
    takes its copies in one system call per UIO_MAXIOV runs (Linux 6.13 lets
    a process give itself any advice this way), not one call through ctypes
    a run: a command's pages come in ~300 runs, and each call cost ~2 us.
    """

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs[:MAX_RUNS])
        self.pages = sum(end - start for start, end in self.runs) // PAGE_SIZE
        self._vector = (_Iovec * len(self.runs))(*(_Iovec(s, e - s) for s, e in self.runs))

    def populate(self) -> int:
        """Take this process's own copy of every page of the plan; the pages populated.

        A run that is no longer (wholly) mapped is skipped from its hole on. A
        kernel without MADV_POPULATE_WRITE populates nothing: its children
        fault as they would have.
        """
        if not self.runs:
            return 0
        syscall = _libc().syscall
        try:
            pidfd = os.pidfd_open(os.getpid())
        except OSError:
            return _populate_each(self.runs)
        try:
            for first in range(0, len(self.runs), UIO_MAXIOV):
                count = min(UIO_MAXIOV, len(self.runs) - first)
                vector = ctypes.byref(self._vector, first * ctypes.sizeof(_Iovec))
                size = sum(e - s for s, e in self.runs[first : first + count])
                advised = syscall(SYS_PROCESS_MADVISE, pidfd, vector, count, MADV_POPULATE_WRITE, 0)
                if advised != size:
                    # Refused (a kernel before 6.13), or stopped at a hole:
                    # the rest one run at a time, holes skipped.
                    done = sum(e - s for s, e in self.runs[:first]) // PAGE_SIZE
                    return done + _populate_each(self.runs[first:])
        finally:
            os.close(pidfd)
        return self.pages


def populate(runs: Sequence[Run]) -> int:
    """Take this process's own copy of every page of *runs*; the pages populated."""
    return Plan(runs).populate()


def _populate_each(runs: Iterable[Run]) -> int:
    libc = _libc()
    done = 0
    for start, end in runs:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_POPULATE_WRITE):
            if ctypes.get_errno() == errno.EINVAL:
                return done
            continue  # ENOMEM (a hole), EFAULT (would not fault in)
        done += (end - start) // PAGE_SIZE
    return done
