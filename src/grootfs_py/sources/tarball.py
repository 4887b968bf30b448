"""A local tar file as a one-layer image (how Cloud Foundry ships its stacks).

There is no manifest to name the layer, and hashing a gigabyte stack on
every container start would make the hot path slow, so the layer is named
as GrootFS and Garden name it: sha256 of ``"<path>-<mtime in ns>"``, with
the path exactly as given (not resolved: on a cell it goes through the
``/var/vcap/packages`` symlink). Garden names the stack layer of a two-layer
app image (``preloaded+layer:``) the same way, so a plain create of the
stack and an app on it share one volume. A rewritten stack gets a new layer;
the same file is unpacked once.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

from grootfs_py import compression, fsutil
from grootfs_py.errors import ImageSourceError, InvalidArgumentError
from grootfs_py.sources import Image, Layer

MEDIA_TYPE = "application/x-tar"


def layer_id(path: str, mtime_ns: int) -> str:
    return "sha256:" + hashlib.sha256(f"{path}-{mtime_ns}".encode()).hexdigest()


def _open(path: str) -> BinaryIO:
    try:
        return fsutil.open_regular(path)
    except FileNotFoundError:
        raise ImageSourceError("Image source doesn't exist") from None
    except fsutil.NotRegularFileError as exc:
        if exc.strerror and exc.strerror.startswith("a directory"):
            raise InvalidArgumentError(
                "invalid base image: directory provided instead of a tar file"
            ) from None
        raise InvalidArgumentError(f"invalid base image: {path} is {exc.strerror}") from None
    except OSError as exc:
        raise ImageSourceError(f"read image {path}: {exc.strerror}") from None


def load(path: str) -> Image:
    with _open(path) as f:
        st = os.fstat(f.fileno())
        kind = compression.sniff(f.read(4))

    def opener() -> BinaryIO:
        return _open(path)

    layer = Layer(
        chain_id=layer_id(path, st.st_mtime_ns),
        media_type=MEDIA_TYPE,
        compression=kind,
        open=opener,
        blob_size=st.st_size,
    )
    return Image(layers=(layer,))
