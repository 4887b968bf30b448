"""prefault: which pages a forked child wrote, and taking copies ahead of time.

The pagemap tests fork for real: "written" only means something in a child,
for memory it inherited.
"""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from grootfs_py import prefault
from grootfs_py.linux import PAGE_SIZE

MAPS = """\
55d0c8a00000-55d0c8a21000 rw-p 00000000 00:00 0                          [heap]
7f00aa000000-7f00aa004000 r--p 00000000 fe:01 1234                       /usr/lib/libc.so.6
7f00aa004000-7f00aa008000 rw-p 00004000 fe:01 1234                       /usr/lib/libc.so.6
7f00ab000000-7f00ab001000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
7f00ac000000-7f00ac002000 r-xp 00000000 fe:01 77                         /usr/bin/python3
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_private_writable_keeps_only_private_writable_mappings():
    assert prefault.private_writable(MAPS) == [
        (0x55D0C8A00000, 0x55D0C8A21000),
        (0x7F00AA004000, 0x7F00AA008000),
        (0x7FFC00000000, 0x7FFC00021000),
    ]


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ([], [], []),
        ([(0, 4096)], [], [(0, 4096)]),
        ([(0, 4096)], [(4096, 8192)], [(0, 8192)]),  # adjacent runs join
        ([(0, 8192)], [(4096, 12288)], [(0, 12288)]),  # overlapping
        ([(8192, 12288)], [(0, 4096)], [(0, 4096), (8192, 12288)]),  # sorted, gap kept
        ([(0, 12288)], [(4096, 8192)], [(0, 12288)]),  # contained
    ],
)
def test_union_covers_both_and_joins_what_touches(a, b, want):
    assert prefault.union(a, b) == want


def test_runs_survive_encoding_and_bad_ones_are_dropped():
    runs = [(PAGE_SIZE, 3 * PAGE_SIZE), (0x7F0000000000, 0x7F0000000000 + PAGE_SIZE)]
    assert prefault.decode(prefault.encode(runs)) == runs
    misaligned = prefault.encode([(1, PAGE_SIZE)])
    backwards = prefault.encode([(2 * PAGE_SIZE, PAGE_SIZE)])
    assert prefault.decode(misaligned + backwards + b"\0" * 5) == []


def in_child(work: Callable[[], Any]) -> Any:
    """*work*'s result, computed in a forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, pickle.dumps(work()))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


@pytest.fixture
def pages() -> mmap.mmap:
    """Eight pages the parent has touched, so the child inherits them present and shared."""
    area = mmap.mmap(-1, 8 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(8):
        area[i * PAGE_SIZE] = i + 1
    return area


def address(area: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(area))


def inside(runs: list[prefault.Run], start: int, end: int) -> list[int]:
    """The page numbers of [start, end) that *runs* cover."""
    return [
        (p - start) // PAGE_SIZE
        for p in range(start, end, PAGE_SIZE)
        if any(a <= p < b for a, b in runs)
    ]


def test_written_finds_exactly_the_pages_a_child_wrote(pages):
    base = address(pages)

    def work() -> list[int]:
        mappings = prefault.own_mappings()
        pages[2 * PAGE_SIZE + 10] = 99
        pages[5 * PAGE_SIZE] = 98
        _ = pages[7 * PAGE_SIZE]  # read only: still shared
        return inside(prefault.written(mappings), base, base + 8 * PAGE_SIZE)

    assert in_child(work) == [2, 5]


def test_populate_copies_pages_without_changing_them(pages):
    base = address(pages)

    def work() -> tuple[int, list[int], bytes]:
        mappings = prefault.own_mappings()
        runs = [
            (base + PAGE_SIZE, base + 3 * PAGE_SIZE),
            (base + 6 * PAGE_SIZE, base + 7 * PAGE_SIZE),
        ]
        done = prefault.populate(runs)
        copied = inside(prefault.written(mappings), base, base + 8 * PAGE_SIZE)
        return done, copied, bytes(pages[i * PAGE_SIZE] for i in range(8))

    done, copied, contents = in_child(work)
    if done == 0:
        pytest.fail("MADV_POPULATE_WRITE unsupported: this kernel is older than 5.14")
    assert done == 3
    assert copied == [1, 2, 6]
    assert contents == bytes(range(1, 9))
    assert bytes(pages[i * PAGE_SIZE] for i in range(8)) == bytes(range(1, 9))  # parent's too


def test_populate_skips_what_is_not_mapped_any_more(pages):
    base = address(pages)

    def work() -> tuple[int, list[int]]:
        mappings = prefault.own_mappings()
        gone = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        hole = address(gone)
        gone.close()
        done = prefault.populate([(hole, hole + PAGE_SIZE), (base, base + PAGE_SIZE)])
        return done, inside(prefault.written(mappings), base, base + 8 * PAGE_SIZE)

    assert in_child(work) == (1, [0])
