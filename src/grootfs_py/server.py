"""``grootfs serve``: a resident fork server behind the native shim.

Why: a Python process costs ~10 ms before it runs a line of grootfs, as long
as GrootFS's whole warm create, and Garden runs the plugin ~20 times a second
on a busy cell. The server pays the interpreter start and every import once;
for each request it forks a child that runs exactly ``cli.main(argv)`` with
the caller's argv, environment, working directory, umask and standard
descriptors. Per-process semantics stay: each command is its own process
(flocks, crash safety, a killed child is a killed command), forked from the
pristine server, so nothing one request does is seen by the next. The accept
loop is single-threaded (forking a threaded process is unsafe) and the server
never runs a command itself.

Security: the socket's directory is the owner's alone (mode 0700, created so
or refused); every connection's SO_PEERCRED uid must be the server's own,
others are closed unanswered (their shim then runs the Python command, with
their own rights); the server runs nothing but ``cli.main``.

Wire protocol, version 1. Integers are unsigned 32-bit big-endian.

Shim -> server, once, on connecting::

    "GRFS"  version(=1)  umask  argc  length      (the 20-byte header)
    payload: length bytes = argc NUL-terminated arguments (without argv[0]),
             then NUL-terminated "NAME=value" environment entries

  The header's sendmsg carries SCM_RIGHTS with exactly four descriptors: the
  caller's stdin, stdout, stderr and its working directory (an O_PATH
  descriptor: the child fchdir()s to it, so a cwd whose path is unreachable
  or deleted is still the caller's). A request the server cannot take (bad
  magic or version, wrong descriptor count, over MAX_REQUEST bytes, another
  uid, not complete within REQUEST_TIMEOUT, the shim already gone, fork
  failing) is closed unanswered: the shim falls back to the Python command,
  which is always safe because nothing ran.

Server -> shim, 8-byte records "TAG" + value:

    "OKAY" pid    the child is forked: from here on the request is taken and
                  the shim must never fall back (the command may have run);
    "EXIT" code   the command exited with this status;
    "SIGN" signo  the command died of this signal.

  The child itself sends its "EXIT" as it exits, and the server sends "EXIT"
  or "SIGN" again when it reaps it; the shim acts on the first. A quick
  child's "EXIT" can come before "OKAY": any record means the request was
  taken. The child
  holds the connection open until it exits, so if the server dies mid-request
  (kill -9) the command still runs to its end and reports its own status.
  Only a child dying of a signal while the server is gone leaves the shim
  without a status: it then sees end-of-file after "OKAY" and fails (exit 1,
  one line on stdout) without falling back.

Shim -> server after "OKAY", 8-byte records:

    "KILL" signo  the shim got SIGINT, SIGTERM, SIGHUP or SIGQUIT: the server
                  forwards it to the child (so SIGINT unwinds a create and
                  exits 1, SIGTERM kills, exactly as for the Python command).

  End-of-file from the shim while its child runs (the shim was killed) makes
  the server SIGKILL the child: a killed plugin is a killed command, as when
  Garden kills the Python command, and the store's crash safety leaves
  nothing that ``clean`` cannot collect. SIGKILL rather than SIGTERM because
  the Python command never handled SIGTERM either (it dies at once), and
  nobody is left to read anything a dying command would print.

Shutdown: SIGTERM or SIGINT closes and removes the socket at once (new
shims fall back), then waits for the commands already running, reporting
each, and exits 0. A second signal exits without waiting; the children keep
running and report their own exit status.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import io
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from typing import Any

from grootfs_py import log
from grootfs_py.errors import InvalidArgumentError, StoreError

VERSION = 1
MAGIC = b"GRFS"
HEADER = struct.Struct(">4sIIII")  # magic, version, umask, argc, payload length
RECORD = struct.Struct(">4sI")  # tag, value
FDS = 4  # stdin, stdout, stderr, cwd
MAX_REQUEST = 1 << 20  # argv + environ; a cell's are a few kB
REQUEST_TIMEOUT = 5.0  # seconds a connected shim has to send its whole request
DEFAULT_SOCKET = "/var/vcap/sys/run/grootfs/grootfs.sock"
_FORWARDED = frozenset((signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT))
_PEERCRED = struct.Struct("3i")  # pid, uid, gid

# What any command may import, loaded once here so that no child pays for it.
# The release package (BOSH rendering) and __main__ are not commands' code.
_PRELOAD = (
    "grootfs_py.backing",
    "grootfs_py.checkstore",
    "grootfs_py.clean",
    "grootfs_py.compression",
    "grootfs_py.config",
    "grootfs_py.digest",
    "grootfs_py.fsutil",
    "grootfs_py.idmap",
    "grootfs_py.images",
    "grootfs_py.linux",
    "grootfs_py.locks",
    "grootfs_py.mounts",
    "grootfs_py.overlay",
    "grootfs_py.proc",
    "grootfs_py.quota",
    "grootfs_py.store",
    "grootfs_py.tarstream",
    "grootfs_py.unpack",
    "grootfs_py.volumes",
    "grootfs_py.sources",
    "grootfs_py.sources.manifest",
    "grootfs_py.sources.oci",
    "grootfs_py.sources.reference",
    "grootfs_py.sources.registry",
    "grootfs_py.sources.tarball",
    "grootfs_py.sources.transport",
    "argparse",
    "concurrent.futures",
    "concurrent.futures.thread",
    "ctypes",
    "gzip",
    "hashlib",
    "http.client",
    "json",
    "shutil",
    "ssl",
    "subprocess",
    "tempfile",
    "threading",
    "traceback",
    "yaml",
    "zlib",
)


def preload() -> None:
    """Import what commands use, and warm what is costly to build per process."""
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            # An optional accelerator missing only costs its child the import.
            log.info("preload: module not available", module=name, error=str(exc))
    from grootfs_py import cli, linux
    from grootfs_py.sources import transport

    linux._libc()  # dlopen once, not in every child
    cli.warm_parsers()
    transport.preload_default_context()


class _Conn:
    """One shim's connection: reading its request, then running its command."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.buffer = b""
        self.fds: list[int] = []
        self.pid = 0  # the child, once forked
        self.incoming = b""  # partial KILL records

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


class _Request:
    def __init__(self, umask: int, argv: list[str], env: dict[str, str]) -> None:
        self.umask = umask
        self.argv = argv
        self.env = env


def parse_request(data: bytes) -> _Request | None:
    """The request in *data* if it is whole and valid, None if more is needed.

    Raises ValueError for a request that can never become valid.
    """
    if len(data) < HEADER.size:
        if not MAGIC.startswith(data[:4]):
            raise ValueError("bad magic")
        return None
    magic, version, umask, argc, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("bad magic")
    if version != VERSION:
        raise ValueError(f"protocol version {version}, this server speaks {VERSION}")
    if length > MAX_REQUEST:
        raise ValueError(f"request of {length} bytes")
    if len(data) < HEADER.size + length:
        return None
    if len(data) > HEADER.size + length:
        raise ValueError("bytes after the request")
    payload = data[HEADER.size :]
    if length and not payload.endswith(b"\0"):
        raise ValueError("unterminated string")
    fields = [os.fsdecode(f) for f in payload[:-1].split(b"\0")] if length else []
    if argc > len(fields):
        raise ValueError("fewer strings than argc")
    env: dict[str, str] = {}
    for entry in fields[argc:]:
        name, sep, value = entry.partition("=")
        if sep and name and name not in env:  # getenv(3) takes the first one too
            env[name] = value
    return _Request(umask & 0o777, fields[:argc], env)


def encode_request(argv: list[str], env: dict[str, str], umask: int) -> bytes:
    """A request as the shim sends it (for tests and for Python callers)."""
    strings = [os.fsencode(a) for a in argv] + [os.fsencode(f"{k}={v}") for k, v in env.items()]
    payload = b"".join(s + b"\0" for s in strings)
    return HEADER.pack(MAGIC, VERSION, umask, len(argv), len(payload)) + payload


def _prepare_directory(directory: str) -> None:
    """Make *directory* the owner's alone, or refuse one that is not."""
    try:
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # mkdir's mode went through the umask
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"serve: socket directory {directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise StoreError(
            f"serve: socket directory {directory} belongs to uid {info.st_uid}, not {os.geteuid()}"
        )
    if info.st_mode & 0o077:
        raise StoreError(
            f"serve: socket directory {directory} has mode {stat.S_IMODE(info.st_mode):04o}, "
            "want 0700 (only its owner may enter it)"
        )


class Server:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.listener: socket.socket | None = None
        self.lock_fd = -1
        self.conns: dict[int, _Conn] = {}  # by socket fd
        self.children: dict[int, _Conn] = {}  # by pid
        self.stopping = 0  # signals received
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- setup and teardown -------------------------------------------------

    def open(self) -> None:
        if not os.path.basename(self.path):
            raise InvalidArgumentError("invalid argument: --socket needs a file path")
        directory = os.path.dirname(self.path)
        _prepare_directory(directory)
        # The lock proves no live server owns the socket, so one left there
        # (a server that was killed) is stale and replaced.
        self.lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"serve: another server is running on {self.path}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)  # the directory already keeps others out; twice is cheap
        listener.listen(128)
        self.listener = listener

    def close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            # Only our own socket: a server started after us may own the path now.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # -- the loop -----------------------------------------------------------

    def run(self) -> None:
        _ensure_standard_fds()
        self.open()
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        log.info("serving", socket=self.path, pid=os.getpid(), protocol=VERSION)
        try:
            self._loop()
        finally:
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close_listener()
            for conn in list(self.conns.values()):
                conn.close()
            os.close(self.lock_fd)
            os.close(self.wake_r)
            os.close(self.wake_w)
            log.info("stopped", socket=self.path, left_running=len(self.children))

    def _on_signal(self, signo: int, frame: Any) -> None:
        if signo != signal.SIGCHLD:
            self.stopping += 1

    def _loop(self) -> None:
        poller = select.poll()
        registered: set[int] = set()
        while True:
            if self.stopping and self.listener is not None:
                log.info("stopping: no new requests", running=len(self.children))
                self.close_listener()
            if self.stopping > 1 or (self.stopping and not self.children):
                return
            wanted = {self.wake_r: select.POLLIN}
            if self.listener is not None:
                wanted[self.listener.fileno()] = select.POLLIN
            for fd in self.conns:
                wanted[fd] = select.POLLIN
            for fd in registered - wanted.keys():
                poller.unregister(fd)
            for fd, mask in wanted.items():
                poller.register(fd, mask)
            registered = set(wanted)
            now = time.monotonic()
            deadlines = [c.deadline for c in self.conns.values() if not c.pid]
            timeout = max(0, int((min(deadlines) - now) * 1000) + 1) if deadlines else None
            for fd, events in poller.poll(timeout):
                if fd == self.wake_r:
                    _drain(self.wake_r)
                elif self.listener is not None and fd == self.listener.fileno():
                    self._accept()
                elif fd in self.conns:
                    self._readable(self.conns[fd], events)
            self._reap()
            now = time.monotonic()
            for conn in [c for c in self.conns.values() if not c.pid and c.deadline < now]:
                log.info("request not received in time: dropped")
                self._drop(conn)

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again next round
                log.error("accept", error=str(exc))
                return
            sock.setblocking(False)
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != os.geteuid():
                log.info("refused a caller of another uid", peer_pid=pid, peer_uid=uid)
                sock.close()
                continue
            self.conns[sock.fileno()] = _Conn(sock)

    def _readable(self, conn: _Conn, events: int) -> None:
        if conn.pid:
            self._from_running(conn)
            return
        try:
            data, ancdata, _flags, _addr = conn.sock.recvmsg(
                65536, socket.CMSG_SPACE(FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("request read failed: dropped", error=str(exc))
            self._drop(conn)
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
                conn.fds.extend(fds)
        if not data:
            self._drop(conn)  # the shim gave up before sending it all
            return
        conn.buffer += data
        try:
            request = parse_request(conn.buffer)
        except ValueError as exc:
            log.info("bad request: dropped", error=str(exc))
            self._drop(conn)
            return
        if request is None:
            return
        if len(conn.fds) != FDS:
            log.info("bad request: dropped", error=f"{len(conn.fds)} descriptors, want {FDS}")
            self._drop(conn)
            return
        self._start(conn, request)

    def _start(self, conn: _Conn, request: _Request) -> None:
        # A shim that timed out waiting and fell back has closed its end: its
        # request must not run a second time.
        if _peer_gone(conn.sock):
            self._drop(conn)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        # Everything alive now moves out of the collector's reach, so a child's
        # collections do not write to (and so copy) the server's pages.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("fork failed: the shim falls back", error=str(exc))
            self._drop(conn)
            return
        if pid == 0:
            self._child(conn, request)  # never returns
        for fd in conn.fds:
            os.close(fd)
        conn.fds = []
        conn.pid = pid
        self.children[pid] = conn
        _send(conn.sock, b"OKAY", pid)

    def _child(self, conn: _Conn, request: _Request) -> None:
        code = 1
        try:
            code = self._prepare_child(conn, request)
            if code == 0:
                code = _run_command(request.argv)
            _send(conn.sock, b"EXIT", code)
        finally:
            os._exit(code)

    def _prepare_child(self, conn: _Conn, request: _Request) -> int:
        stdin, stdout, stderr, cwd = conn.fds
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.close()
        log.configure("info")
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        try:
            os.fchdir(cwd)
        except OSError as exc:
            os.write(2, f"grootfs: cannot enter the working directory: {exc}\n".encode())
            return 1
        # Only 0, 1, 2 and this request's connection stay open: no other
        # request's descriptors, no listener, no lock. The Python objects that
        # owned them give them up first so no finalizer closes a reused number.
        if conn.sock.fileno() != 3:
            os.dup2(conn.sock.fileno(), 3, inheritable=False)
        if self.listener is not None:
            self.listener.detach()
        for other in self.conns.values():
            other.sock.detach()
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
        conn.sock = socket.socket(fileno=3)
        os.umask(request.umask)
        os.environ.clear()
        os.environ.update(request.env)
        sys.argv = ["grootfs", *request.argv]
        _reopen_stdio()
        return 0

    def _from_running(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The shim is gone: killed (then so is its command), or done
            # because the child already sent its status (then the kill only
            # meets a process that is exiting, so it is logged at debug).
            log.debug("caller closed its connection: SIGKILL to its command", child=conn.pid)
            _kill(conn.pid, signal.SIGKILL)
            self._forget(conn)
            return
        conn.incoming += data
        while len(conn.incoming) >= RECORD.size:
            tag, value = RECORD.unpack_from(conn.incoming)
            conn.incoming = conn.incoming[RECORD.size :]
            if tag == b"KILL" and value in _FORWARDED:
                _kill(conn.pid, value)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            if os.WIFSIGNALED(status):
                _send(conn.sock, b"SIGN", os.WTERMSIG(status))
            else:
                _send(conn.sock, b"EXIT", os.waitstatus_to_exitcode(status))
            self.conns.pop(conn.sock.fileno(), None)
            conn.close()

    def _forget(self, conn: _Conn) -> None:
        """Stop watching *conn*; its child, if any, is still reaped and not reported."""
        self.conns.pop(conn.sock.fileno(), None)
        if conn.pid:
            # Reaped later by _reap; nobody to report to.
            conn.sock.close()
            conn.sock = _closed_socket()
        else:
            conn.close()

    def _drop(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        conn.close()


def _closed_socket() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.close()
    return s


def _run_command(argv: list[str]) -> int:
    """``cli.main(argv)``, ending as the interpreter would end a ``grootfs`` process."""
    from grootfs_py import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
    except OSError:
        code = code or 120  # what CPython exits with when stdout cannot be flushed
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    return code


def _reopen_stdio() -> None:
    """New sys.std* on descriptors 0-2, buffered as a fresh interpreter would buffer them."""
    streams = []
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        new = io.TextIOWrapper(
            buffered,
            encoding=getattr(old, "encoding", None) or "utf-8",
            errors=getattr(old, "errors", None) or "strict",
            line_buffering=fd == 2 or (fd == 1 and os.isatty(1)),
        )
        streams.append((name, new))
    for name, new in streams:
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)
    log.close()  # log writes to the new sys.stderr


def _ensure_standard_fds() -> None:
    # A server started with 0, 1 or 2 closed would hand those numbers to a
    # socket that a child's dup2 would then overwrite.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _peer_gone(sock: socket.socket) -> bool:
    p = select.poll()
    p.register(sock.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in p.poll(0))


def _send(sock: socket.socket, tag: bytes, value: int) -> None:
    # A shim that is gone cannot be told; its command is reaped all the same.
    with contextlib.suppress(OSError):
        sock.send(RECORD.pack(tag, value & 0xFFFFFFFF), socket.MSG_NOSIGNAL)


def _kill(pid: int, signo: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signo)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            raise


def serve(path: str) -> None:
    preload()
    Server(path).run()
