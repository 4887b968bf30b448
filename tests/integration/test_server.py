"""`grootfs serve` and the native shim: the same commands, run by a fork server.

Every test runs the real shim (built by `make shim`) against a real server
process. Where a test means the server to do the work, the shim's fallback
points at a path that does not exist: had the shim fallen back, the command
would fail saying it cannot run it.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import forkserver as fs
import imagefactory as f
import registry as r

NOBODY = 65534


@pytest.fixture(scope="module")
def shim() -> Path:
    return fs.build_shim()


@pytest.fixture(scope="module")
def server(shim: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fs.Server]:
    """A server shared by the tests that do not stop it."""
    srv = fs.Server(tmp_path_factory.mktemp("serve")).start()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture
def own_server(shim: Path, tmp_path: Path) -> Iterator[fs.Server]:
    """A server of this test's own, to kill or restart."""
    srv = fs.Server(tmp_path / "serve").start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop(signal.SIGKILL)


def run_shim(
    server: fs.Server,
    *args: str,
    store: str | None = None,
    cli: str | os.PathLike[str] = fs.NO_CLI,
    env: dict[str, str] | None = None,
    **kwargs,
) -> subprocess.CompletedProcess[str]:
    argv = [str(fs.SHIM), *(["--store", store] if store else []), *args]
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        env={**server.shim_env(cli), **(env or {})},
        **kwargs,
    )


def start_shim(server: fs.Server, *args: str, store: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(fs.SHIM), "--store", store, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server.shim_env(**env),
    )


def python(*args: str, store: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grootfs_py", "--store", store, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def assert_store_clean(store: str) -> None:
    """clean collects what a killed create left, and then check-store finds nothing."""
    assert python("clean", store=store).returncode == 0
    checked = python("check-store", store=store)
    assert checked.returncode == 0, checked.stdout
    assert not [v for v in os.listdir(os.path.join(store, "volumes")) if "incomplete" in v]
    assert os.listdir(os.path.join(store, "tmp")) == []


def stalled_create(
    server: fs.Server, proxy: r.FaultProxy, store: str, seconds: float, image_id: str = "c"
) -> subprocess.Popen[str]:
    """A create through the shim that is, once this returns, stuck in a blob download."""
    proxy.reset(stall_blobs=1, stall_seconds=seconds, min_blob_bytes=100_000)
    shim = start_shim(
        server,
        "create",
        "--insecure-registry",
        proxy.host,
        f"docker://{proxy.host}/multi:v1",
        image_id,
        store=store,
    )
    try:
        fs.wait_until(lambda: proxy.blob_requests(), what="a blob request")
    except AssertionError:
        fs.kill_quietly(shim)
        raise
    return shim


# -- what the caller sees ------------------------------------------------------


def test_output_reaches_the_callers_own_pipes(server, dir_store):
    listed = run_shim(server, "list", store=dir_store)
    assert (listed.returncode, listed.stdout) == (0, "Store empty\n")
    missing = run_shim(server, "stats", "nope", store=dir_store)
    assert (missing.returncode, missing.stdout) == (1, "image `nope` not found\n")
    # The log line went to the caller's stderr, not the server's.
    line = json.loads(missing.stderr.splitlines()[-1])
    assert line["message"] == "grootfs.stats.command-failed"
    assert "image `nope` not found" not in server.log()


def test_output_to_a_file_the_caller_opened(server, dir_store, tmp_path):
    with open(tmp_path / "out", "w") as out:
        result = subprocess.run(
            [str(fs.SHIM), "--store", dir_store, "list"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            env=server.shim_env(),
            check=False,
        )
    assert result.returncode == 0
    assert (tmp_path / "out").read_text() == "Store empty\n"


@pytest.mark.parametrize(
    ("args", "code", "stdout_start"),
    [
        (["list"], 0, "Store empty"),
        (["stats", "nope"], 1, "image `nope` not found"),
        ([], 1, "invalid arguments: "),  # parse error: raised, printed, exit 1
        (["--help"], 0, "usage: grootfs"),  # argparse's sys.exit(0)
        (["create", "only-one-arg"], 1, "invalid arguments - usage: create"),
    ],
)
def test_exit_status_and_output_match_the_python_command(
    server, dir_store, args, code, stdout_start
):
    through_shim = run_shim(server, *args, store=dir_store)
    direct = python(*args, store=dir_store)
    assert through_shim.returncode == direct.returncode == code
    assert through_shim.stdout == direct.stdout
    assert through_shim.stdout.startswith(stdout_start)


def test_relative_paths_resolve_in_the_callers_working_directory(server, dir_store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yml").write_text(json.dumps({"store": "store-link"}))
    (work / "store-link").symlink_to(dir_store)
    # The server's own directory has neither file; the caller's has both.
    result = run_shim(server, "--config", "config.yml", "list", cwd=work)
    assert (result.returncode, result.stdout) == (0, "Store empty\n"), result.stdout


def test_the_callers_umask_applies_to_files_the_command_makes(server, dir_store, tmp_path):
    for umask, mode in ((0o077, 0o600), (0o022, 0o644), (0o002, 0o664)):
        log = tmp_path / f"log-{umask:o}"
        result = run_shim(server, "--log-file", str(log), "list", store=dir_store, umask=umask)
        assert result.returncode == 0, result.stdout
        assert log.stat().st_mode & 0o777 == mode, f"umask {umask:o}"


def test_environment_is_the_callers_not_the_servers(shim, tmp_path, dir_store, open_registry):
    dead = _free_port()
    # The server itself has a proxy that goes nowhere ...
    srv = fs.Server(
        tmp_path / "serve",
        env={**_without_proxies(os.environ), "http_proxy": f"http://127.0.0.1:{dead}"},
    ).start()
    try:
        args = ["create", "--insecure-registry", open_registry.host]
        url = f"docker://{open_registry.host}/busybox:latest"
        # ... which a caller without one does not get,
        clean_env = _without_proxies(srv.shim_env())
        ok = subprocess.run(
            [str(fs.SHIM), "--store", dir_store, *args, url, "a"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=clean_env,
            check=False,
        )
        assert ok.returncode == 0, ok.stdout
        assert json.loads(ok.stdout)["root"]["path"].endswith("/a/rootfs")
        # ... and a caller with its own dead proxy goes through that one.
        proxied = subprocess.run(
            [str(fs.SHIM), "--store", dir_store, *args, url, "b"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**clean_env, "http_proxy": f"http://127.0.0.1:{_free_port()}"},
            check=False,
        )
        assert proxied.returncode == 1
        assert "connection refused" in proxied.stdout, proxied.stdout
        assert not os.path.exists(os.path.join(dir_store, "images", "b"))
    finally:
        assert srv.stop() == 0


def test_twenty_parallel_creates_through_the_shim_all_succeed(server, dir_store, tmp_path):
    tar = f.write_tarball(str(tmp_path / "stack.tar"), [f.directory("etc"), f.file("etc/x", b"x")])
    shims = [
        start_shim(server, "create", tar, f"p{i}", store=dir_store, GROOTFS_PYTHON_CLI=fs.NO_CLI)
        for i in range(20)
    ]
    outcomes = [(s.wait(120), *s.communicate()) for s in shims]
    assert [o[0] for o in outcomes] == [0] * 20, [o for o in outcomes if o[0]]
    for i, (_, out, _) in enumerate(outcomes):
        assert json.loads(out)["root"]["path"].endswith(f"/p{i}/rootfs")
    listed = run_shim(server, "list", store=dir_store).stdout.split()
    assert len(listed) == 20
    deletes = [start_shim(server, "delete", f"p{i}", store=dir_store) for i in range(20)]
    assert [d.wait(120) for d in deletes] == [0] * 20
    assert run_shim(server, "list", store=dir_store).stdout == "Store empty\n"


def test_create_with_clean_starts_its_detached_clean_from_the_forked_child(
    server, dir_store, tmp_path
):
    tar = f.write_tarball(str(tmp_path / "stack.tar"), [f.file("x", b"x")])
    log = tmp_path / "create.log"
    result = run_shim(
        server, "--log-file", str(log), "create", "--with-clean", tar, "w", store=dir_store
    )
    assert result.returncode == 0, result.stdout
    fs.wait_until(lambda: '.clean.clean-completed"' in log.read_text(), what="the detached clean")


# -- signals and kills ---------------------------------------------------------


def test_sigint_is_forwarded_and_unwinds_the_create_as_in_python(server, dir_store, proxy):
    shim = stalled_create(server, proxy, dir_store, seconds=3)
    shim.send_signal(signal.SIGINT)
    out, _ = shim.communicate(timeout=60)
    # KeyboardInterrupt in the command: it unwinds, says so, exits 1.
    assert (shim.returncode, out) == (1, "interrupted\n")
    assert not os.path.exists(os.path.join(dir_store, "images", "c"))
    assert_store_clean(dir_store)


def test_sigterm_kills_the_command_and_the_shim_dies_of_it(server, dir_store, proxy):
    shim = stalled_create(server, proxy, dir_store, seconds=30)
    [child] = server.children()
    shim.send_signal(signal.SIGTERM)
    shim.wait(timeout=30)
    assert shim.returncode == -signal.SIGTERM
    fs.wait_until(lambda: not fs.alive(child), what="the command to die")
    assert_store_clean(dir_store)


def test_a_command_killed_by_a_signal_is_reported_as_that_signal(server, dir_store, proxy):
    shim = stalled_create(server, proxy, dir_store, seconds=30)
    [child] = server.children()
    os.kill(child, signal.SIGKILL)
    shim.wait(timeout=30)
    assert shim.returncode == -signal.SIGKILL
    assert_store_clean(dir_store)


def test_killing_the_shim_kills_its_command_and_clean_collects_the_rest(server, dir_store, proxy):
    shim = stalled_create(server, proxy, dir_store, seconds=30)
    [child] = server.children()
    fs.kill_quietly(shim)
    fs.wait_until(lambda: not fs.alive(child), timeout=10, what="the orphaned command to die")
    assert not os.path.exists(os.path.join(dir_store, "images", "c"))
    assert_store_clean(dir_store)


def test_a_server_killed_mid_request_lets_the_request_complete(own_server, dir_store, proxy):
    shim = stalled_create(own_server, proxy, dir_store, seconds=2)
    [child] = own_server.children()
    own_server.stop(signal.SIGKILL)
    out, _ = shim.communicate(timeout=60)
    # The command ran on and reported its own exit status.
    assert shim.returncode == 0, out
    assert json.loads(out)["root"]["path"].endswith("/c/rootfs")
    fs.wait_until(lambda: not fs.alive(child), what="the command to exit")
    checked = python("check-store", store=dir_store)
    assert checked.returncode == 0, checked.stdout
    # A new server replaces the dead one's socket and serves.
    own_server.start()
    listed = run_shim(own_server, "list", store=dir_store)
    assert listed.returncode == 0
    assert listed.stdout.strip().endswith("/images/c")
    assert run_shim(own_server, "delete", "c", store=dir_store).returncode == 0


def test_a_command_killed_with_no_server_left_fails_without_falling_back(
    own_server, dir_store, proxy
):
    shim = stalled_create(own_server, proxy, dir_store, seconds=30)
    [child] = own_server.children()
    forkers = fs.children_of(own_server.pid)
    own_server.stop(signal.SIGKILL)  # its forkers follow when their pair closes
    fs.wait_until(lambda: not any(map(fs.alive, forkers)), what="the forkers to exit")
    os.kill(child, signal.SIGKILL)  # nobody left to see how it died
    out, _ = shim.communicate(timeout=30)
    assert shim.returncode == 1
    assert out == (
        "grootfs-shim: the grootfs server went away before reporting the command's exit status\n"
    )
    assert_store_clean(dir_store)


def test_sigterm_stops_taking_requests_and_waits_for_running_ones(own_server, dir_store, proxy):
    shim = stalled_create(own_server, proxy, dir_store, seconds=3)
    os.kill(own_server.pid, signal.SIGTERM)
    fs.wait_until(lambda: not own_server.socket.exists(), timeout=10, what="the socket to go")
    # New callers fall back to the Python command meanwhile.
    fallback = run_shim(own_server, "list", store=dir_store, cli=fs.PYTHON_CLI)
    assert fallback.returncode == 0
    assert own_server.proc is not None and own_server.proc.poll() is None  # still draining
    out, _ = shim.communicate(timeout=60)
    assert shim.returncode == 0, out
    assert own_server.proc.wait(30) == 0
    assert '.serve.stopped"' in own_server.log()


# -- security ------------------------------------------------------------------


def test_socket_directory_is_made_owner_only(server):
    info = server.socket.parent.stat()
    assert info.st_mode & 0o777 == 0o700
    assert info.st_uid == os.geteuid()


@pytest.mark.parametrize("problem", ["mode", "owner"])
def test_server_refuses_a_socket_directory_others_can_enter(shim, tmp_path, problem):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    if problem == "mode":
        run.chmod(0o755)
    else:
        os.chown(run, NOBODY, NOBODY)
    result = subprocess.run(
        [sys.executable, "-m", "grootfs_py", "serve", "--socket", str(run / "g.sock")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert line.startswith(f"serve: socket directory {run} ")
    assert ("mode 0755" if problem == "mode" else f"uid {NOBODY}") in line
    assert not (run / "g.sock").exists()


def test_a_second_server_on_the_same_socket_is_refused(server):
    result = subprocess.run(
        [sys.executable, "-m", "grootfs_py", "serve", "--socket", str(server.socket)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (
        1,
        f"serve: another server is running on {server.socket}\n",
    )
    assert run_shim(server, "--help").returncode == 0  # the first still serves


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="grootfs-serve-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(*setpriv_flags: str) -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        *setpriv_flags,
    ]


def _list_as_nobody(server, store, log, caps) -> subprocess.CompletedProcess[str]:
    """`list` through the shim as another uid, the fallback pointed at the real Python command."""
    return subprocess.run(
        [*_as_nobody(*caps), str(fs.SHIM), "--store", store, "--log-file", str(log), "list"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=server.shim_env(fs.PYTHON_CLI),
        check=False,
    )


def test_another_uid_is_refused_by_the_server_and_falls_back(server, dir_store, shared_dir):
    # With CAP_DAC_OVERRIDE the other uid gets through the 0700 directory, so
    # what refuses it is the server's SO_PEERCRED check.
    log = shared_dir / "by-whom.log"
    cap = ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    result = _list_as_nobody(server, dir_store, log, cap)
    assert (result.returncode, result.stdout) == (0, "Store empty\n"), result.stderr
    # The Python command ran, as that uid: the log file it made is its own.
    assert log.stat().st_uid == NOBODY
    fs.wait_until(
        lambda: f'"peer_uid":{NOBODY}' in server.log(), timeout=5, what="the refusal logged"
    )
    assert ".serve.refused-a-caller-of-another-uid" in server.log()
    # The same call by the server's own uid is served (no fallback to run).
    same = run_shim(server, "--log-file", str(shared_dir / "root.log"), "list", store=dir_store)
    assert same.returncode == 0
    assert (shared_dir / "root.log").stat().st_uid == 0


def test_another_uid_cannot_reach_the_socket_and_falls_back(server, dir_store, shared_dir):
    log = shared_dir / "by-whom.log"
    probe = subprocess.run(
        [*_as_nobody(), sys.executable, "-c", _CONNECT, str(server.socket)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.stdout.strip() == "PermissionError"  # the directory stops it
    # CAP_DAC_READ_SEARCH only so that this uid can run the test's Python,
    # which lives under root's home here; the socket (0600) still stops it.
    cap = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    refusals = server.log().count(".serve.refused-a-caller")
    result = _list_as_nobody(server, dir_store, log, cap)
    assert (result.returncode, result.stdout) == (0, "Store empty\n"), result.stderr
    assert log.stat().st_uid == NOBODY
    assert server.log().count(".serve.refused-a-caller") == refusals  # it never got that far


_CONNECT = """
import socket, sys
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_a_serve_request_is_not_forked_but_left_to_the_python_command(server, tmp_path):
    result = run_shim(server, "serve", "--socket", str(tmp_path / "run" / "other.sock"))
    # Refused unanswered, so the shim fell back, here to a command that does not exist.
    assert result.returncode == 1
    assert result.stdout == f"grootfs-shim: cannot run {fs.NO_CLI}: No such file or directory\n"
    assert ".serve.refused-a-serve-request" in server.log()


# -- fallback ------------------------------------------------------------------


class _FakeServer:
    """A socket that accepts and then either hangs up unanswered or never answers."""

    def __init__(self, path: Path, hang: bool) -> None:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.hang = hang
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            if self.hang:
                self.held.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("situation", ["no-socket", "stale-socket", "hangs-up", "hangs"])
def test_shim_falls_back_to_the_python_command(shim, dir_store, tmp_path, situation):
    sock = tmp_path / "run" / "grootfs.sock"
    fake = None
    if situation == "stale-socket":
        sock.parent.mkdir(mode=0o700)
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(sock))  # bound, never listening: what a killed server leaves
        dead.close()
    elif situation in ("hangs-up", "hangs"):
        fake = _FakeServer(sock, hang=situation == "hangs")
    env = {
        **os.environ,
        "GROOTFS_SOCKET": str(sock),
        "GROOTFS_PYTHON_CLI": str(fs.PYTHON_CLI),
        "GROOTFS_SHIM_ACK_TIMEOUT_MS": "500",
    }
    try:
        start = time.monotonic()
        result = subprocess.run(
            [str(shim), "--store", dir_store, "stats", "nope"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        elapsed = time.monotonic() - start
    finally:
        if fake:
            fake.close()
    direct = python("stats", "nope", store=dir_store)
    assert (result.returncode, result.stdout) == (direct.returncode, direct.stdout)
    if situation == "hangs":
        assert elapsed >= 0.5  # it waited for the server ...
    # ... but boundedly: 0.5 s, then the Python command itself.
    assert elapsed < 30


def test_fallback_failing_to_exec_says_so_on_one_line(shim, tmp_path):
    result = subprocess.run(
        [str(shim), "list"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "GROOTFS_SOCKET": str(tmp_path / "none.sock"),
            "GROOTFS_PYTHON_CLI": fs.NO_CLI,
        },
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == f"grootfs-shim: cannot run {fs.NO_CLI}: No such file or directory\n"


# -- helpers -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_proxies(env) -> dict[str, str]:
    return {
        k: v
        for k, v in env.items()
        if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    }


def test_forkers_warm_up_on_a_scratch_store_and_leave_nothing_behind(shim, tmp_path, dir_store):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    srv = fs.Server(tmp_path / "serve", env={**os.environ, "TMPDIR": str(scratch)}).start()
    try:
        log = srv.log()
        # Each forker ran the hot commands it is handed: the create forker 10 creates,
        # the lean one 10 stats and 11 deletes.
        assert '"commands":10' in log and '"commands":21' in log, log
        assert "warm-up-failed" not in log
        assert os.listdir(scratch) == []
        assert str(scratch) not in Path("/proc/self/mountinfo").read_text()
        assert run_shim(srv, "list", store=dir_store).stdout == "Store empty\n"
    finally:
        assert srv.stop() == 0


def test_a_warm_up_that_fails_costs_speed_only(shim, tmp_path, dir_store):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    srv = fs.Server(tmp_path / "serve", env={**os.environ, "TMPDIR": str(not_a_directory)}).start()
    try:
        assert srv.log().count(".serve.warm-up-failed") == 2, srv.log()
        tar = f.write_tarball(str(tmp_path / "t.tar"), [f.file("etc/x", b"x")])
        assert run_shim(srv, "create", tar, "c", store=dir_store).returncode == 0
        assert run_shim(srv, "delete", "c", store=dir_store).stdout == "Image c deleted\n"
    finally:
        assert srv.stop() == 0


def test_a_dead_forker_costs_speed_only_and_is_replaced(own_server, dir_store):
    forkers = fs.children_of(own_server.pid)
    assert len(forkers) == 2
    for forker in forkers:
        os.kill(forker, signal.SIGKILL)
    fs.wait_until(
        lambda: own_server.log().count('.serve.forker-died"') == 2, what="the deaths noticed"
    )
    # The server forks the commands itself meanwhile (the fallback points nowhere).
    listed = run_shim(own_server, "list", store=dir_store)
    assert (listed.returncode, listed.stdout) == (0, "Store empty\n")
    # Both are started again (RESTART_INTERVAL after the last start) and serve.
    fs.wait_until(lambda: own_server.log().count('.serve.forker-ready"') == 4, what="new forkers")
    assert len(fs.children_of(own_server.pid)) == 2
    assert run_shim(own_server, "list", store=dir_store).returncode == 0


# -- standbys -----------------------------------------------------------------------


def _ready_standbys(server: fs.Server, count: int) -> dict[int, int]:
    """Standby pid -> its forker, once *count* of them have prefaulted and wait."""
    fs.wait_until(
        lambda: [fs.comm(p) for p in server.standbys()].count(fs.STANDBY) == count,
        what=f"{count} standbys ready",
    )
    waiting = set(server.standbys())
    return {
        pid: forker
        for forker in fs.children_of(server.pid)
        for pid in fs.children_of(forker)
        if pid in waiting
    }


def _private_dirty_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError(f"no Private_Dirty for {pid}")


def test_a_standby_per_hot_command_takes_its_request_and_is_replaced(own_server, dir_store, proxy):
    # create in the create forker; stats and delete in the lean one.
    standbys = _ready_standbys(own_server, 3)
    assert sorted(collections.Counter(standbys.values()).values()) == [1, 2]
    shim = stalled_create(own_server, proxy, dir_store, seconds=2)
    [child] = own_server.children()
    assert child in standbys  # forked before the request came
    assert fs.comm(child) == fs.comm(standbys[child])  # named back as its forker is
    # Its replacement comes once it has exited (not beside it, slowing it).
    assert len(own_server.standbys()) == 2  # warming or waiting
    out, _ = shim.communicate(timeout=60)
    assert shim.returncode == 0, out
    fs.wait_until(lambda: not fs.alive(child), what="the command to exit")
    replaced = _ready_standbys(own_server, 3)
    assert child not in replaced and len(set(replaced) - set(standbys)) == 1
    assert replaced[next(iter(set(replaced) - set(standbys)))] == standbys[child]


def test_standbys_die_with_their_forker_and_running_commands_do_not(own_server, dir_store, proxy):
    shim = stalled_create(own_server, proxy, dir_store, seconds=2)
    [child] = own_server.children()
    standbys = _ready_standbys(own_server, 2)  # the create's replacement comes after it
    assert child not in standbys
    for forker in fs.children_of(own_server.pid):
        os.kill(forker, signal.SIGKILL)
    fs.wait_until(lambda: not any(map(fs.alive, standbys)), what="the standbys to die")
    out, _ = shim.communicate(timeout=60)
    assert shim.returncode == 0, out  # the command ran on and reported itself
    assert json.loads(out)["root"]["path"].endswith("/c/rootfs")


def test_a_standby_takes_copies_of_the_pages_its_command_wrote_before(
    own_server, dir_store, tmp_path
):
    tar = f.write_tarball(str(tmp_path / "stack.tar"), [f.directory("etc"), f.file("etc/x", b"x")])
    standbys = _ready_standbys(own_server, 3)
    create_forker = next(f for f in set(standbys.values()) if list(standbys.values()).count(f) == 1)
    [first] = [p for p, f in standbys.items() if f == create_forker]
    before = _private_dirty_kib(first)
    for i in range(2):  # the 1st and 2nd create report what they wrote
        # Each to a standby: one that comes right after a command's exit,
        # before its replacement is ready, gets a child forked on the spot.
        _ready_standbys(own_server, 3)
        created = run_shim(own_server, "create", tar, f"l{i}", store=dir_store)
        assert created.returncode == 0, created.stdout
    [learned] = [p for p, f in _ready_standbys(own_server, 3).items() if f == create_forker]
    # A create writes several hundred pages it shares with the forker.
    assert _private_dirty_kib(learned) - before > 1024, (before, _private_dirty_kib(learned))


# What a BOSH cell's config turns on: a log file, metrics, info-level lines.
_PRELOAD_CHECK = """
import contextlib, io, json, sys
from grootfs_py import cli, server
lean = sys.argv[1] == "lean"
server.preload(server._LEAN if lean else server._FULL, tls=not lean)
before = set(sys.modules)
with contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(sys.argv[2:])
print(json.dumps([code, sorted(set(sys.modules) - before)]))
"""


def test_the_forkers_preload_every_module_their_hot_commands_import(
    dir_store, tmp_path, open_registry
):
    tar = f.write_tarball(str(tmp_path / "stack.tar"), [f.directory("etc"), f.file("etc/x", b"x")])
    config = tmp_path / "cell.yml"
    config.write_text(
        json.dumps(
            {
                "store": dir_store,
                "log_level": "info",
                "log_file": str(tmp_path / "grootfs.log"),
                "metron_endpoint": f"127.0.0.1:{_free_port()}",
            }
        )
    )
    registry = open_registry.host
    docker = ["create", "--insecure-registry", registry, f"docker://{registry}/multi:v1"]
    for forker, args, code in [
        ("full", ["create", tar, "i"], 0),
        ("full", [*docker, "cold"], 0),  # pulls its layers
        ("full", [*docker, "warm"], 0),  # asks for its manifest only
        ("lean", ["delete", "cold"], 0),
        ("lean", ["delete", "warm"], 0),
        ("lean", ["stats", "i"], 0),
        ("lean", ["stats", "nope"], 1),
        ("lean", ["delete", "i"], 0),
        ("lean", ["list"], 0),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", _PRELOAD_CHECK, forker, "--config", str(config), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=True,
        )
        # Anything imported here is imported again by every child.
        assert json.loads(result.stdout) == [code, []], (args, result.stderr)
