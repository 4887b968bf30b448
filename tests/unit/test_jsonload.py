"""Untrusted JSON: size and depth bounds, each named in the message."""

import pytest

from grootfs_py import jsonload
from grootfs_py.errors import ConfigError, ImageSourceError

OK = [
    (b'{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}),
    ("[" * 100 + "]" * 100, eval("[" * 100 + "]" * 100)),  # exactly the bound
    (b'{"s": "' + b"[" * 500 + b'"}', {"s": "[" * 500}),  # brackets in strings don't nest
    (b'{"s": "\\"' + b"[" * 500 + b'"}', {"s": '"' + "[" * 500}),  # nor after an escaped quote
    ('{"a": 1}'.encode("utf-16"), {"a": 1}),
]


@pytest.mark.parametrize(("data", "value"), OK)
def test_documents_within_the_bounds_load(data, value):
    assert jsonload.loads(data, "doc", max_bytes=1 << 20) == value


BAD = [
    (b"[" * 101 + b"]" * 101, "invalid doc: nested deeper than 100 levels"),
    (b"[" * 100_000, "invalid doc: nested deeper than 100 levels"),
    (b'{"a":' * 100_000, "invalid doc: nested deeper than 100 levels"),
    (b"x" * (1 << 20) + b"x", "invalid doc: larger than 1048576 bytes"),
    (b"{", "invalid doc: not JSON"),
    (b"\xff\xfe\x00", "invalid doc: not JSON"),
    (b"", "invalid doc: not JSON"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_documents_past_a_bound_say_which(data, message):
    with pytest.raises(ImageSourceError) as caught:
        jsonload.loads(data, "doc", max_bytes=1 << 20)
    assert str(caught.value) == message


def test_the_error_kind_is_the_callers():
    with pytest.raises(ConfigError):
        jsonload.loads("[" * 200, "config file", max_bytes=1024, error=ConfigError)


def test_encoded_surrogates_are_not_json_as_for_the_json_module():
    with pytest.raises(ImageSourceError, match="not JSON"):
        jsonload.loads(b'{"a": "\xed\xa0\x80"}', "doc", max_bytes=1024)
