"""A fake loggregator agent: dropsonde datagrams received on loopback, decoded independently.

The decoder is the protobuf library's, built from ``tests/dropsonde.proto``
(written from the public dropsonde-protocol schema) by the protoc that
grpcio-tools bundles, at first use: none of the project's encoder is used to
read what it sent. Decoding is strict: anything but a ValueMetric envelope
from ``grootfs`` with a timestamp, or any field the schema does not name,
fails the test.
"""

from __future__ import annotations

import functools
import importlib.util
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).with_name("dropsonde.proto")
SO_RCVBUFFORCE = 33  # Linux's number; Python's socket module does not name it


@functools.cache
def events() -> ModuleType:
    """The ``dropsonde_pb2`` module generated from PROTO."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="dropsonde-pb2-")
    status = protoc.main(
        ["protoc", f"-I{PROTO.parent}", f"--python_out={out}", PROTO.name]  # argv[0] is ignored
    )
    assert status == 0, f"protoc could not compile {PROTO}"
    spec = importlib.util.spec_from_file_location("dropsonde_pb2", Path(out) / "dropsonde_pb2.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str
    timestamp_ns: int


def decode(datagram: bytes) -> Metric:
    """One datagram as the agent reads it; AssertionError unless it is a well-formed metric."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    pb = events()
    envelope = pb.Envelope.FromString(datagram)  # raises on missing required fields
    assert envelope.origin == "grootfs"
    assert envelope.eventType == pb.Envelope.ValueMetric
    assert envelope.HasField("timestamp") and envelope.HasField("valueMetric")
    fields = {f.name for f, _ in envelope.ListFields()}
    assert fields == {"origin", "eventType", "timestamp", "valueMetric"}, fields
    metric = envelope.valueMetric
    assert len(UnknownFieldSet(envelope)) == 0 and len(UnknownFieldSet(metric)) == 0
    return Metric(metric.name, metric.value, metric.unit, envelope.timestamp)


class Agent:
    """A UDP socket on 127.0.0.1 (a free port unless given) collecting metrics."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for bursts of hundreds of datagrams (root may pass rmem_max).
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", port))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def receive(
        self,
        until: Callable[[list[Metric]], bool] | None = None,
        *,
        timeout: float = 10.0,
        quiet: float = 0.3,
    ) -> list[Metric]:
        """What arrives until *until* holds (or *timeout*), then until *quiet* s pass silently."""
        got: list[Metric] = []
        deadline = time.monotonic() + timeout
        while True:
            done = until is None or until(got)
            wait = quiet if done else deadline - time.monotonic()
            if wait <= 0:
                return got
            self.sock.settimeout(wait)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if done:
                    return got
                continue  # the deadline has passed: the next turn returns
            got.append(decode(data))

    def close(self) -> None:
        self.sock.close()


def names(metrics: list[Metric]) -> list[str]:
    return [m.name for m in metrics]


def one(metrics: list[Metric], name: str) -> Metric:
    found = [m for m in metrics if m.name == name]
    assert len(found) == 1, f"{name}: {len(found)} sent, in {names(metrics)}"
    return found[0]
