"""Structured logging in lager's format: one JSON object a line, never on stdout.

Garden parses the plugin's stdout, so every log line goes to stderr or to the
configured log file. Garden passes stderr through lager's ``chug`` and re-logs
each line that parses as a lager entry at that entry's level; any other line
becomes a Garden *error*. A line is lager's own (``WriterSink``) format::

    {"timestamp":"1732960000.123456789","source":"grootfs",
     "message":"grootfs.create.image-created","log_level":1,
     "data":{"id":"web-1","session":"1"}}

``timestamp`` is seconds since the epoch as a decimal string, ``log_level``
0 debug, 1 info, 2 error, 3 fatal, ``message`` ``grootfs.<command>.<event>``
with the event in kebab case, and ``data`` always an object (Garden's
relogger adds ``original_timestamp`` to it) whose ``session``, ``error`` and
``trace``, which chug insists on reading as strings, are strings. This is
the form every chug reads; newer ones also take the "pretty" form (RFC 3339
time, ``level`` as a word) that GrootFS 0.30 writes, older ones do not.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import IO, Any

LEVELS = {"debug": 0, "info": 1, "error": 2, "fatal": 3}
SOURCE = "grootfs"
# Keys chug reads out of ``data`` as strings: any other type there makes it
# treat the whole line as not lager (and Garden logs it as an error).
_STRING_KEYS = ("session", "error", "trace")


class _LineFile:
    """A log file opened for appending: each line is one write(2), as a line-buffered file's.

    Cheaper to open than a text file object (no buffer, no codec lookup):
    every command forked from the server opens one.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


_threshold = LEVELS["info"]
_stream: IO[str] | _LineFile | None = None  # None: whatever sys.stderr is at the time of writing
_owned: _LineFile | None = None
_session: dict[str, Any] = {}
_path: str | None = None
_prefix = SOURCE
_events: dict[str, str] = {}
# Compiled at import: the fork server's commands log without compiling it each.
_NOT_NAME = re.compile(r"[^a-z0-9]+")


def configure(level: str, path: str | None = None, **session: Any) -> None:
    """Set the minimum level, the destination, and values added to every line.

    A ``command`` value names the lager session (``grootfs.<command>``) instead
    of going into ``data``, as GrootFS's per-command loggers do.
    """
    global _threshold, _stream, _owned, _path, _prefix
    _threshold = LEVELS[level]
    _path = path or None
    if path:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if not parent:
                raise
            os.makedirs(parent, exist_ok=True)
            fd = os.open(path, flags, 0o666)
        close()
        _owned = _LineFile(fd)
        _stream = _owned
    command = session.pop("command", None)
    _prefix = f"{SOURCE}.{command}" if command else SOURCE
    _session.clear()
    _session.update(session)


def settings() -> tuple[str, str | None]:
    """The configured level and log file, for a helper process to log alike."""
    level = next(name for name, n in LEVELS.items() if n == _threshold)
    return level, _path


def snapshot() -> tuple[str, str | None, dict[str, Any]]:
    """What :func:`configure` was last given, for ``configure(level, path, **session)``."""
    level, path = settings()
    session = dict(_session)
    if _prefix != SOURCE:
        session["command"] = _prefix[len(SOURCE) + 1 :]
    return level, path, session


def file_fd() -> int | None:
    """The log file's descriptor, for a process about to close every other one."""
    return _owned.fd if _owned is not None and _owned.fd >= 0 else None


def close() -> None:
    global _stream, _owned
    if _owned is not None:
        _owned.close()
        _owned = None
    _stream = None


def enabled(level: str) -> bool:
    return LEVELS[level] >= _threshold


def event_name(message: str) -> str:
    """``"lock waited"`` -> ``"lock-waited"``: lager's action names are kebab case."""
    name = _events.get(message)
    if name is None:
        name = _NOT_NAME.sub("-", message.lower()).strip("-") or "log"
        _events[message] = name
    return name


def _emit(level: str, message: str, data: dict[str, Any]) -> None:
    if LEVELS[level] < _threshold:
        return
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    fields = {**_session, **data, "session": "1"}
    for key in _STRING_KEYS:
        if key in fields and not isinstance(fields[key], str):
            fields[key] = str(fields[key])
    line = json.dumps(
        {
            "timestamp": f"{seconds}.{nanos:09d}",
            "source": SOURCE,
            "message": f"{_prefix}.{event_name(message)}",
            "log_level": LEVELS[level],
            "data": fields,
        },
        default=str,
        separators=(",", ":"),
    )
    stream = _stream if _stream is not None else sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        # A full or vanished log disk (or a closed stderr) must not turn a
        # good create into a failed one.
        pass


def debug(message: str, **data: Any) -> None:
    _emit("debug", message, data)


def info(message: str, **data: Any) -> None:
    _emit("info", message, data)


def warning(message: str, **data: Any) -> None:
    # lager knows no "warn" level; warnings are info lines flagged as such.
    _emit("info", message, {"warning": True, **data})


def error(message: str, **data: Any) -> None:
    _emit("error", message, data)
