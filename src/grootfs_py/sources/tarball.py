"""A local tar file as a one-layer image (how Cloud Foundry ships its stacks).

There is no manifest to name the layer, and hashing a gigabyte stack on
every container start would make the hot path slow, so the layer is named
by the file's identity: its real path, size, inode and modification time.
A replaced or rewritten stack file gets a new layer; the same file is
unpacked once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import BinaryIO

from grootfs_py import compression
from grootfs_py.errors import ImageSourceError, InvalidArgumentError
from grootfs_py.sources import Image, Layer

MEDIA_TYPE = "application/x-tar"


def load(path: str) -> Image:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ImageSourceError("Image source doesn't exist") from None
    except OSError as exc:
        raise ImageSourceError(f"read image {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError("invalid base image: directory provided instead of a tar file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(f"invalid base image: {path} is not a regular file")
    identity = f"tar:{real}:{st.st_size}:{st.st_ino}:{st.st_mtime_ns}"
    chain_id = "sha256:" + hashlib.sha256(identity.encode()).hexdigest()
    with open(real, "rb") as f:
        kind = compression.sniff(f.read(4))

    def opener() -> BinaryIO:
        return open(real, "rb")

    layer = Layer(
        chain_id=chain_id,
        media_type=MEDIA_TYPE,
        compression=kind,
        open=opener,
        blob_size=st.st_size,
    )
    return Image(layers=(layer,))
