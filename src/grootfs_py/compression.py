"""Decompressing layer streams: gzip (through ISA-L where installed), zstd, none."""

from __future__ import annotations

from typing import BinaryIO, cast

from grootfs_py.errors import ImageSourceError

GZIP = "gzip"
ZSTD = "zstd"
NONE = "none"

# Inflated gzip is handed over in blocks of this size; ISA-L's reader keeps
# 8 blocks of compressed input. Up to three layers unpack at once.
BLOCK = 256 << 10

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff(head: bytes) -> str:
    """The compression of a stream that starts with *head*."""
    if head.startswith(_GZIP_MAGIC):
        return GZIP
    if head.startswith(_ZSTD_MAGIC):
        return ZSTD
    return NONE


def decompress(stream: BinaryIO, kind: str) -> BinaryIO:
    """Wrap *stream* so that reads return decompressed bytes.

    gzip is inflated by ISA-L on a thread of its own, which also does the
    reads from *stream* (the socket, the compressed digest): they overlap
    with the caller's tar parsing and writes. Closing the result stops and
    joins that thread; only then may anyone else read *stream*.
    """
    if kind == NONE:
        return stream
    if kind == GZIP:
        try:
            from isal import igzip_threaded

            return cast(BinaryIO, igzip_threaded.open(stream, "rb", threads=1, block_size=BLOCK))  # type: ignore[no-untyped-call]
        except ImportError:
            import gzip

            return cast(BinaryIO, gzip.GzipFile(fileobj=stream, mode="rb"))
    if kind == ZSTD:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            stream, read_across_frames=True, closefd=False
        )
        return cast(BinaryIO, reader)
    raise ImageSourceError(f"unsupported compression `{kind}`")
