"""fsutil.open_regular: every blob and stack tar is opened through it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from grootfs_py import fsutil


def test_opens_a_regular_file_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "stack.tar").write_bytes(b"tar bytes")
    (tmp_path / "blob").symlink_to(tmp_path / "stack.tar")
    with fsutil.open_regular(str(tmp_path / "blob")) as f:
        assert f.read() == b"tar bytes"


def test_symlink_refused_when_not_following(tmp_path: Path) -> None:
    (tmp_path / "stack.tar").write_bytes(b"x")
    (tmp_path / "blob").symlink_to(tmp_path / "stack.tar")
    with pytest.raises(fsutil.NotRegularFileError, match="a symlink, not a regular file"):
        fsutil.open_regular(str(tmp_path / "blob"), follow_symlinks=False)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: os.mkfifo(p), "a FIFO"),
        (lambda p: os.mkdir(p), "a directory"),
        (lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)), "a character device"),
        (lambda p: os.mknod(p, stat.S_IFBLK | 0o600, os.makedev(7, 0)), "a block device"),
    ],
    ids=["fifo", "directory", "chardev", "blockdev"],
)
def test_non_regular_targets_are_refused_without_blocking(
    tmp_path: Path, make: object, kind: str
) -> None:
    target = tmp_path / "target"
    make(str(target))  # type: ignore[operator]
    (tmp_path / "blob").symlink_to(target)
    # A FIFO without a writer would hang a plain open() here forever.
    with pytest.raises(fsutil.NotRegularFileError, match=f"{kind}, not a regular file"):
        fsutil.open_regular(str(tmp_path / "blob"))


def test_missing_file_is_an_ordinary_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsutil.open_regular(str(tmp_path / "absent"))
