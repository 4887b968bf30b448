"""grootfs side by side with GrootFS: the plugin calls a Diego cell makes, and a cell's stats load.

Every operation Garden runs is timed through the native shim with
``grootfs serve`` up ("shim"), through the shim with no server (its
fallback, "fallback": hot operations only) and through the Python command
("python"); with ``GROOTFS_REFERENCE=/path/to/grootfs`` (GrootFS, Go) also
through it, with the ratios ours / GrootFS. Operations, all on the Debian
bookworm image (206 MB, 6,753 entries):

- warm create from the stack tar (its layer in the store), delete;
- stats of an image in its store (hit), and of a privileged container in
  the unprivileged store (miss, exit 1: Garden's first try);
- warm create docker:// (layers cached; a manifest GET to a local registry);
- cold create from the stack tar (uncompressed, 206 MB) and cold docker://
  (one 88 MB gzip layer), each on an emptied store, after a ``sync``;
- the cell load: 250 images (200 unprivileged, 50 privileged), ``stats`` as
  Garden's bulk metrics ask it, each container once every 12 s (5 a minute)
  one after the other, a privileged one first in the unprivileged store
  (which fails) then in its own: 1,500 processes a minute. Reported as
  CPU-seconds per minute at that rate (CPU per call x 1,500), with the rate
  achieved: an implementation that cannot keep up would otherwise look
  cheaper per minute than it is.

Wall time: medians. CPU: user + system time of everything the call ran,
as means (a per-call figure through the server is not exact: the server's
process tree's times, its forkers' and the commands they reaped included,
are read from /proc/<pid>/stat in clock ticks and spread over the calls):
for a direct child from wait4(2); through the server, the shim's (wait4)
plus what the server's tree used meanwhile. The implementations alternate
within each repetition, in a rotating order. Each gets two loop-mounted
XFS stores without quotas (unprivileged, privileged), without id mappings.

``BENCH_QUICK=1`` shortens it (fewer repetitions, one 12 s round of the
cell load). Run as root with the project's venv after
``demo/build-debian-image`` and ``make shim`` (``make bench`` does all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_create import BIN, LAYOUT, REPO, STORE_SIZE, TAG, run

import registry as reg
from forkserver import STANDBY, comm

TARBALL = REPO / ".cache" / "debian-bookworm.tgz"
SHIM = REPO / "build" / "grootfs-shim"
TICK = os.sysconf("SC_CLK_TCK")
GARDEN_PERIOD = 12.0  # s between two stats of one container (5 a minute)


@dataclass
class Impl:
    """One way to run the plugin: argv before the subcommand, per store."""

    name: str
    argv: dict[str, list[str]]  # "unpriv" / "priv" -> argv prefix
    env: dict[str, str] | None = None
    server_pid: int = 0  # CPU of this process and its reaped children counts too
    walls: dict[str, list[float]] = field(default_factory=dict)
    cpus: dict[str, list[float]] = field(default_factory=dict)
    rss_kib: dict[str, list[int]] = field(default_factory=dict)  # of direct children only

    def record(self, op: str, wall: float, cpu: float, rss_kib: int = 0) -> None:
        self.walls.setdefault(op, []).append(wall)
        self.cpus.setdefault(op, []).append(cpu)
        self.rss_kib.setdefault(op, []).append(rss_kib)


def descendants(pid: int) -> set[int]:
    """Every process below *pid* (the server's forkers and the commands they run)."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        parent = stack.pop()
        for child in children(parent) - found:
            found.add(child)
            stack.append(child)
    return found


def children(pid: int) -> set[int]:
    """The children of *pid*'s threads (none once it is exiting or gone)."""
    found: set[int] = set()
    # A process that is exiting answers ESRCH, one that is gone ENOENT.
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for task in tasks:
        try:
            found.update(map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split()))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of *pid*, its descendants, and the children they have reaped."""
    total = 0
    for member in (pid, *descendants(pid)):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # utime stime cutime cstime are fields 14-17 (1-based); [0] here is field 3.
        total += sum(int(x) for x in fields[11:15])
    return total / TICK


def settle(pid: int, forkers: set[int], standbys: int) -> None:
    """Wait until every command below *pid* has been reaped, its CPU time with it.

    The shim returns on its command's exit record, which the command sends
    just before it exits; its time reaches its parent's only once reaped.
    The forker then forks the standby that replaces the one the command
    took, which prefaults and then waits under its own name: that is this
    call's cost too, so it is waited for, until *standbys* wait again.
    *forkers*: the processes that stay (the server's forkers).
    """
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        below = descendants(pid) - forkers
        names = [comm(p) for p in below]
        if names.count(STANDBY) == len(names) >= standbys:
            return
        time.sleep(0.0005)


def ready_standbys(pid: int) -> int:
    return [comm(p) for p in descendants(pid)].count(STANDBY)


# A child's peak RSS counts what it shared with its parent between fork and
# exec: this script's own size. /usr/bin/time, small, forks the command instead.
TIME = "/usr/bin/time"


def call(
    impl: Impl, store: str, args: Sequence[str], *, expect: int = 0, rss: bool = False
) -> tuple[float, float, int]:
    """Run one plugin call; wall seconds, CPU seconds, its peak RSS in KiB (0: not measured)."""
    wrap = rss and not impl.server_pid and os.access(TIME, os.X_OK)
    forkers = children(impl.server_pid) if impl.server_pid else set()
    standbys = ready_standbys(impl.server_pid) if impl.server_pid else 0
    before = tree_cpu(impl.server_pid) if impl.server_pid else 0.0
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as peak:
        # wait4 would report time's own peak, which still counts this script's pages.
        timer = [TIME, "-f", "%M", "-o", peak.name, "--"] if wrap else []
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*timer, *impl.argv[store], *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=impl.env,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != expect:
            out.seek(0)
            sys.exit(f"bench: {impl.name}: {' '.join(args)} exited {code}:\n{out.read().decode()}")
        peak_kib = int(peak.read().split()[-1]) if wrap else 0
    cpu = usage.ru_utime + usage.ru_stime
    if impl.server_pid:
        settle(impl.server_pid, forkers, standbys)
        cpu += tree_cpu(impl.server_pid) - before
    return wall, cpu, peak_kib


def quiet(impl: Impl, store: str, *args: str) -> None:
    call(impl, store, args)


# -- stores --------------------------------------------------------------------------


def write_config(path: Path, **values: object) -> Path:
    path.write_text(json.dumps(values))  # JSON is YAML, for both implementations
    return path


def our_impls(work: Path, host: str, stack: ExitStack) -> list[Impl]:
    configs = {}
    for store in ("unpriv", "priv"):
        config = write_config(
            work / f"ours-{store}.yml",
            store=str(work / f"ours-{store}"),
            log_level="error",
            log_file=str(work / f"ours-{store}.log"),
            create={"insecure_registries": [host]},
        )
        configs[store] = ["--config", str(config)]
        cli = [str(BIN / "grootfs"), *configs[store]]
        run([*cli, "init-store", "--store-size-bytes", str(STORE_SIZE)])
        stack.callback(
            subprocess.run, [*cli, "delete-store"], stdin=subprocess.DEVNULL, check=False
        )
    socket_dir = work / "run"
    socket = socket_dir / "grootfs.sock"
    log = (work / "server.log").open("ab")
    stack.callback(log.close)
    server = subprocess.Popen(
        [str(BIN / "grootfs"), "serve", "--socket", str(socket)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    stack.callback(stop_server, server)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"bench: grootfs serve did not start: see {work / 'server.log'}")
        time.sleep(0.02)
    python = str(BIN / "grootfs")
    shim_env = {**os.environ, "GROOTFS_SOCKET": str(socket), "GROOTFS_PYTHON_CLI": python}
    no_server = {**shim_env, "GROOTFS_SOCKET": str(work / "no-server" / "grootfs.sock")}
    return [
        Impl("shim", {s: [str(SHIM), *c] for s, c in configs.items()}, shim_env, server.pid),
        Impl("fallback", {s: [str(SHIM), *c] for s, c in configs.items()}, no_server),
        Impl("python", {s: [python, *c] for s, c in configs.items()}),
    ]


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def reference_impl(binary: str, work: Path, host: str, stack: ExitStack) -> Impl:
    """GrootFS on stores made as its README for these machines says (no quota)."""
    argv = {}
    for store in ("unpriv", "priv"):
        path = work / f"ref-{store}"
        backing = work / f"ref-{store}.backing-store"
        with backing.open("wb") as f:
            f.truncate(STORE_SIZE)
        run(["mkfs.xfs", "-q", str(backing)])
        path.mkdir()
        run(["mount", "-o", "loop,noatime", str(backing), str(path)])
        stack.callback(unmount_all, path)
        config = write_config(
            work / f"ref-{store}.yml",
            store=str(path),
            tardis_bin=str(Path(binary).with_name("tardis")),
            log_level="error",
            create={"insecure_registries": [host]},
        )
        argv[store] = [binary, "--config", str(config)]
        run([*argv[store], "init-store"])
    return Impl("grootfs", argv)


def unmount_all(path: Path) -> None:
    """Unmount *path* and every mount below it (GrootFS's images), deepest first."""
    found = subprocess.run(
        ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=False
    ).stdout.split()
    prefix = str(path)
    for target in sorted(
        (t for t in found if t == prefix or t.startswith(prefix + "/")), key=len, reverse=True
    ):
        subprocess.run(["umount", target], stdin=subprocess.DEVNULL, check=False)


# -- the measurements ------------------------------------------------------------------


def rotations(impls: list[Impl], reps: int) -> Iterator[tuple[int, Impl]]:
    for i in range(reps):
        k = i % len(impls)
        for impl in impls[k:] + impls[:k]:
            yield i, impl


def hot(impls: list[Impl], tar: str, url: str, reps: int) -> None:
    # Handles carry the implementation's name: ours share their stores.
    for impl in impls:
        quiet(impl, "unpriv", "create", tar, f"warm-{impl.name}")
        quiet(impl, "unpriv", "create", url, f"warm-docker-{impl.name}")
        quiet(impl, "priv", "create", tar, f"privileged-{impl.name}")
    for i, impl in rotations(impls, reps):
        n = impl.name
        impl.record("warm create (stack tar)", *call(impl, "unpriv", ["create", tar, f"w{i}-{n}"]))
        impl.record("delete", *call(impl, "unpriv", ["delete", f"w{i}-{n}"]))
        impl.record("stats (hit)", *call(impl, "unpriv", ["stats", f"warm-{n}"]))
        miss = ["stats", f"privileged-{n}"]
        impl.record("stats (miss)", *call(impl, "unpriv", miss, expect=1))
        impl.record("warm create docker://", *call(impl, "unpriv", ["create", url, f"d{i}-{n}"]))
        quiet(impl, "unpriv", "delete", f"d{i}-{n}")
    for impl in impls:
        quiet(impl, "unpriv", "delete", f"warm-{impl.name}")
        quiet(impl, "unpriv", "delete", f"warm-docker-{impl.name}")
        quiet(impl, "priv", "delete", f"privileged-{impl.name}")
        quiet(impl, "unpriv", "clean")
        quiet(impl, "priv", "clean")


def cold(impls: list[Impl], tar: str, url: str, reps: int) -> None:
    for i, impl in rotations(impls, reps):
        for op, image in (("cold create (stack tar)", tar), ("cold create docker://", url)):
            # The previous run's dirty pages are not this one's to write. Twice:
            # a store's own flush dirties its backing file on the host's
            # filesystem, which the first sync may have passed already, and an
            # ext4 journal commit (our syncfs's, through the loop device) would
            # write those too. GrootFS flushes nothing, so whoever ran after it
            # paid for its 200 MB until this.
            run(["sync"])
            run(["sync"])
            argv = ["create", image, f"c{i}-{impl.name}"]
            impl.record(op, *call(impl, "unpriv", argv, rss=True))
            quiet(impl, "unpriv", "delete", f"c{i}-{impl.name}")
            quiet(impl, "unpriv", "clean")


@dataclass(frozen=True)
class Load:
    seconds: float
    calls: int
    cpu: float


def cell_load(impl: Impl, containers: list[tuple[str, bool]], rounds: int) -> Load:
    """Garden's bulk metrics: every container once per period, one after another."""
    gap = GARDEN_PERIOD / len(containers)
    calls, cpu = 0, 0.0
    start = time.perf_counter()
    for n in range(rounds * len(containers)):
        handle, privileged = containers[n % len(containers)]
        delay = start + n * gap - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if privileged:
            cpu += call(impl, "unpriv", ["stats", handle], expect=1)[1]
            calls += 1
        cpu += call(impl, "priv" if privileged else "unpriv", ["stats", handle])[1]
        calls += 1
    return Load(time.perf_counter() - start, calls, cpu)


def load(impls: list[Impl], tar: str, images: int, rounds: int) -> tuple[dict[str, Load], float]:
    """Each implementation under the cell load; and Garden's rate in calls per minute."""
    privileged = images // 5
    containers = [(f"app{n}", n % 5 == 0) for n in range(images)][:images]
    assert sum(p for _, p in containers) == privileged
    results = {}
    made: set[str] = set()
    for impl in impls:
        group = "grootfs" if impl.name == "grootfs" else "ours"  # ours share their stores
        if group not in made:
            for handle, priv in containers:
                quiet(impl, "priv" if priv else "unpriv", "create", tar, handle)
            made.add(group)
        # The Python command cannot keep Garden's rate here (a process start
        # per call): one round shows its cost per call without taking minutes.
        results[impl.name] = cell_load(impl, containers, 1 if impl.name == "python" else rounds)
    demand = (images + privileged) * 60 / GARDEN_PERIOD
    return results, demand


# -- the report ----------------------------------------------------------------------------


def report(impls: list[Impl], loads: dict[str, Load], demand: float, reps: int, cold: int) -> None:
    ref = next((i for i in impls if i.name == "grootfs"), None)
    compared = [i for i in impls if i.name in ("shim", "python")] if ref else []
    print(f"medians of {reps} runs (cold: {cold}), alternating; CPU = user+sys, mean")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end\n")
    head = f"{'operation':<26}"
    for impl in impls:
        head += f" {impl.name + ' wall':>14} {'cpu':>9}"
    for impl in compared:
        head += f" {impl.name + '/grootfs wall':>20} {'cpu':>6}"
    print(head)
    for op in impls[0].walls:
        line = f"{op:<26}"
        for impl in impls:
            if op in impl.walls:
                w = statistics.median(impl.walls[op])
                c = statistics.mean(impl.cpus[op])
                line += f" {ms(w):>14} {ms(c):>9}"
            else:
                line += f" {'-':>14} {'-':>9}"
        if ref is not None:
            base_wall = statistics.median(ref.walls[op])
            base_cpu = statistics.mean(ref.cpus[op])
            for impl in compared:
                wall = statistics.median(impl.walls[op]) / base_wall
                cpu = statistics.mean(impl.cpus[op]) / base_cpu
                line += f" {wall:>19.2f}x {cpu:>5.2f}x"
        print(line)
    print("\npeak RSS of the cold creates, max (through the server the command's is not seen):")
    for impl in impls:
        for op, values in impl.rss_kib.items():
            if op.startswith("cold") and max(values):
                print(f"  {impl.name:<10} {op:<26} {max(values) / 1024:7.1f} MiB")
    if loads:
        print(
            f"\ncell load: stats at Garden's rate ({demand:.0f} calls/min), "
            "CPU-seconds per minute at that rate"
        )
        per_minute = {n: r.cpu / r.calls * demand for n, r in loads.items()}
        for name, result in loads.items():
            rate = result.calls / result.seconds * 60
            line = f"  {name:<10} {per_minute[name]:7.2f} CPU-s/min"
            line += f"  ({result.calls} calls in {result.seconds:.0f} s: {rate:.0f}/min achieved)"
            if "grootfs" in loads and name != "grootfs":
                line += f"  {per_minute[name] / per_minute['grootfs']:.2f}x GrootFS"
            print(line)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


@contextmanager
def stack_tar(work: Path) -> Iterator[str]:
    """The Debian layer as a plain (uncompressed) tar, as a stack is shipped."""
    path = work / "rootfs.tar"
    with path.open("wb") as out:
        subprocess.run(["gzip", "-dc", str(TARBALL)], stdout=out, check=True)
    yield str(path)


def main() -> int:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--repetitions", type=int, default=5 if quick else 21)
    parser.add_argument("--cold-repetitions", type=int, default=3 if quick else 5)
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument(
        "--load-rounds", type=int, default=1 if quick else 5, help="12 s each: 5 is a minute"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    if not (LAYOUT / "index.json").exists() or not TARBALL.exists():
        sys.exit("bench: no Debian image: run demo/build-debian-image first")
    if not SHIM.exists():
        sys.exit("bench: no shim: run make shim first")
    reference = os.environ.get("GROOTFS_REFERENCE", "")
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")])

    work = Path(tempfile.mkdtemp(prefix="grootfs-bench-hot-"))
    try:
        with ExitStack() as stack:
            registry = stack.enter_context(
                reg.Registry(work / "registry", work / "registry-storage")
            )
            reg.push(str(LAYOUT), TAG, registry.host, "debian:bookworm")
            url = f"docker://{registry.host}/debian:bookworm"
            tar = stack.enter_context(stack_tar(work))
            impls = our_impls(work, registry.host, stack)
            if reference:
                impls.append(reference_impl(reference, work, registry.host, stack))
            hot(impls, tar, url, args.repetitions)
            with_server = [i for i in impls if i.name != "fallback"]
            cold(with_server, tar, url, args.cold_repetitions)
            loads, demand = load(with_server, tar, args.images, args.load_rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(impls, loads, demand, args.repetitions, args.cold_repetitions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
