"""Structured logging: one JSON object a line, never on stdout.

Garden parses the plugin's stdout, so every log line goes to stderr or to the
configured log file. Each line holds ``timestamp`` (RFC 3339, UTC),
``level``, ``message`` and ``data`` (a flat object of context values).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

LEVELS = {"debug": 0, "info": 1, "error": 2, "fatal": 3}

_threshold = LEVELS["info"]
_stream: IO[str] = sys.stderr
_owned: IO[str] | None = None
_session: dict[str, Any] = {}
_path: str | None = None


def configure(level: str, path: str | None = None, **session: Any) -> None:
    """Set the minimum level, the destination, and values added to every line."""
    global _threshold, _stream, _owned, _path
    _threshold = LEVELS[level]
    _path = path or None
    if path:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        close()
        _owned = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives until close())
        _stream = _owned
    _session.clear()
    _session.update(session)


def settings() -> tuple[str, str | None]:
    """The configured level and log file, for a helper process to log alike."""
    level = next(name for name, n in LEVELS.items() if n == _threshold)
    return level, _path


def close() -> None:
    global _stream, _owned
    if _owned is not None:
        _owned.close()
        _owned = None
    _stream = sys.stderr


def enabled(level: str) -> bool:
    return LEVELS[level] >= _threshold


def _emit(level: str, message: str, data: dict[str, Any]) -> None:
    if LEVELS[level] < _threshold:
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    line = json.dumps(
        {"timestamp": stamp, "level": level, "message": message, "data": {**_session, **data}},
        default=str,
        separators=(",", ":"),
    )
    try:
        _stream.write(line + "\n")
        _stream.flush()
    except OSError:
        # A full or vanished log disk must not turn a good create into a failed one.
        pass


def debug(message: str, **data: Any) -> None:
    _emit("debug", message, data)


def info(message: str, **data: Any) -> None:
    _emit("info", message, data)


def warning(message: str, **data: Any) -> None:
    # The contract knows no "warn" level; warnings are info lines flagged as such.
    _emit("info", message, {"warning": True, **data})


def error(message: str, **data: Any) -> None:
    _emit("error", message, data)
