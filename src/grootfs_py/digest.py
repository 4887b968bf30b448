"""Streams that check a digest and a size as the bytes go by.

A layer's compressed bytes are checked against the manifest's digest and
size, its uncompressed bytes against the config's diff_id, in the same pass
that unpacks it. Nothing is buffered beyond what the reader asks for.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import BinaryIO

from grootfs_py.errors import ImageSourceError, VerificationError

_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


def check_digest(digest: str) -> str:
    """Return *digest* if it is a well-formed sha256/sha512 digest.

    Digests become file names under blobs/, so anything else (``..``,
    slashes, upper case) is refused before it can name a path.
    """
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageSourceError(f"invalid digest `{digest}`")
    return digest


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class VerifyingReader(io.RawIOBase):
    """Pass bytes through from *inner*, hashing and counting them.

    ``finish()`` reads whatever is left and raises :class:`VerificationError`
    with *digest_message* / *size_message* on a mismatch. Reading more than
    *size* bytes fails at once, so an oversized blob is not read to its end.
    Without a *digest* nothing is hashed: a stack tar has none, and hashing
    its 200 MB twice (raw and "uncompressed") was a quarter of a cold create.
    """

    def __init__(
        self,
        inner: BinaryIO,
        *,
        digest: str | None,
        size: int | None = None,
        digest_message: str,
        size_message: str = "layer size is different from the value in the manifest",
    ) -> None:
        super().__init__()
        self._inner = inner
        self._digest = digest
        self._size = size
        self._digest_message = digest_message
        self._size_message = size_message
        # Nothing to check (skip_layer_validation): hashing would only cost time.
        self._hash = hashlib.new(digest.partition(":")[0]) if digest else None
        self.count = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        with memoryview(buffer) as view:
            data = self._inner.read(len(view))
            n = len(data)
            view[:n] = data
        if not n and len(buffer):
            self._eof = True
        if n:
            if self._hash is not None:
                self._hash.update(data)
            self.count += n
            if self._size is not None and self.count > self._size:
                raise VerificationError(self._size_message)
        return n

    def read(self, size: int = -1) -> bytes:
        # Hand the inner stream's bytes object on without an extra copy.
        data = self._inner.read(size if size is not None and size >= 0 else -1)
        if not data and size != 0:
            self._eof = True
        if data:
            if self._hash is not None:
                self._hash.update(data)
            self.count += len(data)
            if self._size is not None and self.count > self._size:
                raise VerificationError(self._size_message)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest() if self._hash is not None else ""

    def finish(self) -> None:
        """Drain the stream (unless it already ended) and check size and digest."""
        while not self._eof and self.read(1 << 20):
            pass
        if self._size is not None and self.count != self._size:
            raise VerificationError(self._size_message)
        if self._digest is not None and self._hash is not None:
            expected = self._digest.partition(":")[2]
            if self._hash.hexdigest() != expected:
                raise VerificationError(self._digest_message)
