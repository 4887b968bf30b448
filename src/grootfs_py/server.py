"""``grootfs serve``: a resident fork server behind the native shim.

Why: a Python process costs ~10 ms before it runs a line of grootfs, as long
as GrootFS's whole warm create, and Garden runs the plugin ~20 times a second
on a busy cell. The server pays the interpreter start and every import once;
for each request it forks a child that runs exactly ``cli.main(argv)`` with
the caller's argv, environment, working directory, umask and standard
descriptors. Per-process semantics stay: each command is its own process
(flocks, crash safety, a killed child is a killed command), forked from a
pristine process, so nothing one request does is seen by the next. Every
loop is single-threaded (forking a threaded process is unsafe) and no
server process runs a command itself.

Processes: the server (accepting, checking, reading requests, watching the
shims, reporting) never forks a command in the normal case. At start it
forks two "forkers" that import what their commands need and then do
nothing but fork them: one for ``create`` with everything (registry, TLS
with the system CAs loaded, decompressors), a lean one for the rest
(``stats``, ``delete``...), whose smaller heap makes each fork and exit
cheaper. The server hands a forker each request with its descriptors over
a SOCK_SEQPACKET pair; the forker forks, answers the shim "OKAY", tells the
server the pid, reaps the child and reports its status, and forwards the
signals the server asks for (it alone can, being the parent that has not
reaped it yet, so a pid is never reused under a kill). Forking from the
server itself would make every fork copy (and every loop touch, copy-on-
write) the pages the server is busy with. A forker that dies is started
again; until then, or when a request does not fit a message, the server
forks the command itself (it then imports lazily, as the Python command).
For create, stats and delete a forker keeps a standby child forked ahead of
the request and prefaulted (see _ForkerLoop), so the fork and most of the
copy-on-write faults are off the request's path.

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
  taken. The child holds the connection open until it exits, so if the server dies mid-request
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
from collections.abc import Iterator, Sequence
from typing import Any

from grootfs_py import linux, log, prefault
from grootfs_py.errors import InvalidArgumentError, StoreError
from grootfs_py.prefault import Run

VERSION = 1
MAGIC = b"GRFS"
HEADER = struct.Struct(">4sIIII")  # magic, version, umask, argc, payload length
RECORD = struct.Struct(">4sI")  # tag, value
CONTROL = struct.Struct(">4sqi")  # server <-> forker: tag, token or pid, pid or value
COMMAND = struct.Struct("16s")  # server -> forker, after a RUN's CONTROL: the command's name
FDS = 4  # stdin, stdout, stderr, cwd
MAX_REQUEST = 1 << 20  # argv + environ; a cell's are a few kB
REQUEST_TIMEOUT = 5.0  # seconds a connected shim has to send its whole request
RESTART_INTERVAL = 2.0  # a forker that died is started again at most this often
LEARN_UNTIL = 1 << 16  # a kind's n-th standby learns while n is a power of two up to this
# How often a forker runs each hot command on a scratch store before its first
# fork: CPython 3.11 quickens a function after 8 calls (see _warm_up).
WARM_UP_RUNS = 10
# A standby's name (/proc/<pid>/comm, what ps shows) while it prefaults, then
# while it waits; as it takes a request it takes back the command's name.
WARMING_NAME = "grootfs-warming"
STANDBY_NAME = "grootfs-standby"
_REPORT_FD = 4  # a standby's socket to its forker, kept there for a learning command
DEFAULT_SOCKET = "/var/vcap/sys/run/grootfs/grootfs.sock"
_FORWARDED = frozenset((signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT))
_PEERCRED = struct.Struct("3i")  # pid, uid, gid

# What the lean forker's commands (all but create) import.
_LEAN = (
    "grootfs_py.config",
    "grootfs_py.digest",
    "grootfs_py.fsutil",
    "grootfs_py.idmap",
    "grootfs_py.images",
    "grootfs_py.jsonload",
    "grootfs_py.linux",
    "grootfs_py.locks",
    "grootfs_py.mounts",
    "grootfs_py.overlay",
    "grootfs_py.settle",
    "grootfs_py.store",
    "grootfs_py.usage",  # metrics after a delete (and a create)
    "grootfs_py.volumes",
    "argparse",
    "ctypes",
    "hashlib",
    "json",
    "shutil",
)
# What any command may import, for the create forker. The release package
# (BOSH rendering) and __main__ are not commands' code.
_FULL = (
    *_LEAN,
    "grootfs_py.backing",
    "grootfs_py.checkstore",
    "grootfs_py.clean",
    "grootfs_py.compression",
    "grootfs_py.proc",
    "grootfs_py.quota",
    "grootfs_py.tarstream",
    "grootfs_py.unpack",
    "grootfs_py.sources",
    "grootfs_py.sources.manifest",
    "grootfs_py.sources.oci",
    "grootfs_py.sources.reference",
    "grootfs_py.sources.registry",
    "grootfs_py.sources.tarball",
    "grootfs_py.sources.transport",
    "concurrent.futures",
    "concurrent.futures.thread",
    "encodings.idna",  # getaddrinfo of a registry's host name encodes it so
    "gzip",
    "http.client",
    "isal.igzip_threaded",  # gzip layers (compression)
    "ssl",
    "subprocess",
    "tempfile",
    "threading",
    "traceback",
    "yaml",
    "zlib",
    "zstandard",
)


def preload(modules: Sequence[str], tls: bool) -> None:
    """Import *modules*, and warm what is costly to build per process."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            # An optional accelerator missing only costs its child the import.
            log.info("preload: module not available", module=name, error=str(exc))
    from grootfs_py import cli, linux

    linux._libc()  # dlopen once, not in every child
    cli.warm_parsers()
    # What every child runs on its request, quickened here (see _warm_up):
    # parsing it, and taking its environment (this one's, so nothing changes).
    sample = encode_request(["--config", "c", "stats", "x"], dict(os.environ), 0o022)
    for _ in range(WARM_UP_RUNS):
        parse_request(sample)
        _replace_environ(dict(os.environ))
    if tls:
        from grootfs_py.sources import transport

        transport.preload_default_context()


def _warm_up(*, creates: bool) -> None:
    """Run the hot commands a few times on a throwaway store, before the first fork.

    CPython 3.11 rewrites a function's bytecode for speed (quickens it) after
    8 calls, then specializes its instructions as they run. A command's code
    runs once in each child, which never gets there: it runs the generic
    instructions, and writes to the code objects as it counts calls (copy-on-
    write). Run here, the children inherit the specialized code. Measured on
    forked children of a preloaded process, without standbys: create 3.3 ->
    2.3 ms, stats 1.3 -> 0.9 ms, delete 2.3 -> 1.6 ms, a quarter fewer faults.

    The store is a plain directory under $TMPDIR, removed at once with its
    log; nothing is mounted or measured. What the runs leave in this process is code
    and caches of pure functions (parsed tar fields, log event names): each
    request's child still reads its own config and store afresh. A helper
    child makes the store, the tar and the images this forker does not
    create itself, so the forker imports nothing it would not anyway (the
    lean one never loads the unpacker). Root only (another user's store
    needs id mappings); a failure costs only the speed.
    """
    if os.geteuid() != 0:
        return
    import json
    import shutil

    from grootfs_py import cli

    level, path, session = log.snapshot()
    scratch = os.path.join(
        os.environ.get("TMPDIR") or "/tmp",
        f"grootfs-warm-up-{os.getpid()}-{os.urandom(4).hex()}",
    )
    tar = os.path.join(scratch, "rootfs.tar")
    ids = [f"warm-up-{i}" for i in range(WARM_UP_RUNS + 1)]
    # Only the commands this forker is handed: the server sends it create
    # alone, or everything but create. ids[0] is made by the helper, which
    # unpacks the layer, so the creates here are warm; the images are left to
    # the scratch store's removal.
    if creates:
        runs = [["create", tar, i] for i in ids[1:]]
    else:
        runs = [["stats", i] for i in ids[1:]] + [["delete", i] for i in ids]
    try:
        os.mkdir(scratch, 0o700)
        config = os.path.join(scratch, "config.json")
        with open(config, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "store": os.path.join(scratch, "store"),
                    "log_level": "fatal",
                    "log_file": os.path.join(scratch, "log"),
                    "create": {"without_mount": True},
                },
                f,
            )
        base = ["--config", config]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _prepare_warm_up(base, tar, ids if not creates else ids[:1])
            finally:
                os._exit(code)
        if os.waitpid(pid, 0)[1] != 0:
            raise RuntimeError("preparing the scratch store failed")
        with contextlib.redirect_stdout(io.StringIO()):
            failed = sum(cli.main([*base, *args]) != 0 for args in runs)
        if failed:
            raise RuntimeError(f"{failed} of {len(runs)} commands failed")
    except Exception as exc:
        error = str(exc) or type(exc).__name__
    else:
        error = ""
    finally:
        # The commands logged to the scratch store's file: this process's own log again.
        log.configure(level, path, **session)
        shutil.rmtree(scratch, ignore_errors=True)
    if error:
        log.info("warm-up failed; commands run unwarmed", error=error)
    else:
        log.info("forker warmed up", commands=len(runs))


def _prepare_warm_up(base: list[str], tar: str, ids: Sequence[str]) -> int:
    """In a child: the warm-up's store, a small stack tar, and images *ids* from it."""
    import tarfile

    from grootfs_py import cli

    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in (("etc", None), ("etc/hostname", b"warm-up\n"), ("bin", None)):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    with contextlib.redirect_stdout(io.StringIO()):
        if cli.main([*base, "init-store"]) != 0:
            return 1
        return max((cli.main([*base, "create", tar, i]) for i in ids), default=0)


class _Request:
    def __init__(self, umask: int, argv: list[str], env: dict[str, str]) -> None:
        self.umask = umask
        self.argv = argv
        self.env = env


def parse_request(data: bytes, *, environment: bool = True) -> _Request | None:
    """The request in *data* if it is whole and valid, None if more is needed.

    Raises ValueError for a request that can never become valid. Without
    *environment* its env is left empty: the server needs only argv, and no
    environment entry can make a request invalid (one without "=" is skipped).
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
    raw = payload[:-1].split(b"\0") if length else []
    if argc > len(raw):
        raise ValueError("fewer strings than argc")
    fields = [os.fsdecode(f) for f in (raw if environment else raw[:argc])]
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


# -- the command's process -------------------------------------------------------


def _become_command(
    conn: int,
    fds: Sequence[int],
    data: bytes,
    learning: bool = False,
    standby: bool = False,
) -> None:
    """In a freshly forked child: take the caller's place, run the command, exit.

    The request is parsed here, already checked by the server: what a forker
    does between forks it does for every request, copy-on-write. A
    *learning* child, its command done, says "L" to its forker on its standby
    socket and waits for its answer: the forker reads which pages the command
    wrote from outside, so that its next standbys take their copies ahead of
    their requests.
    """
    code = 1
    try:
        request = parse_request(data)
        assert request is not None
        code = _take_callers_place(conn, fds, request, keep_report=learning, left=standby)
        if code == 0:
            code = _run_command(request.argv)
        if learning:
            # Before "EXIT": once its shim has the status, the server kills
            # whatever is left of the command. End of file (the forker is
            # gone) is an answer too.
            with contextlib.suppress(OSError):
                os.write(_REPORT_FD, b"L")
                os.read(_REPORT_FD, 1)
        _send_fd(3, b"EXIT", code)
    finally:
        os._exit(code)


def _leave_the_forker() -> None:
    """Undo what a forker set up for itself, as every command's process must.

    A standby does it before its request comes, a child forked on the spot
    after. SIGINT stays ignored until the request: a standby must not die of
    a ^C meant for its server.
    """
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    log.close()
    log.configure("info")


def _take_callers_place(
    conn: int, fds: Sequence[int], request: _Request, keep_report: bool, left: bool
) -> int:
    stdin, stdout, stderr, cwd = fds
    if not left:
        _leave_the_forker()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cwd_error = None
    try:
        os.fchdir(cwd)
    except OSError as exc:
        cwd_error = exc
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    # Only 0, 1, 2, this request's connection (as 3) and a standby's report
    # socket (already at 4) stay open: no other request's descriptors, no
    # listener, no lock. The forking process gave up its socket objects'
    # descriptors (detach) so that no finalizer closes a number this process
    # reuses.
    if conn != 3:
        os.dup2(conn, 3, inheritable=False)
    os.closerange(_REPORT_FD + 1 if keep_report else _REPORT_FD, os.sysconf("SC_OPEN_MAX"))
    if cwd_error is not None:
        os.write(2, f"grootfs: cannot enter the working directory: {cwd_error}\n".encode())
        return 1
    os.umask(request.umask)
    _replace_environ(request.env)
    sys.argv = ["grootfs", *request.argv]
    if sys.stdin is None or sys.stdout is None or sys.stderr is None:
        _reopen_stdio()  # the server started without them
    else:
        # The server's streams, flushed before the fork, now write to the
        # caller's descriptors; stdout is line-buffered on a terminal only,
        # as a fresh interpreter's would be.
        sys.stdout.reconfigure(line_buffering=os.isatty(1))  # type: ignore[union-attr]
        log.close()  # log writes to sys.stderr as it is now
    return 0


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


def _replace_environ(env: dict[str, str]) -> None:
    """Make os.environ (and the C environment) *env*, touching only what differs.

    Cheaper than clear() and update(): a caller's environment is mostly the
    server's.
    """
    for name in [name for name in os.environ if name not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


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


def _fork_command(conn: int, fds: Sequence[int], data: bytes, detach: list[Any]) -> int:
    """Fork the command's process; return its pid (raises OSError)."""
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything alive now moves out of the collector's reach, so a child's
    # collections do not write to (and so copy) the forking process's pages.
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        for sock in detach:
            sock.detach()
        _become_command(conn, fds, data)  # never returns
    return pid


# -- the forkers -------------------------------------------------------------------


def _forker(ctl: socket.socket, modules: Sequence[str], tls: bool, kinds: Sequence[str]) -> None:
    """A forker's life: import, then fork a command for each request the server hands over."""
    code = 0
    try:
        # Signals for the server are not for us: our commands must be reaped
        # and reported until the server closes our socket.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda signo, frame: None)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        preload(modules, tls)
        _warm_up(creates="create" in kinds)
        ctl.send(CONTROL.pack(b"REDY", 0, os.getpid()))
        _ForkerLoop(ctl, wake_r, kinds).run()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


class _ForkerLoop:
    """A forker between requests, keeping a standby child for each of *kinds*.

    A standby is forked from this pristine process before its request comes,
    takes its copy-on-write copies of the pages its command wrote in earlier
    runs (prefault), and waits; the server is sent a copy of its socket
    ("STBY") and hands it a request itself, and the request runs at once,
    without waking this forker (a hop of ~0.15-0.25 ms on 2 CPUs, mostly
    this forker's Python and its copy-on-write faults on pages the last
    fork shared). The standby says "T" on its socket as it takes the
    request; the forker reads it when it reaps the standby. The
    next standby of its kind is forked when that command has exited: forked
    beside it, its fork and copies slowed the command down (on 2 CPUs, median
    delete 7.1 -> 5.1 ms, create 5.6 -> 4.9 ms when deferred). A request
    that comes meanwhile is forked on the spot. It is still one fresh process per
    request, forked from a process no request has touched. One per command
    (create; stats; delete), because each writes its own pages, and a copy
    taken for nothing costs as much CPU as a fault. A standby dies with its
    forker (PR_SET_PDEATHSIG) until it takes a request; from then on it is a
    command like any other and outlives it. Other commands, and a kind
    whose standby is not there (at start, one that died, or one still to
    come), get their child forked on the spot; a kind with no standby and
    none to come gets one forked behind that child at once.
    """

    def __init__(self, ctl: socket.socket, wake_r: int, kinds: Sequence[str]) -> None:
        self.ctl = ctl
        self.wake_r = wake_r
        self.kinds = frozenset(kinds)
        self.live: set[int] = set()  # commands not reaped yet
        self.learned: dict[str, prefault.Plan] = {}  # by command: what its standby prefaults
        self.last_report: dict[str, list[Run]] = {}  # by command: the latest learning's
        self.served: dict[str, int] = {}  # by command: requests its standbys took
        # The learning standbys, by their socket's fd: each says "L" on it when done.
        self.reports: dict[int, _Lesson] = {}
        self.taken: set[int] = set()  # standbys that said they took a request
        self.standbys: dict[str, tuple[int, socket.socket]] = {}  # pid, socket
        self.poller = select.poll()
        self.name = _own_name()
        # For the server's messages and the standbys' requests (they inherit
        # it): recvmsg() of a buffer this size maps and unmaps one each time
        # (~14 us), and a fresh bytearray is zeroed, every page written.
        self.buffer = bytearray(CONTROL.size + COMMAND.size + HEADER.size + MAX_REQUEST)

    def run(self) -> None:
        self.poller.register(self.ctl.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        for kind in sorted(self.kinds):
            self._spawn_standby(kind)
        while True:
            for fd, _events in self.poller.poll():
                if fd == self.wake_r:
                    _drain(self.wake_r)
                elif fd in self.reports:
                    self._from_standby(fd)
                elif not self._message():
                    return  # the server is gone or done: our commands report themselves
            self._reap()

    def _reap(self) -> None:
        for pid, status in _reaped():
            for kind, (standby, sock) in list(self.standbys.items()):
                if pid == standby:
                    del self.standbys[kind]
                    self._standby_done(kind, pid, sock, status)
            if pid in self.live:
                self.live.discard(pid)
                with contextlib.suppress(OSError):
                    self.ctl.send(CONTROL.pack(b"DONE", pid, status))

    def _standby_done(self, kind: str, pid: int, sock: socket.socket, status: int) -> None:
        """A standby has exited: its command's, when the server had handed it a request.

        Such a standby said so on its socket ("T") before it became the
        command; one that died waiting did not, and is not replaced until a
        request forks its own (a standby that died at once must not be
        forked again and again).
        """
        if sock.fileno() in self.reports:
            self._from_standby(sock.fileno())  # "T" and the report, whatever is left
        else:
            self._read_standby(sock, pid)
        sock.close()
        # Either way: the server may have handed it a request.
        with contextlib.suppress(OSError):
            self.ctl.send(CONTROL.pack(b"DONE", pid, status))
        if pid not in self.taken:
            return
        self.taken.discard(pid)
        self.served[kind] = self.served.get(kind, 0) + 1
        if kind not in self.standbys:
            self._spawn_standby(kind)

    def _message(self) -> bool:
        """Act on one message from the server; False when it has closed the pair."""
        try:
            size, ancdata, _flags, _addr = self.ctl.recvmsg_into(
                [self.buffer], socket.CMSG_SPACE((FDS + 1) * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return True
        data = bytes(memoryview(self.buffer)[:size])
        fds = _received_fds(ancdata)
        if not data:
            return False
        tag, a, b = CONTROL.unpack_from(data)
        if tag == b"KILL":
            # Not reaped yet, so the pid is still this command's: one of our
            # children, or a standby the server handed a request (only those
            # does it ask to kill).
            if a in self.live or any(a == pid for pid, _s in self.standbys.values()):
                _kill(a, b)
            return True
        if tag != b"RUN " or len(fds) != FDS + 1 or len(data) < CONTROL.size + COMMAND.size:
            for fd in fds:
                os.close(fd)
            return True
        (raw,) = COMMAND.unpack_from(data, CONTROL.size)
        command = raw.rstrip(b"\0").decode("ascii", "replace")
        conn = fds[0]
        try:
            if _peer_gone(conn):  # its shim fell back while we were busy
                raise OSError(errno.ECONNRESET, "caller gone")
            # Standbys are the server's to hand requests to ("STBY"): one it
            # was told of may be its command already, so a request that
            # reaches us (the server had none waiting) gets a child of its own.
            request = data[CONTROL.size + COMMAND.size :]
            pid = _fork_command(fds[0], fds[1:], request, self._sockets())
        except OSError as exc:
            log.info("forker: request not started", error=str(exc))
            with contextlib.suppress(OSError):
                self.ctl.send(CONTROL.pack(b"FAIL", a, 0))
        else:
            self.live.add(pid)
            with contextlib.suppress(OSError):
                self.ctl.send(CONTROL.pack(b"STRT", a, pid))
            _send_fd(conn, b"OKAY", pid)
        finally:
            for fd in fds:
                os.close(fd)
        if command in self.kinds and command not in self.standbys:
            self._spawn_standby(command)  # none, and none to come: one behind this child
        return True

    def _read_standby(self, sock: socket.socket, pid: int) -> bytes | None:
        """What a standby has said: "T" as it took a request (noted in :attr:`taken`), then
        a learning one's "L". That "L" (b"" if none will come); None while one may."""
        while True:
            try:
                message = sock.recv(16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return b""
            if message != b"T":
                return message
            self.taken.add(pid)

    def _from_standby(self, fd: int) -> None:
        """Read a learning standby's socket; once its command is done, learn what it wrote.

        The command waits for our answer ("G") before it exits and reports
        its status, so the scan (~1 ms, 1 in 2^n requests) is on its caller's path.
        """
        lesson = self.reports[fd]
        said = self._read_standby(lesson.sock, lesson.pid)
        if said is None:
            return  # still running
        del self.reports[fd]
        self.poller.unregister(fd)
        if said == b"L":
            self._learn(lesson.command, prefault.written(lesson.pid, lesson.maps, lesson.before))
            with contextlib.suppress(OSError):
                lesson.sock.send(b"G")
        lesson.sock.close()

    def _learn(self, command: str, runs: list[Run] | None) -> None:
        if runs:  # none from a command that died first: the last report stands
            # The last two runs: two kinds of request (a stack tar and a
            # docker:// create) are both covered, and what a one-off wrote
            # (a create that unpacked a layer) is dropped two learnings on.
            previous = self.last_report.get(command, [])
            self.learned[command] = prefault.Plan(prefault.union(previous, runs))
            self.last_report[command] = runs

    def _sockets(self) -> list[socket.socket]:
        found = [self.ctl]
        found += [lesson.sock for lesson in self.reports.values()]
        found += [sock for _pid, sock in self.standbys.values()]
        return found

    def _spawn_standby(self, command: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        detach = [*self._sockets(), ours]
        # The n-th standby of a kind learns while n is a power of two: every
        # kind is learned at once, and again now and then, at a fading cost.
        # A learning standby prefaults nothing: what it copied would be
        # learned again, forever.
        n = self.served.get(command, 0) + 1
        learns = n & (n - 1) == 0 and n <= LEARN_UNTIL
        plan = None if learns else self.learned.get(command)
        maps = prefault.own_mappings() if learns else []
        before: list[bytes] = []
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()
        # Named before the fork, so that no one ever sees it as a command.
        linux.set_process_name(WARMING_NAME)
        if learns:
            before = prefault.snapshot(maps)  # as late as can be: our writes since count as its
        try:
            pid = os.fork()
        except OSError as exc:
            linux.set_process_name(self.name)
            log.error("forker: no standby", command=command, error=str(exc))
            ours.close()
            theirs.close()
            return
        if pid == 0:
            _standby(theirs, plan, detach, self.name, learns, self.buffer)
        linux.set_process_name(self.name)
        theirs.close()
        self.standbys[command] = (pid, ours)
        if learns:
            self.reports[ours.fileno()] = _Lesson(command, ours, pid, maps, before)
            self.poller.register(ours.fileno(), select.POLLIN)
        # The server sends its request itself, through a copy of our end.
        with contextlib.suppress(OSError):
            self.ctl.sendmsg(
                [CONTROL.pack(b"STBY", pid, 0) + COMMAND.pack(command.encode())],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", ours.fileno()))],
            )


class _Lesson:
    """A learning standby: its command, socket and pid, and our pages as it was forked."""

    def __init__(
        self, command: str, sock: socket.socket, pid: int, maps: list[Run], before: list[bytes]
    ) -> None:
        self.command = command
        self.sock = sock
        self.pid = pid
        self.maps = maps  # our private writable mappings, which it inherited
        self.before = before  # their pagemap entries (prefault.snapshot)


def _own_name() -> str:
    with open("/proc/self/comm") as f:
        return f.read().rstrip("\n")


def _standby(
    sock: socket.socket,
    plan: prefault.Plan | None,
    detach: Sequence[socket.socket],
    name: str,
    learns: bool,
    buffer: bytearray,
) -> None:
    """A standby child: prefault, wait for one request, then become its command (*name*).

    The copies come first, so that what the standby itself writes next is
    copied in the same call, not a fault at a time. The request is
    received into *buffer*, the forker's, inherited: only the pages it
    fills are copied.
    """
    code = 0
    try:
        forker = os.getppid()
        if plan is not None:
            plan.populate()
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != forker:
            return  # it died before the line above could take effect
        _leave_the_forker()
        for other in detach:
            other.detach()
        fd = sock.detach()
        if fd != _REPORT_FD:
            os.dup2(fd, _REPORT_FD, inheritable=False)
            os.close(fd)
        os.closerange(3, _REPORT_FD)
        os.closerange(_REPORT_FD + 1, os.sysconf("SC_OPEN_MAX"))
        linux.set_process_name(STANDBY_NAME)
        sock = socket.socket(fileno=_REPORT_FD)
        size, ancdata, _flags, _addr = sock.recvmsg_into(
            [buffer], socket.CMSG_SPACE((FDS + 1) * 4), socket.MSG_CMSG_CLOEXEC
        )
        data = bytes(memoryview(buffer)[:size])
        if data:
            # For the forker, when it reaps us: we were a command, not a
            # standby that died waiting (a learning one reads it at once).
            with contextlib.suppress(OSError):
                sock.send(b"T")
        # A command is not killed with its forker: it reports itself.
        linux.set_parent_death_signal(0)
        linux.set_process_name(name)
        fds = _received_fds(ancdata)
        sock.detach()
        if not data or len(fds) != FDS + 1:
            return  # the forker is done (end of file)
        _become_command(fds[0], fds[1:], data, learns, standby=True)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


class _Forker:
    """The server's side of one forker process."""

    def __init__(
        self, name: str, modules: Sequence[str], tls: bool, standbys: Sequence[str]
    ) -> None:
        self.name = name
        self.modules = modules
        self.tls = tls
        self.standbys = standbys  # the commands it keeps a standby child for
        self.pid = 0
        self.ctl: socket.socket | None = None
        self.started = 0.0
        self.ready = False  # done importing: until then the server forks itself
        self.pending: dict[int, _Conn] = {}  # token -> handed over, not started yet
        self.running: dict[int, _Conn] = {}  # pid -> its connection
        # command -> (pid, socket) of a standby of its that waits for a request:
        # the server sends it one itself, one hop fewer than through the forker.
        self.idle: dict[str, tuple[int, socket.socket]] = {}

    def forget_standbys(self) -> None:
        for _pid, sock in self.idle.values():
            sock.close()
        self.idle.clear()

    def start(self, detach: list[Any]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.started = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            # The server's log file is closed below with every other
            # descriptor: a forker's rare lines go to stderr.
            log.close()
            ours.detach()
            for sock in detach:
                sock.detach()
            keep = theirs.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            _forker(theirs, self.modules, self.tls, self.standbys)  # never returns
        theirs.close()
        ours.setblocking(False)
        self.pid, self.ctl, self.ready = pid, ours, False
        log.info("forker started", forker=self.name, pid=pid)


class _Conn:
    """One shim's connection: reading its request, then running its command."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.buffer = b""
        self.fds: list[int] = []
        self.pid = 0  # the command, once forked
        self.forker: _Forker | None = None  # who forked it (None: the server)
        self.incoming = b""  # partial KILL records
        self.deferred: list[int] = []  # signals asked for before the forker said the pid

    def rights(self) -> list[tuple[int, int, bytes]]:
        """The ancillary data that passes this connection and the caller's descriptors on."""
        return [
            (
                socket.SOL_SOCKET,
                socket.SCM_RIGHTS,
                struct.pack(f"{1 + len(self.fds)}i", self.sock.fileno(), *self.fds),
            )
        ]

    def handed_to(self, forker: _Forker) -> None:
        """Sent on: the caller's descriptors and the request are the receiver's now."""
        for fd in self.fds:
            os.close(fd)
        self.fds, self.buffer = [], b""
        self.forker = forker

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


# -- the server ------------------------------------------------------------------


class Server:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.listener: socket.socket | None = None
        self.lock_fd = -1
        self.conns: dict[int, _Conn] = {}  # by socket fd
        self.children: dict[int, _Conn] = {}  # commands the server forked itself, by pid
        self.forkers = {
            # Standbys for what Garden runs all day: every container start,
            # stop, and its stats several times a minute.
            "create": _Forker("create", _FULL, tls=True, standbys=("create",)),
            "lean": _Forker("lean", _LEAN, tls=False, standbys=("stats", "delete")),
        }
        self.tokens = 0
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

    def _sockets(self) -> list[Any]:
        """Every socket object this process owns, for a fork to detach."""
        found: list[Any] = [c.sock for c in self.conns.values()]
        found += [f.ctl for f in self.forkers.values() if f.ctl is not None]
        found += [sock for f in self.forkers.values() for _pid, sock in f.idle.values()]
        if self.listener is not None:
            found.append(self.listener)
        return found

    # -- the loop -----------------------------------------------------------

    def run(self) -> None:
        _ensure_standard_fds()
        self.open()
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for forker in self.forkers.values():
            forker.start(self._sockets())
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
            for forker in self.forkers.values():
                if forker.ctl is not None:
                    forker.ctl.close()  # it exits; commands still running report themselves
                    forker.ctl = None
                forker.forget_standbys()
            for forker in self.forkers.values():
                if forker.pid:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(forker.pid, 0)
            os.close(self.lock_fd)
            os.close(self.wake_r)
            os.close(self.wake_w)
            log.info("stopped", socket=self.path, left_running=self._running())

    def _running(self) -> int:
        return len(self.children) + sum(
            len(f.running) + len(f.pending) for f in self.forkers.values()
        )

    def _on_signal(self, signo: int, frame: Any) -> None:
        if signo != signal.SIGCHLD:
            self.stopping += 1

    def _loop(self) -> None:
        poller = select.poll()
        registered: set[int] = set()
        while True:
            if self.stopping and self.listener is not None:
                log.info("stopping: no new requests", running=self._running())
                self.close_listener()
                for conn in [c for c in self.conns.values() if not c.pid and not c.forker]:
                    self._drop(conn)  # still sending: its shim falls back
            if self.stopping > 1 or (self.stopping and not self._running()):
                return
            # Restarts first: a forker started here must have its control
            # socket in this round's poll, or its "ready" waits for the next event.
            now = time.monotonic()
            deadlines = [c.deadline for c in self.conns.values() if not c.pid and not c.forker]
            for forker in self.forkers.values():
                if forker.ctl is None and not self.stopping:
                    if now - forker.started >= RESTART_INTERVAL:
                        forker.start(self._sockets())
                    else:
                        deadlines.append(forker.started + RESTART_INTERVAL)
            wanted = {self.wake_r: select.POLLIN}
            if self.listener is not None:
                wanted[self.listener.fileno()] = select.POLLIN
            for fd in self.conns:
                wanted[fd] = select.POLLIN
            for forker in self.forkers.values():
                if forker.ctl is not None:
                    wanted[forker.ctl.fileno()] = select.POLLIN
            for fd in registered - wanted.keys():
                poller.unregister(fd)
            for fd, mask in wanted.items():
                poller.register(fd, mask)
            registered = set(wanted)
            timeout = max(0, int((min(deadlines) - now) * 1000) + 1) if deadlines else None
            for fd, events in poller.poll(timeout):
                if fd == self.wake_r:
                    _drain(self.wake_r)
                elif self.listener is not None and fd == self.listener.fileno():
                    self._accept()
                elif fd in self.conns:
                    self._readable(self.conns[fd], events)
                else:
                    for forker in self.forkers.values():
                        if forker.ctl is not None and fd == forker.ctl.fileno():
                            self._from_forker(forker)
            self._reap()
            now = time.monotonic()
            late = [c for c in self.conns.values() if not c.pid and not c.forker]
            for conn in [c for c in late if c.deadline < now]:
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
            conn = self.conns[sock.fileno()] = _Conn(sock)
            # A shim sends its request right after connecting: it is usually
            # here already, and reading it now saves a turn of the loop.
            self._readable(conn, select.POLLIN)

    def _readable(self, conn: _Conn, events: int) -> None:
        if conn.pid or conn.forker:
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
        conn.fds.extend(_received_fds(ancdata))
        if not data:
            self._drop(conn)  # the shim gave up before sending it all
            return
        conn.buffer += data
        try:
            request = parse_request(conn.buffer, environment=False)
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
        # A shim that timed out waiting and fell back has closed its end: its
        # request must not run a second time.
        if _peer_gone(conn.sock):
            self._drop(conn)
            return
        from grootfs_py.cli import command_of

        command = command_of(request.argv)
        if command == "serve":
            # A server is not a command to fork: the shim runs the Python one.
            log.info("refused a serve request")
            self._drop(conn)
            return
        forker = self.forkers["create" if command == "create" else "lean"]
        if not self._hand_to_standby(conn, forker, command or "") and not self._hand_over(
            conn, forker, command or ""
        ):
            self._fork_here(conn)

    def _hand_to_standby(self, conn: _Conn, forker: _Forker, command: str) -> bool:
        """Send the request straight to the forker's standby for *command*, if it has one.

        The forker is not woken for it (on 2 CPUs it would compete with the
        command): the standby tells it, on its own socket, which the forker
        reads when it reaps the standby, and then reports it ("DONE") and
        forks its replacement. A "KILL" for it meanwhile finds it a standby
        still, which the forker kills as it would a command.
        """
        standby = forker.idle.pop(command, None)
        if standby is None:
            return False
        # Only a ready forker has standbys here: they come after its "REDY",
        # and go when it does (forget_standbys).
        pid, sock = standby
        try:
            sock.sendmsg([conn.buffer], conn.rights())
        except OSError as exc:  # it died waiting
            log.info("standby gone: handing over", forker=forker.name, error=str(exc))
            return False
        finally:
            sock.close()
        conn.handed_to(forker)
        conn.pid = pid
        forker.running[pid] = conn
        _send(conn.sock, b"OKAY", pid)
        return True

    def _hand_over(self, conn: _Conn, forker: _Forker, command: str) -> bool:
        if forker.ctl is None or not forker.ready:
            return False
        self.tokens += 1
        try:
            forker.ctl.sendmsg(
                [
                    CONTROL.pack(b"RUN ", self.tokens, 0),
                    COMMAND.pack(command.encode()),
                    conn.buffer,
                ],
                conn.rights(),
            )
        except OSError as exc:  # EMSGSIZE for a huge environment, a full or dead forker
            log.info("hand over failed: forking here", forker=forker.name, error=str(exc))
            return False
        conn.handed_to(forker)
        forker.pending[self.tokens] = conn
        return True

    def _fork_here(self, conn: _Conn) -> None:
        try:
            pid = _fork_command(conn.sock.fileno(), conn.fds, conn.buffer, self._sockets())
        except OSError as exc:
            log.error("fork failed: the shim falls back", error=str(exc))
            self._drop(conn)
            return
        for fd in conn.fds:
            os.close(fd)
        conn.fds = []
        conn.pid = pid
        self.children[pid] = conn
        _send(conn.sock, b"OKAY", pid)

    def _from_forker(self, forker: _Forker) -> None:
        assert forker.ctl is not None
        while True:
            try:
                data, ancdata, _flags, _addr = forker.ctl.recvmsg(
                    CONTROL.size + COMMAND.size, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            fds = _received_fds(ancdata)
            if not data:
                for fd in fds:
                    os.close(fd)
                self._forker_gone(forker)
                return
            tag, a, b = CONTROL.unpack_from(data)
            if tag == b"STBY" and len(fds) == 1 and len(data) == CONTROL.size + COMMAND.size:
                (raw,) = COMMAND.unpack_from(data, CONTROL.size)
                command = raw.rstrip(b"\0").decode("ascii", "replace")
                old = forker.idle.pop(command, None)
                if old is not None:
                    old[1].close()
                forker.idle[command] = (a, socket.socket(fileno=fds[0]))
                continue
            for fd in fds:
                os.close(fd)
            if tag == b"REDY":
                forker.ready = True
                log.info("forker ready", forker=forker.name, pid=b)
            elif tag == b"STRT":
                conn = forker.pending.pop(a, None)
                if conn is not None:
                    conn.pid = b
                    forker.running[b] = conn
                    # The shim hears "OKAY" from the forker, so it may have
                    # sent a signal (or gone) before this message came.
                    for signo in conn.deferred:
                        self._signal(conn, signo)
            elif tag == b"FAIL":
                conn = forker.pending.pop(a, None)
                if conn is not None:
                    self._drop(conn)
            elif tag == b"DONE":
                conn = forker.running.pop(a, None)
                if conn is not None:
                    self._report(conn, b)

    def _forker_gone(self, forker: _Forker) -> None:
        log.error("forker died", forker=forker.name, meanwhile="the server forks commands itself")
        assert forker.ctl is not None
        forker.ctl.close()
        forker.ctl = None
        forker.ready = False
        forker.forget_standbys()  # they die with it
        # Its commands still running report their own exit status; with
        # their parent gone, nobody here may signal their pids any more.
        for conn in [*forker.pending.values(), *forker.running.values()]:
            self.conns.pop(conn.sock.fileno(), None)
            conn.close()
        forker.pending.clear()
        forker.running.clear()

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
            self._signal(conn, signal.SIGKILL)
            self._drop(conn)  # its command is still reaped (and reported to nobody)
            return
        conn.incoming += data
        while len(conn.incoming) >= RECORD.size:
            tag, value = RECORD.unpack_from(conn.incoming)
            conn.incoming = conn.incoming[RECORD.size :]
            if tag == b"KILL" and value in _FORWARDED:
                self._signal(conn, value)

    def _signal(self, conn: _Conn, signo: int) -> None:
        if conn.forker is None:
            if conn.pid:
                _kill(conn.pid, signo)  # our child, not reaped yet: the pid is its
        elif not conn.pid:
            conn.deferred.append(signo)  # sent when the forker tells the pid
        elif conn.forker.ctl is not None:
            with contextlib.suppress(OSError):
                conn.forker.ctl.send(CONTROL.pack(b"KILL", conn.pid, signo))

    def _reap(self) -> None:
        for pid, status in _reaped():
            conn = self.children.pop(pid, None)
            if conn is not None:
                self._report(conn, status)
            for forker in self.forkers.values():
                if pid == forker.pid:
                    forker.pid = 0

    def _report(self, conn: _Conn, status: int) -> None:
        if os.WIFSIGNALED(status):
            _send(conn.sock, b"SIGN", os.WTERMSIG(status))
        else:
            _send(conn.sock, b"EXIT", os.waitstatus_to_exitcode(status))
        self.conns.pop(conn.sock.fileno(), None)
        conn.close()

    def _drop(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        conn.close()


def _reaped() -> Iterator[tuple[int, int]]:
    """Each child that has exited (pid, wait status), reaped, without waiting for more."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds.extend(struct.unpack(f"{n}i", payload[: n * 4]))
    return fds


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


def _peer_gone(sock: socket.socket | int) -> bool:
    p = select.poll()
    p.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in p.poll(0))


def _send(sock: socket.socket, tag: bytes, value: int) -> None:
    # A shim that is gone cannot be told; its command is reaped all the same.
    with contextlib.suppress(OSError):
        sock.send(RECORD.pack(tag, value & 0xFFFFFFFF), socket.MSG_NOSIGNAL)


def _send_fd(fd: int, tag: bytes, value: int) -> None:
    with contextlib.suppress(OSError):  # EPIPE: SIGPIPE is ignored, as Python starts
        os.write(fd, RECORD.pack(tag, value & 0xFFFFFFFF))


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
    Server(path).run()
