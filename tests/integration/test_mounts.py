"""mounts.under on the real mount table: the quick "nothing there" answer must not miss one."""

import subprocess

import pytest

from grootfs_py import mounts


@pytest.mark.parametrize("name", ["plain", "with space", "tab\tand\\backslash"])
def test_under_finds_a_nested_mount_and_nothing_beside_it(tmp_path, name):
    parent = tmp_path / name
    point = parent / "a" / "b"
    point.mkdir(parents=True)
    sibling = tmp_path / (name + "-sibling")  # shares the prefix without the slash
    sibling.mkdir()
    assert mounts.under(str(parent)) == []
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], check=True)
    try:
        assert mounts.under(str(parent)) == [str(point)]
        assert mounts.under(str(parent / "a")) == [str(point)]
        assert mounts.under(str(point)) == []  # strictly below
        assert mounts.under(str(sibling)) == []
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert mounts.under(str(parent)) == []
