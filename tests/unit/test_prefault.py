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


def in_child(act: Callable[[], Any], then: Callable[[int], Any]) -> Any:
    """Fork a child that runs *act* and waits; *then* (the child's pid)'s result, here.

    The child stays alive (its pages mapped) until *then* has returned.
    """
    done_r, done_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(done_r)
            os.close(go_w)
            act()
            os.write(done_w, b".")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(done_w)
    os.close(go_r)
    try:
        if os.read(done_r, 1) != b".":
            raise AssertionError("the child failed")
        return then(pid)
    finally:
        os.close(go_w)
        os.close(done_r)
        os.waitpid(pid, 0)


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


def inside(runs: list[prefault.Run] | None, start: int, end: int) -> list[int]:
    """The page numbers of [start, end) that *runs* cover."""
    assert runs is not None
    return [
        (p - start) // PAGE_SIZE
        for p in range(start, end, PAGE_SIZE)
        if any(a <= p < b for a, b in runs)
    ]


def test_written_finds_exactly_the_pages_a_child_wrote(pages):
    """Read from the parent, page frames compared: what the parent writes is not counted."""
    assert os.geteuid() == 0, "page frame numbers are shown to root only"
    base = address(pages)
    maps = prefault.own_mappings()
    before = prefault.snapshot(maps)

    def act() -> None:
        pages[2 * PAGE_SIZE + 10] = 99
        pages[5 * PAGE_SIZE] = 98
        _ = pages[7 * PAGE_SIZE]  # read only: still shared

    def then(pid: int) -> list[int]:
        pages[3 * PAGE_SIZE] = 97  # the parent's copy: the child's page is its alone now
        return inside(prefault.written(pid, maps, before), base, base + 8 * PAGE_SIZE)

    assert in_child(act, then) == [2, 5]


def test_without_page_frames_a_page_no_longer_shared_counts_as_written():
    """A rootless server's forker: frame numbers read as 0, the exclusive flag decides.

    The scan runs in a process that has given up root, as the forker of a
    server run by another user does; the page it copies away after the fork
    counts too, as the child has it alone.
    """

    def rootless() -> list[int]:
        os.setgid(65534)
        os.setuid(65534)
        from grootfs_py import linux

        linux._libc().prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: its children's pagemaps
        area = mmap.mmap(-1, 8 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(8):
            area[i * PAGE_SIZE] = i + 1
        base = address(area)
        maps = prefault.own_mappings()
        before = prefault.snapshot(maps)

        def act() -> None:
            area[1 * PAGE_SIZE] = 99

        def then(pid: int) -> list[int]:
            area[4 * PAGE_SIZE] = 97
            return inside(prefault.written(pid, maps, before), base, base + 8 * PAGE_SIZE)

        return in_child(act, then)

    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(result_r)
            os.write(result_w, pickle.dumps(rootless()))
        finally:
            os._exit(0)
    os.close(result_w)
    with os.fdopen(result_r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    assert data, "the rootless scan failed"
    assert pickle.loads(data) == [1, 4]


def test_written_is_none_once_the_child_is_gone(pages):
    maps = prefault.own_mappings()
    before = prefault.snapshot(maps)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert prefault.written(pid, maps, before) is None


def _populated(runs: list[prefault.Run], pages: mmap.mmap) -> tuple[int, list[int], bytes]:
    """Populate *runs* in a child: its count, the pages it copied (seen from here), contents."""
    base = address(pages)
    maps = prefault.own_mappings()
    before = prefault.snapshot(maps)
    count_r, count_w = os.pipe()

    def act() -> None:
        done = prefault.populate(runs)
        contents = bytes(pages[i * PAGE_SIZE] for i in range(8))
        os.write(count_w, pickle.dumps((done, contents)))

    def then(pid: int) -> list[int]:
        return inside(prefault.written(pid, maps, before), base, base + 8 * PAGE_SIZE)

    copied = in_child(act, then)
    os.close(count_w)
    with os.fdopen(count_r, "rb") as f:
        done, contents = pickle.loads(f.read())
    return done, copied, contents


def test_populate_copies_pages_without_changing_them(pages):
    base = address(pages)
    runs = [(base + PAGE_SIZE, base + 3 * PAGE_SIZE), (base + 6 * PAGE_SIZE, base + 7 * PAGE_SIZE)]
    done, copied, contents = _populated(runs, pages)
    if done == 0:
        pytest.fail("MADV_POPULATE_WRITE unsupported: this kernel is older than 5.14")
    assert done == 3
    assert copied == [1, 2, 6]
    assert contents == bytes(range(1, 9))
    assert bytes(pages[i * PAGE_SIZE] for i in range(8)) == bytes(range(1, 9))  # parent's too


def test_populate_skips_what_is_not_mapped_any_more(pages):
    base = address(pages)
    gone = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    hole = address(gone)
    gone.close()
    runs = [
        (base, base + PAGE_SIZE),
        (hole, hole + PAGE_SIZE),
        (base + 3 * PAGE_SIZE, base + 4 * PAGE_SIZE),
    ]
    done, copied, _ = _populated(sorted(runs), pages)
    assert (done, copied) == (2, [0, 3])


def test_a_plan_of_more_runs_than_one_call_takes_populates_them_all():
    """Over UIO_MAXIOV runs: the vector is handed to the kernel in parts."""
    count = prefault.UIO_MAXIOV + 300
    area = mmap.mmap(-1, 2 * count * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(2 * count):
        area[i * PAGE_SIZE] = 1
    base = address(area)
    runs = [(base + 2 * i * PAGE_SIZE, base + (2 * i + 1) * PAGE_SIZE) for i in range(count)]
    maps = prefault.own_mappings()
    before = prefault.snapshot(maps)
    plan = prefault.Plan(runs)

    def then(pid: int) -> list[int]:
        return inside(prefault.written(pid, maps, before), base, base + 2 * count * PAGE_SIZE)

    assert in_child(plan.populate, then) == [2 * i for i in range(count)]
