"""What metrics cost: per metric, per command, and as the store grows.

(a) recording and sending one metric, in process, to a listening socket and
    to a port nobody listens on; (b) warm create + delete of the Debian image
    without metron_endpoint, with one nobody listens on, and with a listener,
    interleaved, medians over N runs; (c) the store measurement a create sends
    (layer sizes, committed quota, statfs) with many images in the store.

Run with the project's venv as root, after ``demo/build-debian-image``:
    .venv/bin/python bench/bench_metrics.py -n 15 --images 100
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grootfs_py import metrics, usage
from grootfs_py.store import Store

REPO = Path(__file__).resolve().parent.parent
IMAGE = f"oci://{REPO / '.cache' / 'debian-bookworm-oci'}:bookworm"
GROOTFS = [sys.executable, "-m", "grootfs_py"]


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def per_metric(endpoint: str, n: int = 20_000) -> float:
    metrics.configure(endpoint)
    start = time.perf_counter()
    for i in range(n):
        metrics.value("UsedBackingStoreInBytes", i, metrics.BYTES)
        if i % 20 == 19:  # a command sends about twenty at once
            metrics.flush()
    metrics.flush()
    seconds = (time.perf_counter() - start) / n
    metrics.configure("")
    return seconds


def grootfs(store: str, *args: str) -> None:
    subprocess.run(
        [*GROOTFS, "--store", store, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # the JSON log
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=9, help="runs per variant")
    parser.add_argument("--images", type=int, default=100, help="images in the store for (c)")
    args = parser.parse_args()

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    listening = f"127.0.0.1:{listener.getsockname()[1]}"
    nobody = f"127.0.0.1:{_free_port()}"

    print("(a) one metric, recorded and sent")
    for label, endpoint in (("to a listener", listening), ("to nobody", nobody)):
        print(f"    {label:14} {per_metric(endpoint) * 1e6:7.1f} µs")

    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        store = f"{tmp}/store"
        grootfs(store, "init-store", "--store-size-bytes", str(8 * 1024**3))
        try:
            grootfs(store, "create", IMAGE, "warm")
            variants = {
                "no endpoint": [],
                "nobody listening": ["--metron-endpoint", nobody],
                "agent listening": ["--metron-endpoint", listening],
            }
            times: dict[str, list[float]] = {k: [] for k in variants}
            for i in range(args.n):
                for label, flags in variants.items():
                    start = time.perf_counter()
                    grootfs(store, *flags, "create", IMAGE, f"b{i}")
                    grootfs(store, *flags, "delete", f"b{i}")
                    times[label].append(time.perf_counter() - start)
                    listener.setblocking(False)
                    while True:
                        try:
                            listener.recv(65536)
                        except BlockingIOError:
                            break
            print(f"(b) warm create + delete of the Debian image, median of {args.n}")
            for label, samples in times.items():
                print(f"    {label:18} {statistics.median(samples) * 1e3:7.1f} ms")

            for i in range(args.images):
                grootfs(store, "create", "--without-mount", IMAGE, f"many{i}")
            s = Store(store)
            metrics.configure(nobody)
            samples = []
            for _ in range(max(args.n, 5)):
                start = time.perf_counter()
                usage.send_after_create(s, with_clean=False)
                samples.append(time.perf_counter() - start)
            metrics.flush()
            print(
                f"(c) store measurement after a create, {args.images + 1} images: "
                f"{statistics.median(samples) * 1e3:.2f} ms"
            )
        finally:
            grootfs(store, "delete-store")


if __name__ == "__main__":
    main()
