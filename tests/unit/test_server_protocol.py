"""The fork server's request format: what parse_request takes, waits for, and refuses."""

import struct

import pytest

from grootfs_py.server import HEADER, MAGIC, VERSION, encode_request, parse_request


def test_a_request_round_trips():
    data = encode_request(["--store", "/s", "stats", "é"], {"A": "1", "B": "x=y"}, 0o027)
    request = parse_request(data)
    assert request is not None
    assert request.argv == ["--store", "/s", "stats", "é"]
    assert request.env == {"A": "1", "B": "x=y"}
    assert request.umask == 0o027


def test_the_servers_parse_leaves_the_environment_to_the_child():
    data = encode_request(["--store", "/s", "stats", "x"], {"A": "1", "NOSIGN": ""}, 0o027)
    request = parse_request(data, environment=False)
    assert request is not None
    assert (request.argv, request.env, request.umask) == (
        ["--store", "/s", "stats", "x"],
        {},
        0o027,
    )


def test_a_partial_request_asks_for_more():
    data = encode_request(["list"], {"PATH": "/bin"}, 0o022)
    for cut in (0, 3, HEADER.size - 1, HEADER.size, len(data) - 1):
        assert parse_request(data[:cut]) is None, cut


def test_environment_entries_without_a_name_or_sign_are_skipped_and_first_wins():
    payload = b"list\0=x\0NOSIGN\0A=1\0A=2\0"
    data = HEADER.pack(MAGIC, VERSION, 0o022, 1, len(payload)) + payload
    request = parse_request(data)
    assert request is not None
    assert request.env == {"A": "1"}


def _with(payload: bytes, *, magic=MAGIC, version=VERSION, argc=1, length=None) -> bytes:
    size = len(payload) if length is None else length
    return HEADER.pack(magic, version, 0o022, argc, size) + payload


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"XXXX", "bad magic"),
        (_with(b"list\0", magic=b"GRFX"), "bad magic"),
        (_with(b"list\0", version=VERSION + 1), "protocol version"),
        (_with(b"", length=(1 << 20) + 1), "request of"),
        (_with(b"list\0") + b"extra", "bytes after"),
        (_with(b"list"), "unterminated"),
        (_with(b"list\0", argc=2), "fewer strings than argc"),
    ],
)
@pytest.mark.parametrize("environment", [True, False], ids=["child", "server"])
def test_malformed_requests_are_refused(data, why, environment):
    with pytest.raises(ValueError, match=why):
        parse_request(data, environment=environment)


def test_umask_keeps_only_permission_bits():
    data = HEADER.pack(MAGIC, VERSION, 0o7777, 0, 0)
    request = parse_request(data)
    assert request is not None
    assert request.umask == 0o777
    assert struct.calcsize(">4sIIII") == HEADER.size == 20
