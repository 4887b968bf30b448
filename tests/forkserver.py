"""Running `grootfs serve` and the native shim from tests.

The shim is built with `make shim`; the server is the real one, started as
its own process on a socket in a directory of the test's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "build" / "grootfs-shim"
PYTHON_CLI = Path(sys.executable).with_name("grootfs")  # the venv's console script
# Where a test that means the server to run the command points the fallback:
# were the shim to fall back, it would fail to exec this and say so.
NO_CLI = "/nonexistent/grootfs-python-cli"


def build_shim() -> Path:
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "shim"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"make shim failed:\n{result.stdout}{result.stderr}"
    return SHIM


class Server:
    """A `grootfs serve` process on ``<directory>/run/grootfs.sock``."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.socket = directory / "run" / "grootfs.sock"
        self.log_path = directory / "server.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "grootfs_py", "serve", "--socket", str(self.socket)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        # Serving, and both forkers done importing (until then the server
        # forks commands itself, which works but is not what tests look at).
        ready = self.log().count('.serve.forker-ready"') + 2
        deadline = time.monotonic() + 60
        while self.log().count('.serve.forker-ready"') < ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"grootfs serve did not start:\n{self.log()}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def children(self) -> list[int]:
        """The commands running: the children of the server's forkers but their standbys."""
        return [pid for pid in self._forkers_children() if comm(pid) not in STANDBY_NAMES]

    def standbys(self) -> list[int]:
        """The forkers' standby children (forked, waiting for a request)."""
        return [pid for pid in self._forkers_children() if comm(pid) in STANDBY_NAMES]

    def _forkers_children(self) -> list[int]:
        return [pid for forker in children_of(self.pid) for pid in children_of(forker)]

    def shim_env(self, cli: str | os.PathLike[str] = NO_CLI, **extra: str) -> dict[str, str]:
        """The environment that sends the shim to this server (timeout generous for busy CI)."""
        return {
            **os.environ,
            "GROOTFS_SOCKET": str(self.socket),
            "GROOTFS_PYTHON_CLI": os.fspath(cli),
            "GROOTFS_SHIM_ACK_TIMEOUT_MS": "30000",
            **extra,
        }


# What ps shows for a forker's standby child while it prefaults, then while
# it waits (server.WARMING_NAME, STANDBY_NAME: the names operators are told).
WARMING = "grootfs-warming"
STANDBY = "grootfs-standby"
STANDBY_NAMES = (WARMING, STANDBY)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:
        return ""


def open_files(pid: int | str = "self") -> dict[str, str]:
    """A process's descriptors and what they point to ({} once it is gone).

    A descriptor closed while it is listed (the listing's own) is left out.
    """
    found = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in fds:
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return found


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent's pid; the command name (field 2) may hold spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_quietly(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
