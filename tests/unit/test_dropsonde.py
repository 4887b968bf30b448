"""The dropsonde encoder, read back by the protobuf library (tests/agent.py), and the sender."""

from __future__ import annotations

import math
import socket
import time

import pytest

import agent as a
from grootfs_py import metrics


@pytest.fixture(autouse=True)
def _no_endpoint_after():
    yield
    metrics.configure("")


@pytest.mark.parametrize(
    ("name", "value", "unit", "timestamp_ns"),
    [
        ("ImageCreationTime", 6_626_207, "nanos", 1_796_035_483_230_159_653),
        ("UsedLayersSize", 198_892_191, "bytes", 1),
        ("UnusedLayersSize", 0, "bytes", 0),
        ("DiskCachePercentage", 4.6875, "percentage", 2**62),
        ("OldestUnusedLayerAge", 3600.25, "seconds", 2**63 - 1),
        ("negative", -1.5, "x", 1_700_000_000_000_000_000),
        ("huge", 1e300, "bytes", 127),
        ("two-byte-lengths-" + "n" * 200, 1.0, "u" * 130, 128),
        ("unicodé", 2.0, "µs", 300),
    ],
)
def test_an_envelope_decodes_to_what_was_encoded(name, value, unit, timestamp_ns):
    metrics.configure("127.0.0.1:9")
    got = a.decode(metrics.envelope(name, value, unit, timestamp_ns))
    assert got == a.Metric(name, value, unit, timestamp_ns)


def test_an_envelope_has_the_fields_in_grootfs_order_and_nothing_else():
    # Go's encoder writes fields by number: origin 1, eventType 2, timestamp 6,
    # valueMetric 9 {name 1, value 2, unit 3}. Same bytes as GrootFS 0.30 sends.
    metrics.configure("127.0.0.1:9")
    data = metrics.envelope("UsedLayersSize", 1.0, "bytes", 300)
    assert data == (
        b"\x0a\x07grootfs\x10\x06\x30\xac\x02\x4a\x20"
        b"\x0a\x0eUsedLayersSize\x11\x00\x00\x00\x00\x00\x00\xf0\x3f\x1a\x05bytes"
    )


def test_a_nan_survives_the_round_trip():
    metrics.configure("127.0.0.1:9")
    assert math.isnan(a.decode(metrics.envelope("n", math.nan, "u", 1)).value)


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("127.0.0.1:3457", ("127.0.0.1", 3457)),
        ("localhost:3457", ("127.0.0.1", 3457)),
        ("[::1]:3457", ("::1", 3457)),
        ("10.0.16.5:1", ("10.0.16.5", 1)),
    ],
)
def test_an_ip_address_and_port_turn_metrics_on(endpoint, target):
    metrics.configure(endpoint)
    assert metrics.enabled()
    assert metrics._target == target


@pytest.mark.parametrize(
    "endpoint",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:port",
        "metron.service.cf.internal:3457",  # a DNS lookup on every call: refused
        "udp://127.0.0.1:3457",
        "::1:3457",
    ],
)
def test_anything_else_leaves_metrics_off_without_failing(endpoint):
    metrics.configure(endpoint)
    assert not metrics.enabled()
    metrics.value("UsedLayersSize", 1, metrics.BYTES)
    metrics.flush()  # nothing recorded, nothing sent, no error


def test_metrics_are_sent_at_flush_one_datagram_each():
    agent = a.Agent()
    try:
        metrics.configure(agent.endpoint)
        before = time.time_ns()
        metrics.value("UsedLayersSize", 10, metrics.BYTES)
        metrics.nanos_since("ImageCreationTime", time.monotonic_ns() - 5_000_000)
        with metrics.timed("UnpackTime"):
            time.sleep(0.01)
        after = time.time_ns()
        agent.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            agent.sock.recv(65536)  # nothing before flush
        metrics.flush()
        got = agent.receive(lambda got: len(got) == 3)
    finally:
        agent.close()
    assert a.names(got) == ["UsedLayersSize", "ImageCreationTime", "UnpackTime"]
    assert got[0].value == 10 and got[0].unit == "bytes"
    assert 5_000_000 <= got[1].value < 1_000_000_000 and got[1].unit == "nanos"
    assert 10_000_000 <= got[2].value < 1_000_000_000 and got[2].unit == "nanos"
    assert all(before <= m.timestamp_ns <= after for m in got)


def test_lock_waits_are_sent_one_each_or_summed():
    agent = a.Agent()
    try:
        metrics.configure(agent.endpoint)
        waits = metrics.LockWait("SharedLockingTime")
        for ns in (100, 200, 300):
            waits.add(ns)
        waits.record_total()
        waits.record_total()  # once recorded, the samples are gone
        each = metrics.LockWait("ExclusiveLockingTime")
        each.add(7)
        each.add(9)
        each.record_each()
        metrics.flush()
        got = agent.receive(lambda got: len(got) == 3)
    finally:
        agent.close()
    assert [(m.name, m.value) for m in got] == [
        ("SharedLockingTime", 600),
        ("ExclusiveLockingTime", 7),
        ("ExclusiveLockingTime", 9),
    ]


def test_sending_to_nobody_neither_fails_nor_blocks():
    # A port nothing listens on (ICMP port unreachable comes back), many metrics.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    metrics.configure(f"127.0.0.1:{port}")
    for i in range(2000):
        metrics.value("UsedLayersSize", i, metrics.BYTES)
    start = time.perf_counter()
    metrics.flush()
    metrics.value("UsedLayersSize", 1, metrics.BYTES)
    metrics.flush()
    assert time.perf_counter() - start < 2.0  # a blocked send would hang here


def test_one_metric_costs_well_under_a_millisecond():
    agent = a.Agent()
    try:
        metrics.configure(agent.endpoint)
        n = 500
        start = time.perf_counter()
        for i in range(n):
            metrics.value("UsedBackingStoreInBytes", i, metrics.BYTES)
        metrics.flush()
        per_metric = (time.perf_counter() - start) / n
        got = agent.receive(lambda got: len(got) == n, quiet=0.1)
    finally:
        agent.close()
    assert len(got) == n
    print(f"\nrecord + send: {per_metric * 1e6:.1f} µs per metric")
    assert per_metric < 0.001  # loose: the machine is shared; typically 5-25 µs
