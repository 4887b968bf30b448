"""Time ``grootfs create`` of the Debian image on this machine and print a table.

(a) warm create (layers already in the store) against bare interpreter
    start-up, (b) cold create (layers unpacked again) against umoci's unpack
    of the same layout, (c) peak RSS of the cold create. Medians over N runs.

Run with the project's venv as root, after ``demo/build-debian-image``
(``make bench`` does both).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUT = REPO / ".cache" / "debian-bookworm-oci"
TAG = "bookworm"
IMAGE = f"oci://{LAYOUT}:{TAG}"
STORE_SIZE = 4 * 1024**3
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu_seconds: float  # user + system of the process and its threads
    max_rss_kib: int


def timed(argv: Sequence[str]) -> Sample:
    """Run *argv* to completion; wall time, the child's CPU time and its peak RSS."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            out.seek(0)
            sys.exit(f"bench: {' '.join(argv)} exited {proc.returncode}:\n{out.read().decode()}")
    return Sample(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def run(argv: Sequence[str]) -> str:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(
            f"bench: {' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


@contextmanager
def loop_xfs(path: Path) -> Iterator[Path]:
    """An empty XFS filesystem mounted at *path*, for umoci to unpack into.

    grootfs unpacks into its own loop XFS store; umoci gets the same kind of
    filesystem so that the comparison is about the unpackers.
    """
    backing = path.with_name(path.name + ".img")
    with backing.open("wb") as f:
        f.truncate(STORE_SIZE)
    run(["mkfs.xfs", "-q", str(backing)])
    path.mkdir()
    run(["mount", "-o", "loop,noatime", str(backing), str(path)])
    try:
        yield path
    finally:
        run(["umount", str(path)])
        backing.unlink()


def median(samples: list[Sample]) -> float:
    return statistics.median(s.seconds for s in samples)


def print_rows(rows: list[tuple[str, str]]) -> None:
    """Print (name, value) rows with the values lined up."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def setup(description: str, default_repetitions: int) -> int:
    """Parse -n, check what every benchmark needs, compile the package; the repetitions."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-n", "--repetitions", type=int, default=default_repetitions)
    reps: int = parser.parse_args().repetitions
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    if not (LAYOUT / "index.json").exists():
        sys.exit("bench: no Debian image: run demo/build-debian-image first")
    # An installed package carries its bytecode; with PYTHONDONTWRITEBYTECODE set
    # (as on this machine) an editable checkout would be compiled on every run.
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")])
    return reps


def main() -> int:
    reps = setup(__doc__.splitlines()[0], default_repetitions=9)
    work = Path(tempfile.mkdtemp(prefix="grootfs-bench-"))
    store = work / "store"
    grootfs = [str(BIN / "grootfs"), "--store", str(store), "--log-file", str(work / "log")]
    try:
        run([*grootfs, "init-store", "--store-size-bytes", str(STORE_SIZE)])

        # (b) first, so that its first run also warms the store for (a).
        cold: list[Sample] = []
        for i in range(reps):
            cold.append(timed([*grootfs, "create", IMAGE, f"cold-{i}"]))
            run([*grootfs, "delete", f"cold-{i}"])
            run([*grootfs, "clean"])
            if any((store / "volumes").iterdir()):
                sys.exit("bench: `grootfs clean` left layers in the store: cold runs would be warm")
        umoci: list[Sample] = []
        raw: list[Sample] = []
        with loop_xfs(work / "umoci") as target:
            for samples, cmd in ((umoci, ["unpack"]), (raw, ["raw", "unpack"])):
                for _ in range(reps):
                    dest = target / "bundle"
                    samples.append(timed(["umoci", *cmd, "--image", f"{LAYOUT}:{TAG}", str(dest)]))
                    shutil.rmtree(dest)

        run([*grootfs, "create", IMAGE, "warm-up"])
        warm: list[Sample] = []
        for i in range(reps):
            warm.append(timed([*grootfs, "create", IMAGE, f"warm-{i}"]))
            run([*grootfs, "delete", f"warm-{i}"])
        run([*grootfs, "delete", "warm-up"])
        python = [timed([sys.executable, "-c", "pass"]) for _ in range(reps)]
        bare = [timed([sys.executable, "-I", "-S", "-c", "pass"]) for _ in range(reps)]
    finally:
        subprocess.run([*grootfs, "delete-store"], stdin=subprocess.DEVNULL, check=False)
        shutil.rmtree(work, ignore_errors=True)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:9.1f} ms"

    w, p, b = median(warm), median(python), median(bare)
    c, u, r = median(cold), median(umoci), median(raw)
    rss = [s.max_rss_kib / 1024 for s in cold]
    rows = [
        ("(a) warm create (layers cached)", ms(w)),
        ("    python3 -c pass", ms(p)),
        ("    python3 -I -S -c pass", ms(b)),
        ("    warm create / python3 -c pass", f"{w / p:9.2f} x"),
        ("    warm create / python3 -I -S -c pass", f"{w / b:9.2f} x"),
        ("(b) cold create (empty store)", ms(c)),
        ("    umoci unpack", ms(u)),
        ("    umoci raw unpack (no mtree, no config)", ms(r)),
        ("    cold create / umoci unpack", f"{c / u:9.2f} x"),
        ("    cold create / umoci raw unpack", f"{c / r:9.2f} x"),
        ("(c) cold create peak RSS, median", f"{statistics.median(rss):9.1f} MiB"),
        ("    cold create peak RSS, max", f"{max(rss):9.1f} MiB"),
    ]
    print(f"grootfs create of {IMAGE}")
    print(f"medians of {reps} runs; {os.cpu_count()} CPUs; {sys.executable}\n")
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
