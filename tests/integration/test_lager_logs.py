"""What Garden keeps of our logs: every stderr line is a lager entry kept at its own level.

Garden runs the plugin with its stderr going through lager's chug and
re-logs each line: an entry at the entry's level, anything else as a Garden
error. ``garden.relog`` models that (pinned by tests/unit/test_chug_model.py);
here the real CLI's stderr, and its log file, go through it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import garden
import imagefactory as f

LAGER_TO_GARDEN = {0: "debug", 1: "info", 2: "error", 3: "error"}  # fatal is a Garden error


def _cli(*args: str, log_file: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "grootfs_py", "--log-level", "debug"]
    if log_file:
        argv += ["--log-file", log_file]
    return subprocess.run(
        [*argv, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


def _assert_kept_at_their_level(text: str, command: str) -> list[garden.Relogged]:
    relogged = garden.relog(text)
    lines = [line for line in text.split("\n") if line]
    assert len(relogged) == len(lines)
    for line, r in zip(lines, relogged, strict=True):
        own = json.loads(line)
        # lager's own form, the one every chug reads (not only newer ones).
        assert re.fullmatch(r"[0-9]+\.[0-9]{9}", own["timestamp"]), line
        assert type(own["log_level"]) is int and "level" not in own, line
        assert r.entry.is_lager, f"Garden would log this line as an error: {line}"
        assert r.garden_level == LAGER_TO_GARDEN[own["log_level"]], line
        assert r.message == own["message"]
        assert r.message.startswith(f"grootfs.{command}."), line
        assert r.entry.source == "grootfs"
        assert r.entry.session == "1"
    return relogged


@pytest.fixture
def tarball(tmp_path):
    return f.write_tarball(
        str(tmp_path / "rootfs.tar"), [*f.busybox_layer(), f.file("etc/motd", b"hi\n")]
    )


def test_every_stderr_line_of_every_command_is_kept_at_its_level(dir_store, tarball):
    store = ["--store", dir_store]
    runs = [
        ("create", [*store, "create", tarball, "one"], 0),
        ("create", [*store, "create", tarball, "one"], 1),  # id already taken
        ("create", [*store, "create", "/no/such/rootfs.tar", "two"], 1),
        ("stats", [*store, "stats", "one"], 0),
        ("list", [*store, "list"], 0),
        ("delete", [*store, "delete", "one"], 0),
        ("delete", [*store, "delete", "never-created"], 0),
        ("clean", [*store, "clean"], 0),
    ]
    levels = set()
    for command, argv, status in runs:
        result = _cli(*argv)
        assert result.returncode == status, result.stdout + result.stderr
        for r in _assert_kept_at_their_level(result.stderr, command):
            levels.add(r.garden_level)
        if status:
            # The failure's own line, at error level, carries stdout's one line as its error.
            (error,) = [r for r in garden.relog(result.stderr) if r.garden_level == "error"]
            assert error.entry.error == result.stdout.strip()
    assert levels == {"debug", "info", "error"}


def test_the_log_file_has_the_same_lines(dir_store, tarball, tmp_path):
    log_file = tmp_path / "grootfs.log"
    assert _cli("--store", dir_store, "create", tarball, "x", log_file=str(log_file)).stdout
    result = _cli("--store", dir_store, "delete", "x", log_file=str(log_file))
    assert result.returncode == 0 and result.stderr == ""
    text = log_file.read_text()
    create, delete = (
        [line for line in text.splitlines() if f'"grootfs.{c}.' in line]
        for c in ("create", "delete")
    )
    assert create and delete and len(create) + len(delete) == len(text.splitlines())
    _assert_kept_at_their_level("\n".join(create), "create")
    _assert_kept_at_their_level("\n".join(delete), "delete")


def test_an_error_that_is_not_a_string_is_logged_as_one(capsys):
    from grootfs_py import log

    log.close()  # back to sys.stderr, which capsys has replaced
    log.configure("debug", command="create")
    try:
        log.error("unpack failed", error=OSError(28, "No space left on device"), trace=["a"])
    finally:
        log.close()
    (r,) = garden.relog(capsys.readouterr().err)
    assert (r.garden_level, r.message) == ("error", "grootfs.create.unpack-failed")
    assert r.entry.error == "[Errno 28] No space left on device"
