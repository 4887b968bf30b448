"""Cold ``create`` of a stack tar with two source trees of grootfs, alternating.

For a before/after of a change to the cold path: each run creates the
image from the uncompressed Debian tar on an emptied store (``delete`` and
``clean`` after each, ``sync`` before), with ``PYTHONPATH`` set to one
tree's ``src``, the two trees taking turns and swapping who goes first.
Prints the medians of wall and CPU time (user+sys) and the peak RSS
(through /usr/bin/time, which forks the command from a small process).

    git archive <commit> src | tar -x -C /tmp/before
    .venv/bin/python bench/bench_cold_ab.py /tmp/before/src src -n 7
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_create import STORE_SIZE, run
from bench_hotpath import TARBALL, TIME


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, help="two src directories (grootfs_py inside)")
    parser.add_argument("-n", "--repetitions", type=int, default=7)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    trees = [str(Path(t).resolve()) for t in args.trees]
    for tree in trees:
        run([sys.executable, "-m", "compileall", "-q", tree])
    work = Path(tempfile.mkdtemp(prefix="grootfs-bench-ab-"))
    results: dict[str, list[tuple[float, float, int]]] = {t: [] for t in trees}
    base = [sys.executable, "-m", "grootfs_py", "--store", str(work / "store")]
    env0 = {**os.environ, "PYTHONPATH": trees[1]}  # init-store, delete-store
    try:
        tar = work / "rootfs.tar"
        with tar.open("wb") as out:
            subprocess.run(["gzip", "-dc", str(TARBALL)], stdout=out, check=True)
        subprocess.run(
            [*base, "init-store", "--store-size-bytes", str(STORE_SIZE)],
            stdin=subprocess.DEVNULL,
            env=env0,
            check=True,
        )
        for i in range(args.repetitions):
            for tree in trees if i % 2 == 0 else trees[::-1]:
                env = {**os.environ, "PYTHONPATH": tree}
                run(["sync"])
                run(["sync"])  # what the store's flush left dirty on the host's filesystem
                with tempfile.NamedTemporaryFile("r") as peak:
                    start = time.perf_counter()
                    proc = subprocess.Popen(
                        [TIME, "-f", "%M", "-o", peak.name, "--", *base, "create", str(tar), "c"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        env=env,
                    )
                    _, status, usage = os.wait4(proc.pid, 0)
                    wall = time.perf_counter() - start
                    if status != 0:
                        sys.exit(f"bench: create with {tree} failed")
                    rss = int(peak.read().split()[-1])
                results[tree].append((wall, usage.ru_utime + usage.ru_stime, rss))
                for command in (["delete", "c"], ["clean"]):
                    subprocess.run(
                        [*base, *command], stdout=subprocess.DEVNULL, env=env, check=True
                    )
    finally:
        subprocess.run([*base, "delete-store"], stdin=subprocess.DEVNULL, env=env0, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"cold create of the Debian stack tar, {args.repetitions} runs each, alternating")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for tree, samples in results.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        rss = max(s[2] for s in samples) / 1024
        print(f"{tree}: wall {wall:.3f} s, CPU {cpu:.3f} s (medians), peak RSS {rss:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
