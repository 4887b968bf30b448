"""Time a Diego cell's two-layer app create, side by side with GrootFS, and print a table.

What a cell does when a new app instance starts: Garden writes its OCI
layout (the stack, a symlink to the stack tar, already unpacked; the
droplet, ~100 MB of gzip, only a URL) and runs ``create oci:///...``, which
fetches the droplet from the blobstore over HTTPS with a client certificate
and unpacks it under /home/vcap. Here the blobstore is nginx on loopback
requiring a client certificate, and each store is its own loop XFS.

(a) cold create: stack cached, droplet new (each run names the droplet with a
    new digest, which create.skip_layer_validation lets through, so the same
    served file is fetched and unpacked again); (b) warm create: both layers
    cached. Medians of N runs, grootfs-py and GrootFS alternating.

Run as root with the project's venv after ``demo/build-debian-image``; GrootFS
from ``shared/anchors/grootfs-go/install /tmp/grootfs-go`` (``--grootfs``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench_create import REPO, STORE_SIZE, Sample, loop_xfs, median, print_rows, run, timed

sys.path.insert(0, str(REPO / "tests"))

import blobstore
import gardenlayout
import registry

STACK_TGZ = REPO / ".cache" / "debian-bookworm.tgz"
BIN = Path(sys.executable).parent
DROPLET_MB = 100


def make_droplet(path: Path, target_mb: int, seed: int = 11) -> None:
    """A droplet-like tgz of about *target_mb* MB: binaries and lots of text files."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)
    ]
    target = target_mb * 1024 * 1024
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, 2000, 2000
            tar.addfile(info, io.BytesIO(data))

        for d in ("app", "app/bin", "app/lib", "app/node_modules", "deps", "tmp", "logs"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o755, 2000, 2000
            tar.addfile(info)
        i = 0
        while raw.tell() < target:
            i += 1
            if i % 8 == 0:
                add(f"app/bin/tool-{i}", rng.randbytes(rng.randint(50_000, 400_000)), 0o755)
            else:
                text = b" ".join(rng.choices(words, k=rng.randint(500, 8000)))
                pkg = f"app/node_modules/pkg-{i // 40}"
                if i % 40 == 1:
                    info = tarfile.TarInfo(pkg)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                add(f"{pkg}/file-{i}.js", text)
        add("staging_info.yml", b'{"start_command":"node app.js"}\n')


@contextmanager
def grootfs_go_store(work: Path, binary: Path, certs: Path) -> Iterator[list[str]]:
    """GrootFS's store on its own loop XFS, made by hand as its README says (no quota here)."""
    with loop_xfs(work / "go-store") as store:
        config = work / "go-config.yml"
        config.write_text(
            f"store: {store}\ntardis_bin: {binary.parent / 'tardis'}\nlog_level: error\n"
            "create:\n  skip_layer_validation: true\n"
            f"  remote_layer_client_certificates_path: {certs}\n"
        )
        argv = [str(binary), "--config", str(config)]
        run([*argv, "init-store"])
        try:
            yield argv
        finally:
            # Its images' mounts must go before loop_xfs unmounts the store.
            subprocess.run(
                [*argv, "delete", "task"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )


@contextmanager
def grootfs_py_store(work: Path, certs: Path) -> Iterator[list[str]]:
    store = work / "py-store"
    config = work / "py-config.yml"
    config.write_text(
        f"store: {store}\nlog_level: error\n"
        "create:\n  skip_layer_validation: true\n"
        f"  remote_layer_client_certificates_path: {certs}\n"
    )
    argv = [str(BIN / "grootfs"), "--config", str(config), "--log-file", str(work / "py.log")]
    run([*argv, "init-store", "--store-size-bytes", str(STORE_SIZE)])
    try:
        yield argv
    finally:
        subprocess.run([*argv, "delete-store"], stdin=subprocess.DEVNULL, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--repetitions", type=int, default=5)
    parser.add_argument("--grootfs", type=Path, default=Path("/tmp/grootfs-go/grootfs"))
    parser.add_argument("--droplet-mb", type=int, default=DROPLET_MB)
    args = parser.parse_args()
    reps: int = args.repetitions
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    if not STACK_TGZ.exists():
        sys.exit("bench: no Debian image: run demo/build-debian-image first")
    if not args.grootfs.exists():
        sys.exit(f"bench: no GrootFS at {args.grootfs}: shared/anchors/grootfs-go/install it")
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")])

    work = Path(tempfile.mkdtemp(prefix="grootfs-bench-garden-"))
    try:
        with ExitStack() as stack:
            # The stack as a cell has it: a plain tar behind a symlinked package directory.
            data = work / "data" / "packages" / "stack" / "abc"
            data.mkdir(parents=True)
            with gzip.open(STACK_TGZ) as src, open(data / "rootfs.tar", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            (work / "packages").mkdir()
            (work / "packages" / "stack").symlink_to(data)
            stack_tar = str(work / "packages" / "stack" / "rootfs.tar")

            pki = work / "pki"
            ca = registry.make_ca(pki, "blobstore-ca")
            server = registry.make_cert(pki, "blobstore", ca, server=True)
            client = registry.make_cert(pki, "cell", ca, server=False)
            certs = work / "certs"
            certs.mkdir()
            shutil.copy(ca.cert, certs / "remote-layer.crt")
            shutil.copy(client.cert, certs / "remote-layer.cert")
            shutil.copy(client.key, certs / "remote-layer.key")
            root = work / "blobs"
            root.mkdir()
            droplet = root / "droplet.tgz"
            make_droplet(droplet, args.droplet_mb)
            store = stack.enter_context(
                blobstore.Blobstore(work / "nginx", root, tls=server, client_ca=ca.cert)
            )
            url = f"{store.url}/droplet.tgz"
            with droplet.open("rb") as blob:
                # Streamed: a child's peak RSS starts at its parent's (fork), so the
                # benchmark itself stays small.
                real_digest = hashlib.file_digest(blob, "sha256").hexdigest()

            tools = {
                "grootfs-py": stack.enter_context(grootfs_py_store(work, certs)),
                "GrootFS": stack.enter_context(grootfs_go_store(work, args.grootfs, certs)),
            }
            for argv in tools.values():
                run([*argv, "create", stack_tar, "task"])  # the stack, cached once

            cold: dict[str, list[Sample]] = {name: [] for name in tools}
            warm: dict[str, list[Sample]] = {name: [] for name in tools}
            for i in range(reps):
                digest = hashlib.sha256(f"{real_digest}-{i}".encode()).hexdigest()
                # Debian has no /home/vcap (cflinuxfs4 has); /home is there.
                layout = gardenlayout.write(
                    str(work / "depot" / f"h{i}" / "image"), stack_tar, url, digest, "/home"
                )
                order = list(tools.items()) if i % 2 == 0 else list(reversed(tools.items()))
                for name, argv in order:
                    # Each starts with no dirty pages of the other's writes to flush.
                    os.sync()
                    cold[name].append(timed([*argv, "create", layout.url, f"cold-{i}"]))
                os.sync()
                for name, argv in order:
                    warm[name].append(timed([*argv, "create", layout.url, f"warm-{i}"]))
                for argv in tools.values():
                    run([*argv, "delete", f"cold-{i}"])
                    run([*argv, "delete", f"warm-{i}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def cpu(samples: list[Sample]) -> float:
        return statistics.median(s.cpu_seconds for s in samples)

    size = args.droplet_mb
    print(f"two-layer app create: stack {STACK_TGZ.name} (cached), droplet ~{size} MB gzip")
    print(f"from nginx over HTTPS with a client certificate; medians of {reps} runs")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    rows = []
    for label, table in (("cold create (droplet new)", cold), ("warm create (all cached)", warm)):
        py, go = median(table["grootfs-py"]), median(table["GrootFS"])
        rows.append((f"{label}: grootfs-py", f"{py * 1000:9.1f} ms"))
        rows.append((f"{label}: GrootFS 0.30.1", f"{go * 1000:9.1f} ms"))
        rows.append((f"{label}: grootfs-py / GrootFS", f"{py / go:9.2f} x"))
        cpy, cgo = cpu(table["grootfs-py"]), cpu(table["GrootFS"])
        rows.append(
            (
                f"    CPU time: grootfs-py / GrootFS ({cpy:.2f} s / {cgo:.2f} s)",
                f"{cpy / cgo:9.2f} x",
            )
        )
    rss = statistics.median(s.max_rss_kib / 1024 for s in cold["grootfs-py"])
    rows.append(("cold create peak RSS, grootfs-py", f"{rss:9.1f} MiB"))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
