"""Streaming one blob over HTTP, resumed after a dropped connection or a stall.

Shared by the registry client (``docker://`` layers) and remote layers of
OCI layouts (a layer with ``urls``, such as Garden's droplet layer): both
hand the unpacker a stream that never repeats or loses a byte, whatever the
network did, and give up with one line naming the blob after
:data:`ATTEMPTS` interruptions. How a request is made (auth, retries of
the request itself, error messages) is the caller's ``get``.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable
from typing import Any

from grootfs_py import log
from grootfs_py.errors import ImageSourceError
from grootfs_py.sources.transport import Response, TransportError

ATTEMPTS = 4  # per request, and per blob for resuming
BACKOFF_SECONDS = 0.5  # doubled after each failed attempt
CONNECT_TIMEOUT = 10.0
# Seconds a server may stay silent (connect aside) before the request is
# retried; a slow but moving download is never cut off.
TIMEOUT_ENV = "GROOTFS_REGISTRY_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))
CHUNK = 1 << 20
# Most bytes one read asks the socket for. http.client's read1 allocates what
# is asked before receiving one TLS record (16 KiB): asking 1 MiB made every
# read an mmap and cost 3x the throughput of a 100 MB download.
READ_SIZE = 64 << 10
USER_AGENT = "grootfs-py"


class Retry(Exception):
    """One attempt failed in a way worth trying again; ``str()`` says why."""


def read_timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def backoff(attempt: int) -> None:
    """Sleep before try *attempt* + 1, with a little jitter."""
    import random  # only on this slow path

    time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1) * (1 + random.random() / 4))


class BlobReader(io.RawIOBase):
    """A blob's bytes from the socket, resumed with ``Range`` after an interruption.

    *get* makes the request with the extra headers given and returns a 2xx
    response, raising :class:`Retry` or :class:`TransportError` for a
    failure worth retrying and :class:`ImageSourceError` for one that is
    not. *where* starts the error line (``pull <ref>: registry <host>``);
    *what* names the blob in it. Nothing is requested before the first read.
    """

    def __init__(self, get: Callable[[dict[str, str]], Response], *, where: str, what: str) -> None:
        super().__init__()
        self._get = get
        self._where = where
        self._what = what
        self._offset = 0
        self._failures = 0
        self._response: Response | None = None
        self._eof = False

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self._offset}-"} if self._offset else {}
        response = self._get(headers)
        if self._offset and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != self._offset:
                response.close()
                raise ImageSourceError(f"{self._where}: {self._what}: bad Content-Range")
        elif self._offset:
            # The server ignored Range: read the blob again and skip what we already had.
            skip = self._offset
            while skip:
                try:
                    data = response.read1(min(skip, CHUNK))
                except TransportError:
                    response.close()
                    raise
                if not data:
                    response.close()
                    raise Retry("blob ended early")
                skip -= len(data)
        self._response = response

    def read(self, size: int | None = -1) -> bytes:
        if self._eof:
            return b""
        want = READ_SIZE if size is None or size < 0 else min(size, READ_SIZE)
        while True:
            try:
                if self._response is None:
                    self._open()
                assert self._response is not None
                # read1: what one receive gave, so a reset loses nothing already here.
                data = self._response.read1(want)
            except (Retry, TransportError) as exc:
                self._interrupted(str(exc))
                continue
            if data:
                self._offset += len(data)
                return data
            # A clean end (a body cut short of its Content-Length raised above): a
            # blob shorter than promised is the verifying reader's to report.
            break
        self._eof = True
        self._close_response()
        return b""

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _interrupted(self, reason: str) -> None:
        self._close_response()
        self._failures += 1
        if self._failures >= ATTEMPTS:
            raise ImageSourceError(
                f"{self._where}: download {self._what}: {reason} after {self._offset} bytes "
                f"(tried {ATTEMPTS} times)"
            )
        log.info(
            "blob download interrupted, resuming",
            where=self._where,
            blob=self._what,
            offset=self._offset,
            reason=reason,
        )
        time.sleep(BACKOFF_SECONDS * 2 ** (self._failures - 1))

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def close(self) -> None:
        self._close_response()
        super().close()
