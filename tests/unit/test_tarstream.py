"""tarstream against CPython's tarfile, and on hand-made malformed and edge-case headers."""

import io
import os
import random
import tarfile
from decimal import Decimal

import pytest

from grootfs_py.tarstream import (
    Entry,
    FileSource,
    Reader,
    TarFormatError,
    parse_pax,
    pax_time_ns,
)

FORMATS = [
    pytest.param(tarfile.USTAR_FORMAT, id="ustar"),
    pytest.param(tarfile.GNU_FORMAT, id="gnu"),
    pytest.param(tarfile.PAX_FORMAT, id="pax"),
]
SIZE, MTIME, UID, GID, CHKSUM, TYPE, MAGIC, PREFIX = 124, 136, 108, 116, 148, 156, 257, 345
END = bytes(1024)
BINARY_CAP = b"\x01\x00\x00\x02\xff\xfe\x80\x00\x20\x00\x00\x00"
RANDOM_100K = random.Random(1).randbytes(100_000)

# -- helpers -------------------------------------------------------------------------


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_500_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _archive(fmt: int, items: list[tuple[tarfile.TarInfo, bytes]], **kw: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tf:
        for info, data in items:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _tarfile_members(archive: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tf:
        return tf.getmembers()


def _member(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """One hand-placed member: a single ustar header block (whatever its type), data, padding."""
    info.size = len(data)
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % 512)


def _fix_checksum(block: bytes) -> bytes:
    out = bytearray(block)
    out[CHKSUM : CHKSUM + 8] = b" " * 8
    out[CHKSUM : CHKSUM + 8] = b"%06o\0 " % sum(out)
    return bytes(out)


def _patch(archive: bytes, offset: int, value: bytes) -> bytes:
    """*archive* with *value* written at *offset* and that header block's checksum redone."""
    start = offset - offset % 512
    block = bytearray(archive[start : start + 512])
    block[offset - start : offset - start + len(value)] = value
    return archive[:start] + _fix_checksum(block) + archive[start + 512 :]


def _read_data(reader: Reader, chunk: int = 4096) -> bytes:
    parts = []
    while part := reader.read(chunk):
        parts.append(part)
    return b"".join(parts)


def _entries(archive: bytes | io.RawIOBase, chunk: int = 4096) -> list[tuple[Entry, bytes]]:
    stream = io.BytesIO(archive) if isinstance(archive, bytes) else archive
    reader = Reader(stream)
    out = []
    while (entry := reader.next()) is not None:
        out.append((entry, _read_data(reader, chunk)))
    return out


def _skip_all(archive: bytes) -> list[str]:
    reader = Reader(io.BytesIO(archive))
    names = []
    while (entry := reader.next()) is not None:
        names.append(entry.name)
    return names


def _ns(text: str) -> int:
    return int(Decimal(text) * 1_000_000_000)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


# -- 1. differential against tarfile -------------------------------------------------


def _sample_items(fmt: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    ustar = fmt == tarfile.USTAR_FORMAT
    deep = "deep/" + "/".join(["d" * 60] * 4) + "/file"  # 254 + 5 chars, no ustar split
    long_target = "target/" + "t" * 150
    items = [
        (_info("empty", mode=0o644), b""),
        (_info("one", mode=0o600, uid=1000, gid=1001), b"x"),
        (_info("block", mtime=1_600_000_001), b"b" * 512),
        (_info("block-plus-one"), b"c" * 513),
        (_info("random", mode=0o640), RANDOM_100K),
        (_info("dir", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("symlink", tarfile.SYMTYPE, linkname="one", mode=0o777), b""),
        (_info("hardlink", tarfile.LNKTYPE, linkname="one"), b""),
        (_info("fifo", tarfile.FIFOTYPE, mode=0o600), b""),
        (_info("null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
        (_info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660), b""),
        (_info("long/" + "n" * 94), b"99"),
        (_info("long/" + "n" * 95), b"100"),
        (_info("long/" + "n" * 96), b"101"),
        (_info("ünïcødé-名前.txt"), "名前".encode()),
        (_info("setuid", mode=0o4755), b"#!/bin/sh\n"),
    ]
    if not ustar:
        items += [
            (_info(deep, mode=0o644), b"deep"),
            (_info("deep-hardlink", tarfile.LNKTYPE, linkname=deep), b""),
            (_info("long-symlink", tarfile.SYMTYPE, linkname=long_target), b""),
            (_info("big-ids", uid=3_000_000, gid=3_000_001), b"ids"),
        ]
    if fmt == tarfile.PAX_FORMAT:
        xattrs = _info("xattrs")
        xattrs.pax_headers = {
            "SCHILY.xattr.user.test": "hello",
            "SCHILY.xattr.security.capability": BINARY_CAP.decode("utf-8", "surrogateescape"),
        }
        times = _info("times")
        times.pax_headers = {"mtime": "1600000000.123456789", "atime": "1600000001.5"}
        items += [(xattrs, b"x"), (times, b"t")]
    return items


def _tarfile_view(archive: bytes) -> list[dict[str, object]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tf:
        for m in tf:
            pax = m.pax_headers
            out.append(
                {
                    "name": m.name,
                    "linkname": m.linkname,
                    "type": m.type,
                    # tarfile's isdev() counts FIFOs too; tarstream's means char or block only.
                    "kinds": (
                        *(m.isreg(), m.isdir(), m.issym(), m.islnk(), m.isfifo()),
                        m.ischr() or m.isblk(),
                    ),
                    "mode": m.mode,
                    "uid": m.uid,
                    "gid": m.gid,
                    "size": m.size if m.isreg() else 0,
                    "data": tf.extractfile(m).read() if m.isreg() else b"",
                    "mtime_ns": _ns(pax["mtime"]) if "mtime" in pax else int(m.mtime) * 10**9,
                    "atime_ns": _ns(pax["atime"]) if "atime" in pax else None,
                    "xattrs": {
                        k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                        for k, v in pax.items()
                        if k.startswith("SCHILY.xattr.")
                    },
                }
            )
    return out


def _tarstream_view(archive: bytes, chunk: int = 4096) -> list[dict[str, object]]:
    return [
        {
            "name": e.name,
            "linkname": e.linkname,
            "type": e.type,
            "kinds": (e.isreg(), e.isdir(), e.issym(), e.islnk(), e.isfifo(), e.isdev()),
            "mode": e.mode,
            "uid": e.uid,
            "gid": e.gid,
            "size": e.size,
            "data": data,
            "mtime_ns": e.mtime_ns,
            "atime_ns": e.atime_ns,
            "xattrs": e.xattrs,
        }
        for e, data in _entries(archive, chunk)
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_entries_match_tarfile(fmt):
    items = _sample_items(fmt)
    archive = _archive(fmt, items)
    expected = _tarfile_view(archive)

    got = _tarstream_view(archive)

    assert [g["name"] for g in got] == [e["name"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g == e, g["name"]
    # The differential is only worth something if the archive holds what was put in.
    assert [g["name"] for g in got] == [i.name for i, _ in items]
    assert [g["data"] for g in got] == [d for _, d in items]


@pytest.mark.parametrize("fmt", FORMATS)
def test_entries_keep_the_values_they_were_written_with(fmt):
    by_name = {g["name"]: g for g in _tarstream_view(_archive(fmt, _sample_items(fmt)))}

    assert by_name["setuid"]["mode"] == 0o4755
    assert by_name["dir"]["kinds"] == (False, True, False, False, False, False)
    assert by_name["null"]["type"] == b"3" and by_name["sda"]["type"] == b"4"
    assert by_name["sda"]["kinds"] == (False, False, False, False, False, True)
    assert by_name["fifo"]["kinds"] == (False, False, False, False, True, False)
    assert by_name["symlink"]["linkname"] == "one"
    assert by_name["block"]["mtime_ns"] == 1_600_000_001_000_000_000
    if fmt != tarfile.USTAR_FORMAT:
        assert (by_name["big-ids"]["uid"], by_name["big-ids"]["gid"]) == (3_000_000, 3_000_001)
        assert by_name["long-symlink"]["linkname"] == "target/" + "t" * 150
    if fmt == tarfile.PAX_FORMAT:
        assert by_name["xattrs"]["xattrs"] == {
            "user.test": b"hello",
            "security.capability": BINARY_CAP,
        }
        assert by_name["times"]["mtime_ns"] == 1_600_000_000_123_456_789
        assert by_name["times"]["atime_ns"] == 1_600_000_001_500_000_000
    else:
        assert all(g["atime_ns"] is None and g["xattrs"] == {} for g in by_name.values())


# -- 2. and 3. skipping data, short reads --------------------------------------------


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda i: 0, id="none"),
        pytest.param(lambda i: 4096 if i % 2 else 0, id="every-other"),
        pytest.param(lambda i: 1, id="first-byte-of-each"),
        pytest.param(lambda i: 4096 if i == 4 else 0, id="only-the-100k-one"),
    ],
)
def test_unread_data_is_skipped_and_every_entry_still_comes_in_order(read):
    items = _sample_items(tarfile.GNU_FORMAT)
    reader = Reader(io.BytesIO(_archive(tarfile.GNU_FORMAT, items)))

    got = []
    while (entry := reader.next()) is not None:
        got.append((entry.name, reader.read(read(len(got)))))

    assert got == [(info.name, data[: read(i)]) for i, (info, data) in enumerate(items)]


class _Trickle(io.RawIOBase):
    """A stream that gives at most 7 bytes per read, as a pipe may."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._data.read(min(len(buffer), 7))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("fmt", FORMATS)
def test_short_reads_yield_the_same_entries_and_data(fmt):
    archive = _archive(fmt, _sample_items(fmt))
    assert _Trickle(archive).read(512) == archive[:7]  # the wrapper really is short

    assert _entries(_Trickle(archive), chunk=1000) == _entries(archive)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(tarfile.LNKTYPE, id="hardlink"),
        pytest.param(tarfile.SYMTYPE, id="symlink"),
        pytest.param(tarfile.CHRTYPE, id="char"),
        pytest.param(tarfile.BLKTYPE, id="block"),
        pytest.param(tarfile.DIRTYPE, id="dir"),
        pytest.param(tarfile.FIFOTYPE, id="fifo"),
    ],
)
def test_header_only_types_have_no_data_whatever_their_size_field_says(kind):
    odd = _patch(_member(_info("odd", kind, linkname="x")), SIZE, b"%011o\0" % 1024)
    archive = odd + _member(_info("next"), b"n") + END
    assert [m.name for m in _tarfile_members(archive)] == ["odd", "next"]

    got = [(e.name, e.size, data) for e, data in _entries(archive)]

    assert got == [("odd", 0, b""), ("next", 1, b"n")]


# -- 4. end of archive ---------------------------------------------------------------


def test_stream_ending_at_an_entry_boundary_without_end_blocks_is_accepted():
    archive = _member(_info("a"), b"data") + _member(_info("b", tarfile.DIRTYPE))

    assert [(e.name, data) for e, data in _entries(archive)] == [("a", b"data"), ("b", b"")]


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(b"garbage " * 64, id="garbage"),
        pytest.param(_member(_info("hidden"), b"h"), id="valid-entry"),
    ],
)
def test_a_zero_block_ends_the_archive_and_what_follows_is_not_parsed(after):
    reader = Reader(io.BytesIO(_member(_info("a"), b"data") + bytes(512) + after))

    assert reader.next().name == "a"
    assert reader.next() is None
    assert reader.next() is None


def test_empty_stream_is_not_an_archive():
    with pytest.raises(TarFormatError, match="empty stream"):
        Reader(io.BytesIO(b"")).next()


# -- 5. malformed and hostile input --------------------------------------------------

TWO_FILES = _member(_info("a"), b"A" * 600) + _member(_info("b"), b"B") + END  # b at 1536


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(0, id="name"),
        pytest.param(100, id="mode"),
        pytest.param(SIZE + 5, id="size"),
        pytest.param(MTIME, id="mtime"),
        pytest.param(CHKSUM + 2, id="checksum-field"),
        pytest.param(CHKSUM, id="checksum-marker-bit"),
        pytest.param(TYPE, id="typeflag"),
        pytest.param(MAGIC, id="magic"),
        pytest.param(511, id="padding"),
        pytest.param(1536 + 3, id="second-header"),
    ],
)
def test_a_flipped_header_byte_fails_the_checksum(offset):
    corrupt = bytearray(TWO_FILES)
    corrupt[offset] ^= 0xFF

    with pytest.raises(TarFormatError, match="checksum"):
        _entries(bytes(corrupt))


@pytest.mark.parametrize(
    "checksum",
    [
        pytest.param(lambda b: sum(b), id="unsigned"),
        pytest.param(lambda b: sum(x - 256 if x & 0x80 else x for x in b), id="signed"),
    ],
)
def test_checksums_summed_as_signed_or_unsigned_bytes_are_accepted(checksum):
    header = bytearray(_member(_info("ünï")))
    header[CHKSUM : CHKSUM + 8] = b" " * 8
    header[CHKSUM : CHKSUM + 8] = b"%06o\0 " % checksum(header)

    assert [e.name for e, _ in _entries(bytes(header))] == ["ünï"]


@pytest.mark.parametrize(
    ("length", "where"),
    [
        pytest.param(300, "a header", id="first-header"),
        pytest.param(1536 + 200, "a header", id="second-header"),
        pytest.param(512 + 300, "entry", id="data-read"),
        pytest.param(512 + 600 + 10, "an entry's data", id="data-padding"),
    ],
)
def test_truncated_stream_is_an_unexpected_end(length, where):
    with pytest.raises(TarFormatError, match=f"unexpected end of data in {where}"):
        _entries(TWO_FILES[:length])


@pytest.mark.parametrize("length", [512 + 300, 512 + 600 + 10])
def test_truncated_data_is_an_unexpected_end_when_skipped_too(length):
    with pytest.raises(TarFormatError, match="unexpected end of data in an entry's data"):
        _skip_all(TWO_FILES[:length])


def test_truncated_pax_header_data_is_an_unexpected_end():
    archive = _archive(tarfile.PAX_FORMAT, [(_info("p/" * 200 + "f"), b"")])
    assert archive[TYPE : TYPE + 1] == tarfile.XHDTYPE and int(archive[SIZE : SIZE + 11], 8) > 400

    with pytest.raises(TarFormatError, match="unexpected end of data in PAX header"):
        _skip_all(archive[: 512 + 200])


BAD_PAX_RECORDS = [
    pytest.param(b"13 path=foo\n", id="length-past-the-end"),
    pytest.param(b"11 path=foo\n", id="length-short-of-newline"),
    pytest.param(b"30 path=foo\n" + bytes(40), id="length-into-padding"),
    pytest.param(b"11 pathfoo\n", id="no-equals"),
    pytest.param(b"10 =value\n", id="empty-key"),
    pytest.param(b"12 path=foo!", id="no-trailing-newline"),
    pytest.param(b"x2 path=foo\n", id="length-not-a-number"),
    pytest.param(b"12path=foo\n", id="no-space-after-length"),
    pytest.param(b"path=foo\n", id="no-length"),
    pytest.param(b"-12 path=fo\n", id="negative-length"),
    pytest.param(b"0 \n", id="zero-length"),
    pytest.param(b"12 path=foo\ngarbage", id="garbage-after-a-good-record"),
]


@pytest.mark.parametrize("data", BAD_PAX_RECORDS)
def test_parse_pax_refuses_malformed_records(data):
    with pytest.raises(TarFormatError, match="bad PAX record"):
        parse_pax(data)


@pytest.mark.parametrize("data", BAD_PAX_RECORDS)
def test_malformed_pax_record_in_an_archive_is_an_error(data):
    archive = _member(_info("hdr", tarfile.XHDTYPE), data) + _member(_info("f"), b"f") + END

    with pytest.raises(TarFormatError, match="bad PAX record"):
        _skip_all(archive)


def test_parse_pax_reads_records_values_as_bytes_and_stops_at_nul_padding():
    data = (
        _pax_record(b"path", "ü/x".encode())
        + _pax_record(b"SCHILY.xattr.user.a", b"k=v\nmore\xff")
        + _pax_record(b"comment", b"")
        + bytes(100)
    )

    assert parse_pax(data) == {
        "path": "ü/x".encode(),
        "SCHILY.xattr.user.a": b"k=v\nmore\xff",
        "comment": b"",
    }


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1600000000.123456789", 1_600_000_000_123_456_789),
        ("1600000000", 1_600_000_000_000_000_000),
        ("1600000000.5", 1_600_000_000_500_000_000),
        ("1.1234567899", 1_123_456_789),  # beyond nanoseconds: truncated
        ("-1.5", -1_500_000_000),
        ("-0.25", -250_000_000),
        ("0", 0),
    ],
)
def test_pax_time_is_exact_in_nanoseconds(text, ns):
    assert pax_time_ns(text.encode()) == ns


# "\u0661" is ARABIC-INDIC DIGIT ONE: a digit to str.isdigit, not to a tar reader.
@pytest.mark.parametrize("text", ["", "abc", "1.x", "1e9", "+1", " 1", "1_0", "\u0661", "1.\u0661"])
def test_pax_time_refuses_non_numbers(text):
    with pytest.raises(TarFormatError, match="bad PAX time"):
        pax_time_ns(text.encode())


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(b"0000000001x\0", id="trailing-letter"),
        pytest.param(b"00000000089\0", id="digits-8-9"),
        pytest.param(b"zzzzzzzzzzz\0", id="letters"),
        pytest.param(b"00000 00001\0", id="inner-space"),
        pytest.param(b"0000_000001\0", id="underscore"),
        pytest.param(b"+0000000001\0", id="plus-sign"),
    ],
)
def test_non_octal_size_field_is_an_error(field):
    archive = _patch(_member(_info("f"), b"x") + END, SIZE, field)

    with pytest.raises(TarFormatError, match="bad size field"):
        _skip_all(archive)


def test_negative_size_of_a_file_is_an_error():
    archive = _patch(_member(_info("f"), b"x") + END, SIZE, b"-0000000001\0")

    with pytest.raises(TarFormatError, match="size"):
        _skip_all(archive)


@pytest.mark.parametrize(
    "size", [b"-0000001000\0", b"\xff" * 10 + b"\xfe\x00"], ids=["octal", "b256"]
)
def test_negative_size_of_a_pax_header_is_an_error(size):
    pax = _patch(_member(_info("hdr", tarfile.XHDTYPE)), SIZE, size)  # -512
    archive = _member(_info("first")) + pax + bytes(512) + _member(_info("victim"), b"v") + END

    with pytest.raises(TarFormatError):
        _skip_all(archive)


@pytest.mark.parametrize(
    "archive",
    [
        pytest.param(
            _patch(_member(_info("sparse"), b"s") + END, TYPE, tarfile.GNUTYPE_SPARSE),
            id="gnu-S",
        ),
        pytest.param(
            _archive(
                tarfile.PAX_FORMAT,
                [(_info("f", pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}), b"")],
            ),
            id="pax-per-entry",
        ),
        pytest.param(
            _archive(
                tarfile.PAX_FORMAT, [(_info("f"), b"")], pax_headers={"GNU.sparse.major": "1"}
            ),
            id="pax-global",
        ),
    ],
)
def test_sparse_files_are_refused(archive):
    with pytest.raises(TarFormatError, match="sparse"):
        _skip_all(archive)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(_member(_info("hdr", tarfile.XHDTYPE), _pax_record(b"path", b"x")), id="pax"),
        pytest.param(_member(_info("hdr", tarfile.GNUTYPE_LONGNAME), b"x\0"), id="gnu-long-name"),
        pytest.param(_member(_info("hdr", tarfile.GNUTYPE_LONGLINK), b"x\0"), id="gnu-long-link"),
    ],
)
@pytest.mark.parametrize("end", [END, b""], ids=["end-blocks", "eof"])
def test_extended_header_followed_by_end_of_archive_is_an_error(header, end):
    archive = _member(_info("first")) + header + end

    with pytest.raises(TarFormatError, match="ends after an extended header"):
        _skip_all(archive)


def test_pax_header_larger_than_1_mib_is_refused():
    big = _info("big", pax_headers={"comment": "c" * (1 << 20)})

    with pytest.raises(TarFormatError, match="PAX header of 10485"):
        _skip_all(_archive(tarfile.PAX_FORMAT, [(big, b"")]))


def test_pax_header_just_under_1_mib_is_accepted():
    big = _info("big", pax_headers={"comment": "c" * ((1 << 20) - 100)})
    archive = _archive(tarfile.PAX_FORMAT, [(big, b"")])
    assert 1 << 20 > int(archive[SIZE : SIZE + 11], 8) > (1 << 20) - 100

    assert _skip_all(archive) == ["big"]


def test_gnu_long_name_larger_than_1_mib_is_refused():
    huge = _member(_info("hdr", tarfile.GNUTYPE_LONGNAME), b"n" * ((1 << 20) + 1))

    with pytest.raises(TarFormatError, match="GNU long name of 1048577"):
        _skip_all(huge + _member(_info("f")) + END)


# -- 6. base-256 numbers -------------------------------------------------------------


def test_gnu_base256_uid_and_negative_mtime_read_back():
    archive = _archive(tarfile.GNU_FORMAT, [(_info("f", uid=2**40, gid=7, mtime=-1000), b"hi")])
    # tarfile wrote base-256: a marker bit, then two's complement for the negative one.
    assert archive[UID : UID + 8] == b"\x80" + (2**40).to_bytes(7, "big")
    assert archive[MTIME : MTIME + 12] == b"\xff" + (-1000).to_bytes(11, "big", signed=True)
    [member] = _tarfile_members(archive)
    assert (member.uid, member.mtime) == (2**40, -1000)

    [(entry, data)] = _entries(archive)

    assert (entry.uid, entry.gid, entry.mtime_ns, data) == (2**40, 7, -1000 * 10**9, b"hi")


def _base256(value: int, width: int) -> bytes:
    raw = bytearray(value.to_bytes(width, "big", signed=True))
    raw[0] |= 0x80
    return bytes(raw)


@pytest.mark.parametrize(
    ("offset", "width", "value", "field"),
    [
        pytest.param(UID, 8, 2**55 + 3, "uid", id="uid-large"),
        pytest.param(GID, 8, 1, "gid", id="gid-small"),
        pytest.param(MTIME, 12, -(2**40), "mtime_ns", id="mtime-negative"),
        pytest.param(MTIME, 12, -1, "mtime_ns", id="mtime-minus-one"),
        pytest.param(SIZE, 12, 5, "size", id="size"),
    ],
)
def test_hand_written_base256_fields_read_back(offset, width, value, field):
    archive = _patch(_member(_info("f"), b"hello") + END, offset, _base256(value, width))

    [(entry, data)] = _entries(archive)

    expected = value * 10**9 if field == "mtime_ns" else value
    assert getattr(entry, field) == expected
    assert data == b"hello"


# -- 7. and 8. v7 directories, the ustar prefix --------------------------------------


def _v7(archive: bytes, kind: bytes) -> bytes:
    """A ustar member turned v7: no magic, version, owner names; *kind* as typeflag."""
    archive = _patch(archive, MAGIC, bytes(8 + 64))
    return _patch(archive, TYPE, kind)


def test_v7_file_with_a_trailing_slash_is_a_directory():
    dir_as_file = _v7(_member(_info("d", tarfile.DIRTYPE)), b"\0")
    assert dir_as_file[:3] == b"d/\0"

    entries = _entries(dir_as_file + _v7(_member(_info("f"), b"x"), b"\0") + END)

    got = [(e.name, e.type, e.isdir(), data) for e, data in entries]
    assert got == [("d", b"5", True, b""), ("f", b"\0", False, b"x")]


def test_v7_file_without_a_trailing_slash_stays_a_regular_file():
    [(entry, data)] = _entries(_v7(_member(_info("f"), b"x"), b"\0") + END)

    assert (entry.name, entry.type, entry.isreg(), data) == ("f", b"\0", True, b"x")


def test_ustar_prefix_and_name_are_joined():
    path = "p" * 40 + "/" + "q" * 40 + "/" + "r" * 68  # 150 chars: must be split
    archive = _archive(tarfile.USTAR_FORMAT, [(_info(path), b"data")])
    assert archive[PREFIX : PREFIX + 81] == path[:81].encode()

    assert [(e.name, data) for e, data in _entries(archive)] == [(path, b"data")]


def test_prefix_field_is_ignored_under_gnu_magic():
    archive = _archive(tarfile.GNU_FORMAT, [(_info("name"), b"data")])
    assert archive[MAGIC : MAGIC + 8] == b"ustar  \0"
    archive = _patch(archive, PREFIX, b"not-a-prefix")

    assert [(e.name, data) for e, data in _entries(archive)] == [("name", b"data")]


# -- 9. global PAX headers -----------------------------------------------------------


def test_global_pax_xattr_applies_to_every_later_entry_unless_overridden():
    items = [
        (_info("a"), b"a"),
        (_info("b", pax_headers={"SCHILY.xattr.user.g": "local"}), b"b"),
        (_info("c", tarfile.DIRTYPE), b""),
    ]
    archive = _archive(tarfile.PAX_FORMAT, items, pax_headers={"SCHILY.xattr.user.g": "global"})
    assert archive[TYPE : TYPE + 1] == tarfile.XGLTYPE

    got = {e.name: e.xattrs for e, _ in _entries(archive)}

    assert got == {
        "a": {"user.g": b"global"},
        "b": {"user.g": b"local"},
        "c": {"user.g": b"global"},
    }


def test_global_pax_header_mid_archive_applies_only_to_entries_after_it():
    archive = (
        _member(_info("before"), b"1")
        + _member(_info("glob", tarfile.XGLTYPE), _pax_record(b"SCHILY.xattr.user.g", b"\xff"))
        + _member(_info("after"), b"2")
        + _member(_info("later"), b"3")
        + END
    )

    got = [(e.name, e.xattrs, data) for e, data in _entries(archive)]

    assert got == [
        ("before", {}, b"1"),
        ("after", {"user.g": b"\xff"}, b"2"),
        ("later", {"user.g": b"\xff"}, b"3"),
    ]


def test_per_entry_pax_header_applies_to_one_entry_only():
    archive = (
        _member(_info("hdr", tarfile.XHDTYPE), _pax_record(b"path", "renamed-ü".encode()))
        + _member(_info("orig"), b"1")
        + _member(_info("next"), b"2")
        + END
    )

    assert [(e.name, data) for e, data in _entries(archive)] == [
        ("renamed-ü", b"1"),
        ("next", b"2"),
    ]


def _pax_member(records: bytes, name: str = "f", data: bytes = b"x") -> bytes:
    """A hand-made PAX header carrying *records*, then the entry it describes."""
    return _member(_info("pax", tarfile.XHDTYPE), records) + _member(_info(name), data) + END


@pytest.mark.parametrize("key", ["size", "uid", "gid"])
@pytest.mark.parametrize("value", [b"+1", b"-1", b"1_0", b" 1", b"0x1", b""])
def test_pax_numbers_are_plain_decimal_digits(key, value):
    body = f" {key}=".encode() + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    record = str(length).encode() + body
    assert parse_pax(record) == {key: value}  # the record itself is well formed

    with pytest.raises(TarFormatError, match=f"bad PAX {key}"):
        _skip_all(_pax_member(record))


# -- FileSource: a tar read by position from a file ------------------------------------


def _file_source(tmp_path, data: bytes, charge=None) -> tuple[FileSource, int]:
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return FileSource(fd, charge), fd


@pytest.mark.parametrize("size", [0, 1, 511, 16 << 10, 100_000, 3 << 20])
def test_file_source_copies_entries_of_every_size_like_a_stream(tmp_path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    archive = _archive(tarfile.PAX_FORMAT, [(_info("small"), b"s"), (_info("big"), data)])
    source, fd = _file_source(tmp_path, archive)
    sent: list[int] = []
    source.on_copy = sent.append
    try:
        reader = Reader(source)
        copied = []
        while (entry := reader.next()) is not None:
            out = tmp_path / entry.name
            with out.open("wb") as fh:
                reader.copy_to(fh.fileno())
            copied.append(out.read_bytes())
        assert copied == [b"s", data]
        assert sum(sent) == 1 + size  # every byte copied is reported to on_copy
    finally:
        os.close(fd)


def test_file_source_charges_every_byte_it_hands_out(tmp_path) -> None:
    archive = _archive(tarfile.USTAR_FORMAT, [(_info("a"), RANDOM_100K)])
    charged: list[int] = []
    source, fd = _file_source(tmp_path, archive, charged.append)
    try:
        reader = Reader(source)
        with open(os.devnull, "wb") as null:
            while reader.next() is not None:
                reader.copy_to(null.fileno())
        # The header, the data with its padding, and the first end-of-archive block.
        assert sum(charged) == 512 + 100_352 + 512
    finally:
        os.close(fd)


def test_file_source_truncated_data_is_a_format_error(tmp_path) -> None:
    archive = _archive(tarfile.USTAR_FORMAT, [(_info("a"), RANDOM_100K)])[:60_000]
    source, fd = _file_source(tmp_path, archive)
    try:
        reader = Reader(source)
        reader.next()
        with (
            open(os.devnull, "wb") as null,
            pytest.raises(TarFormatError, match="unexpected end of data in entry"),
        ):
            reader.copy_to(null.fileno())
    finally:
        os.close(fd)


def test_file_source_skips_unread_data_without_reading_it(tmp_path) -> None:
    archive = _archive(tarfile.PAX_FORMAT, [(_info("a"), RANDOM_100K), (_info("b"), b"x")])
    charged: list[int] = []
    source, fd = _file_source(tmp_path, archive, charged.append)
    try:
        reader = Reader(source)
        names = []
        while (entry := reader.next()) is not None:
            names.append(entry.name)
        assert names == ["a", "b"]
        stream = io.BytesIO(archive)
        assert _skip_all(archive) == names
        streamed = Reader(stream)
        while streamed.next() is not None:
            pass
        assert sum(charged) == stream.tell()  # every byte a stream would have read
    finally:
        os.close(fd)


@pytest.mark.parametrize("length", [512 + 300, 512 + 600 + 10])
def test_file_source_truncated_data_is_an_unexpected_end_when_skipped(tmp_path, length) -> None:
    source, fd = _file_source(tmp_path, TWO_FILES[:length])
    try:
        reader = Reader(source)
        with pytest.raises(TarFormatError, match="unexpected end of data in an entry's data"):
            while reader.next() is not None:
                pass
    finally:
        os.close(fd)
