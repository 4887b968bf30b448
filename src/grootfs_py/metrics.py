"""Metrics for Loggregator: dropsonde v1 envelopes over UDP, fire and forget.

Each metric is one datagram holding one ``events.Envelope`` (origin
``grootfs``, eventType ValueMetric, a timestamp in ns, and the ValueMetric's
name, value and unit), as GrootFS sends them to the cell's loggregator agent
at ``metron_endpoint``. The protobuf is written by hand here (four envelope
fields, three metric fields) so that no protobuf library is imported.

Metrics are recorded while a command runs (a list append) and sent by
:func:`flush` once its answer is out. Nothing here raises: a metric that
cannot be sent is dropped, with one error line for the whole command.
Without an endpoint every call returns at once.

The endpoint must be an IP address (or ``localhost``) and a port: a host name
would need a DNS lookup on every plugin call, which can block for seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from grootfs_py import log

ORIGIN = "grootfs"
NANOS = "nanos"
BYTES = "bytes"
PERCENTAGE = "percentage"
SECONDS = "seconds"

_target: tuple[str, int] | None = None
_family = 0
_pending: list[bytes] = []


def configure(endpoint: str) -> None:
    """Send to *endpoint* (``ip:port``, ``[ipv6]:port`` or ``localhost:port``); "" sends nothing."""
    global _target, _family
    _target = None
    _pending.clear()
    if not endpoint:
        return
    # The C module: the socket package costs milliseconds to import (selectors, enum...).
    import _socket as socket

    host, sep, port_text = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address takes brackets, as Go's host:port does
    if host == "localhost":
        host = "127.0.0.1"
    family = 0
    for candidate in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(candidate, host)
        except OSError:
            continue
        family = candidate
        break
    port = int(port_text) if sep and port_text.isdigit() else 0
    if not family or not 0 < port < 65536:
        log.error(
            "metrics disabled",
            endpoint=endpoint,
            error="metron_endpoint must be <ip address>:<port>",
        )
        return
    _target, _family = (host, port), family


def enabled() -> bool:
    return _target is not None


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _double(x: float) -> bytes:
    import struct  # only once metrics are on; then a sys.modules lookup

    return struct.pack("<d", x)


def _string(tag: int, text: str) -> bytes:
    data = text.encode()
    return bytes((tag,)) + _varint(len(data)) + data


# Envelope field 1 (origin, length-delimited) and field 2 (eventType, varint) = 6.
_HEAD = _string(0x0A, ORIGIN) + b"\x10\x06"


def envelope(name: str, value: float, unit: str, timestamp_ns: int) -> bytes:
    """One ``events.Envelope`` carrying a ValueMetric, in protobuf wire format."""
    metric = (
        _string(0x0A, name)  # ValueMetric.name = 1
        + b"\x11"  # ValueMetric.value = 2, 64-bit
        + _double(float(value))
        + _string(0x1A, unit)  # ValueMetric.unit = 3
    )
    return (
        _HEAD
        + b"\x30"  # Envelope.timestamp = 6, varint
        + _varint(timestamp_ns)
        + b"\x4a"  # Envelope.valueMetric = 9, length-delimited
        + _varint(len(metric))
        + metric
    )


def value(name: str, amount: float, unit: str) -> None:
    """Record a metric to send at :func:`flush`."""
    if _target is None:
        return
    _pending.append(envelope(name, amount, unit, time.time_ns()))


def nanos_since(name: str, start_ns: int) -> None:
    """Record the nanoseconds since *start_ns* (a ``time.monotonic_ns()``)."""
    if _target is not None:
        value(name, time.monotonic_ns() - start_ns, NANOS)


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Record how long the block took, even when it raises (as GrootFS does)."""
    if _target is None:
        yield
        return
    start = time.monotonic_ns()
    try:
        yield
    finally:
        nanos_since(name, start)


class LockWait:
    """The times a command waited for locks of one kind (thread-safe: appends only)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples: list[int] = []

    def add(self, waited_ns: int) -> None:
        if _target is not None:
            self.samples.append(waited_ns)

    def record_each(self) -> None:
        for sample in self.samples:
            value(self.name, sample, NANOS)
        self.samples.clear()

    def record_total(self) -> None:
        if self.samples:
            value(self.name, sum(self.samples), NANOS)
        self.samples.clear()


# GrootFS's names for the time spent getting the store's locks.
SHARED_LOCKS = LockWait("SharedLockingTime")
EXCLUSIVE_LOCKS = LockWait("ExclusiveLockingTime")


def flush() -> None:
    """Send what was recorded, one datagram each, never blocking and never raising."""
    if _target is None or not _pending:
        return
    import _socket as socket

    batch = list(_pending)
    _pending.clear()
    try:
        sock = socket.socket(_family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        log.error("send metrics: open socket", endpoint=_endpoint_text(), error=exc.strerror)
        return
    failure: OSError | None = None
    try:
        for datagram in batch:
            try:
                sock.sendto(datagram, _target)
            except OSError as exc:  # full buffer, no route, refused: the metric is lost
                failure = failure or exc
    finally:
        sock.close()
    if failure is not None:
        log.error(
            "send metrics: some were dropped",
            endpoint=_endpoint_text(),
            error=failure.strerror or str(failure),
        )


def _endpoint_text() -> str:
    return f"{_target[0]}:{_target[1]}" if _target else ""
