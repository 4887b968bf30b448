"""Fixtures shared by the whole suite: running the CLI and throw-away stores.

The suite runs as root (CI does); a test that needs root asks for
``require_root`` (the store fixtures do), which fails rather than skips.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

GiB = 1024**3
StrPath = str | os.PathLike[str]


class Grootfs(Protocol):
    def __call__(
        self,
        *args: StrPath,
        store: StrPath | None = ...,
        check: bool = ...,
        config: StrPath | dict[str, Any] | None = ...,
        env: dict[str, str] | None = ...,
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "this test needs root (loop devices, mounts, runc): run the suite as root, "
            "e.g. `sudo make test`",
            pytrace=False,
        )


@pytest.fixture
def grootfs_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The structured log every ``grootfs`` call of the test appends to.

    Kept out of ``tmp_path``, which stays the test's own to fill and list.
    """
    return tmp_path_factory.mktemp("grootfs-log") / "grootfs.log"


@pytest.fixture(scope="session")
def grootfs_shim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One `grootfs serve` for the session, and the native shim built to reach it."""
    import forkserver

    forkserver.build_shim()
    server = forkserver.Server(tmp_path_factory.mktemp("grootfs-serve")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def grootfs_via() -> str:
    """How ``grootfs`` runs: "python" (the command) or "shim" (shim and server).

    A test module overrides it with both params to run its tests both ways.
    """
    return "python"


@pytest.fixture
def grootfs(grootfs_log: Path, grootfs_via: str, request: pytest.FixtureRequest) -> Grootfs:
    """Run the CLI as Garden does: a separate process, stdout parsed by the caller.

    ``store`` becomes ``--store``; ``config`` is a YAML file path or a dict
    written to one, passed as ``--config``; ``env`` is added to the
    environment the command runs in. With ``check`` a non-zero exit
    fails the test, showing stdout, stderr and the log's tail. Through the
    shim, the fallback is pointed nowhere, so only the server can succeed.
    """
    configs = 0
    command = [sys.executable, "-m", "grootfs_py"]
    server = None
    if grootfs_via == "shim":
        import forkserver

        server = request.getfixturevalue("grootfs_shim_server")
        command = [str(forkserver.SHIM)]

    def run(
        *args: StrPath,
        store: StrPath | None = None,
        check: bool = True,
        config: StrPath | dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        nonlocal configs
        argv: list[str] = list(command)
        if config is not None:
            if isinstance(config, dict):
                configs += 1
                path = grootfs_log.with_name(f"config-{configs}.yml")
                path.write_text(yaml.safe_dump(config))
                config = path
            argv += ["--config", os.fspath(config)]
        if store is not None:
            argv += ["--store", os.fspath(store)]
        argv += ["--log-file", os.fspath(grootfs_log), *(os.fspath(a) for a in args)]
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            env=server.shim_env(**(env or {})) if server else {**os.environ, **(env or {})},
        )
        if check and result.returncode != 0:
            log_tail = grootfs_log.read_text()[-3000:] if grootfs_log.exists() else ""
            pytest.fail(
                f"{' '.join(argv[len(command) :])} exited {result.returncode}"
                f" ({grootfs_via})\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\nlog tail:\n{log_tail}",
                pytrace=False,
            )
        return result

    return run


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path*, from /proc/self/mountinfo."""
    prefix = os.fspath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and \ octal-escaped.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def loop_devices_of(backing_file: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--noheadings", "--output", "NAME", "--associated", os.fspath(backing_file)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


@contextmanager
def _store_parent() -> Iterator[Path]:
    # Not pytest's tmp_path: its ancestors are mode 0700, which a user
    # namespace's mapped root could not traverse to reach a rootfs.
    parent = Path(tempfile.mkdtemp(prefix="grootfs-test-"))
    try:
        parent.chmod(0o755)
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _delete_store_and_check(grootfs: Grootfs, parent: Path, store: str) -> None:
    """delete-store, then assert it left no mount and no loop device behind.

    Whatever is left is cleaned up here before failing, so one leak does
    not break the tests after it.
    """
    result = grootfs("delete-store", store=store, check=False)
    backing = Path(f"{store}.backing-store")
    leaked_mounts = mounts_under(parent)
    leaked_loops = loop_devices_of(backing) if backing.exists() else []
    for point in reversed(leaked_mounts):
        subprocess.run(["umount", "--lazy", point], stdin=subprocess.DEVNULL, check=False)
    for device in leaked_loops:
        subprocess.run(["losetup", "--detach", device], stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, f"delete-store failed: {result.stdout}{result.stderr}"
    assert not leaked_mounts, f"delete-store left mounts: {leaked_mounts}"
    assert not leaked_loops, f"delete-store left loop devices on {backing}: {leaked_loops}"


@pytest.fixture
def xfs_store(require_root: None, grootfs: Grootfs) -> Iterator[str]:
    """The path (a str) of a 1 GiB loop-mounted XFS store, deleted and checked for leaks after."""
    with _store_parent() as parent:
        store = str(parent / "store")
        try:
            grootfs("init-store", "--store-size-bytes", str(GiB), store=store)
            yield store
        finally:
            _delete_store_and_check(grootfs, parent, store)


@pytest.fixture
def dir_store(require_root: None, grootfs: Grootfs) -> Iterator[str]:
    """A store that is a plain directory on the host filesystem (init-store without a size)."""
    with _store_parent() as parent:
        store = str(parent / "store")
        try:
            grootfs("init-store", store=store)
            yield store
        finally:
            _delete_store_and_check(grootfs, parent, store)


@pytest.fixture
def small_xfs_store(require_root: None, grootfs: Grootfs) -> Iterator[str]:
    """A loop-mounted XFS store of XFS's minimum size (300 MiB), for filling up."""
    with _store_parent() as parent:
        store = str(parent / "store")
        try:
            grootfs("init-store", "--store-size-bytes", str(300 * 1024 * 1024), store=store)
            yield store
        finally:
            _delete_store_and_check(grootfs, parent, store)
