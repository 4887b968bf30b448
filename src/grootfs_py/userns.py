"""Rootless work on a store: a helper process inside a user namespace.

A non-root user's store (root ran ``init-store --uid-mapping 0:<uid>:1
--uid-mapping 1:<subuid>:<n>`` for it) holds files of the user's subordinate
ids. The user cannot chown to those ids, nor remove a directory one of them
owns, so that work is done by a helper, this module run as
``python -m grootfs_py.userns``, in a new user namespace whose id maps are
the store's, written by the setuid ``newuidmap``/``newgidmap`` (config keys
``newuidmap_bin``/``newgidmap_bin``). In there the user is root over every
id of the store, and the kernel turns id ``n`` into its host id on disk.

The handshake: the helper unshares its user namespace and writes one byte
on its *ready* pipe; the parent runs newuidmap and newgidmap on the helper's
pid and writes one byte on the *go* pipe (closing it unwritten aborts). The
helper answers one JSON line on stdout: ``{"result": ...}`` or
``{"error": "<one line>"}``. A layer's tar stream comes on its stdin.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from grootfs_py import log
from grootfs_py.errors import CommandError, GrootError, StoreError, UnpackError
from grootfs_py.idmap import IdMap, map_arguments

CLONE_NEWUSER = 0x10000000
_CHUNK = 1 << 20

if TYPE_CHECKING:
    import subprocess

    from grootfs_py.store import Store


class _Helper:
    """One helper process, mapped and released, with *stdin* open for a stream."""

    proc: subprocess.Popen[bytes]

    def __init__(self, store: Store, op: str, args: Sequence[str], *, stdin: bool) -> None:
        # Imported here: the helper process itself needs neither.
        import subprocess

        from grootfs_py.proc import run

        idmap: IdMap = store.idmap()
        level, log_file = log.settings()
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        argv = [
            sys.executable,
            "-m",
            "grootfs_py.userns",
            str(ready_w),
            str(go_r),
            level,
            log_file or "",
            json.dumps(idmap.to_json()),
            op,
            *args,
        ]
        log.debug("starting user namespace helper", op=op, args=list(args))
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                pass_fds=(ready_w, go_r),
                env=env,
                close_fds=True,
            )
        finally:
            os.close(ready_w)
            os.close(go_r)
        try:
            with os.fdopen(ready_r, "rb", buffering=0) as ready:
                unshared = ready.read(1) == b"r"
            if not unshared:
                raise StoreError(f"enter user namespace: {self._error()}")
            pid = str(self.proc.pid)
            try:
                run([store.newuidmap_bin, pid, *map_arguments(idmap.uids)])
                run([store.newgidmap_bin, pid, *map_arguments(idmap.gids)])
            except (CommandError, OSError) as exc:
                raise StoreError(f"map the store's ids in a user namespace: {exc}") from None
            os.write(go_w, b"g")
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(go_w)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def _error(self) -> str:
        """The helper's one-line error, once it has exited."""
        out, _ = self.proc.communicate()
        try:
            return str(json.loads(out)["error"])
        except (ValueError, KeyError, TypeError):
            return f"user namespace helper exited with status {self.proc.returncode}"

    def feed(self, stream: BinaryIO) -> None:
        """Copy *stream* to the helper's stdin until either side ends."""
        pipe = self.proc.stdin
        assert pipe is not None
        self.proc.stdin = None  # ours to close: communicate() must not flush it
        try:
            with contextlib.suppress(BrokenPipeError):  # the helper failed; its error says why
                while chunk := stream.read(_CHUNK):
                    pipe.write(chunk)
                pipe.close()
        except BaseException:
            self.kill()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()

    def result(self, error: type[GrootError]) -> Any:
        out, _ = self.proc.communicate()
        try:
            answer = json.loads(out)
        except ValueError:
            answer = None
        if self.proc.returncode == 0 and isinstance(answer, dict) and "result" in answer:
            return answer["result"]
        if isinstance(answer, dict) and "error" in answer:
            raise error(str(answer["error"]))
        raise error(f"user namespace helper exited with status {self.proc.returncode}")


def unpack(
    store: Store,
    stream: BinaryIO,
    dest: str,
    *,
    layer: str,
    base_directory: str = "",
    parent: str = "",
) -> int:
    """Unpack the tar *stream* into *dest* in the store's user namespace; its size in bytes."""
    helper = _Helper(store, "unpack", [dest, layer, base_directory, parent], stdin=True)
    helper.feed(stream)
    return int(helper.result(UnpackError))


def remove_trees(store: Store, paths: Sequence[str]) -> None:
    _Helper(store, "remove", paths, stdin=False).result(StoreError)


def disk_usage(store: Store, path: str) -> int:
    return int(_Helper(store, "usage", [path], stdin=False).result(StoreError))


def content_size(store: Store, path: str) -> int:
    return int(_Helper(store, "size", [path], stdin=False).result(StoreError))


# The helper's side ------------------------------------------------------------


def _unshare() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare user namespace: {os.strerror(err)}")


def _do(idmap: IdMap, op: str, args: list[str]) -> Any:
    from grootfs_py import fsutil

    if op == "unpack":
        from grootfs_py.unpack import unpack_layer

        dest, layer, base_directory, parent = args
        os.chown(dest, 0, 0)  # the namespace's root: the store's mapped root
        stdin = sys.stdin.buffer
        return unpack_layer(
            stdin,
            dest,
            idmap.inside(),
            layer=layer,
            rootless=True,
            base_directory=base_directory,
            parent=parent,
        ).size_bytes
    if op == "remove":
        for path in args:
            try:
                fsutil.remove_tree(path)
            except PermissionError as exc:
                raise StoreError(
                    f"remove {path}: {exc.filename} belongs to an id outside the store's "
                    "mappings: only root can remove it"
                ) from None
        return None
    if op == "usage":
        return fsutil.disk_usage(args[0])
    if op == "size":
        return fsutil.content_size(args[0])
    raise ValueError(f"unknown operation {op}")


def main(argv: list[str]) -> int:
    ready_fd, go_fd, level, log_file, mappings, op, *args = argv
    log.configure(level, log_file or None, helper="userns", op=op)
    try:
        try:
            _unshare()
            os.write(int(ready_fd), b"r")
        finally:
            os.close(int(ready_fd))  # unwritten: the parent reads why on stdout
        with os.fdopen(int(go_fd), "rb", buffering=0) as go:
            if go.read(1) != b"g":
                raise StoreError("enter user namespace: the parent gave up")
        answer: dict[str, Any] = {"result": _do(IdMap.from_json(json.loads(mappings)), op, args)}
        status = 0
    except GrootError as exc:
        answer, status = {"error": str(exc)}, 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        answer, status = {"error": f"{op}{where}: {exc.strerror or exc}"}, 1
    except Exception as exc:
        answer, status = {"error": f"{op}: {type(exc).__name__}: {exc}"}, 1
    finally:
        log.close()
    with contextlib.suppress(BrokenPipeError):  # the parent was killed
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
