"""The early flushes of a stack tar's cold unpack (volumes._Flusher), on a real filesystem.

syncfs is wrapped, not replaced: the spy records which thread flushed, then
makes the real system call.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from grootfs_py import linux, volumes


def test_flusher_flushes_on_its_thread_every_so_many_bytes_and_stops_with_the_unpack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = linux.syncfs

    def spy(fd: int) -> None:
        calls.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(linux, "syncfs", spy)
    with volumes._Flusher(str(tmp_path)) as flusher:
        flusher.wrote(volumes._Flusher.EVERY - 1)
        time.sleep(0.2)
        assert calls == []  # below the threshold: no flush yet
        flusher.wrote(1)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == ["flusher"]
        flusher.wrote(volumes._Flusher.EVERY // 2)
    assert not flusher._thread.is_alive()
    assert calls == ["flusher"]  # half the threshold since: none at the exit either
