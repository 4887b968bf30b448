"""Time ``grootfs create docker://...`` against skopeo+umoci and podman, on one local registry.

For the Debian minbase image and a 5-layer image built on it, medians of N
runs of:

- cold create (empty store): grootfs vs ``skopeo copy`` + ``umoci unpack``
  vs ``podman pull`` + ``podman create`` + ``podman mount``;
- warm create (layers cached): grootfs vs ``podman create`` + ``mount``;
- peak RSS of grootfs's cold create;
- the interpreter's own floor: ``python3 -I -S`` importing only what any
  Python implementation of a warm create needs (json for the manifest and
  the output, socket for the manifest request, ctypes for mount(2)).

The registry is Debian's docker-registry on 127.0.0.1 (tests/registry.py),
plain HTTP, so every tool is told it is insecure. grootfs and the peers each
get a loop-mounted XFS filesystem. Run as root after
``demo/build-debian-image`` (``make bench`` does both).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_create import (
    BIN,
    LAYOUT,
    REPO,
    STORE_SIZE,
    TAG,
    Sample,
    loop_xfs,
    median,
    print_rows,
    run,
    setup,
    timed,
)

import registry as reg

FIVE = REPO / ".cache" / "debian-5layer-oci"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _extra_layer(n: int) -> bytes:
    """An uncompressed tar: a few MB of files of mixed sizes, like an app layer."""
    out = io.BytesIO()
    rng = hashlib.sha256(f"layer{n}".encode()).digest()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(300):
            size = 256 << (i % 8)  # 256 B .. 32 KiB, partly compressible
            data = (rng * (size // len(rng) + 1))[:size] + os.urandom(size // 4)
            info = tarfile.TarInfo(f"opt/app{n}/file{i:04d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_five_layer_image() -> None:
    """Debian's layer plus four application layers, as an OCI layout (cached)."""
    if (FIVE / "index.json").exists():
        return
    tmp = FIVE.with_name(FIVE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blobs" / "sha256").mkdir(parents=True)
    index = json.loads((LAYOUT / "index.json").read_text())
    desc = index["manifests"][0]
    blobs = LAYOUT / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    for layer in manifest["layers"]:
        name = layer["digest"].split(":")[1]
        os.link(blobs / name, tmp / "blobs" / "sha256" / name)
    for n in range(4):
        tar = _extra_layer(n)
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(tar).hexdigest())
        layer_desc = _blob(tmp, gzip.compress(tar, compresslevel=6, mtime=0))
        manifest["layers"].append({"mediaType": MEDIA_LAYER, **layer_desc})
        config["history"].append({"created_by": f"bench layer {n}"})
    manifest["config"] = {**manifest["config"], **_blob(tmp, json.dumps(config).encode())}
    manifest_desc = _blob(tmp, json.dumps(manifest).encode())
    index["manifests"] = [{**desc, **manifest_desc}]
    (tmp / "index.json").write_text(json.dumps(index))
    (tmp / "oci-layout").write_text((LAYOUT / "oci-layout").read_text())
    tmp.rename(FIVE)


# podman refuses a runroot path longer than 50 characters.
RUNROOT = Path(tempfile.mkdtemp(prefix="pod-"))


def podman_argv(peers: Path) -> list[str]:
    return [
        "podman",
        "--root",
        str(peers / "podman-root"),
        "--runroot",
        str(RUNROOT),
        "--storage-driver",
        "overlay",
    ]


def bench_image(name: str, host: str, work: Path, peers: Path, reps: int) -> list[tuple[str, str]]:
    url = f"docker://{host}/{name}"
    store = work / "store"
    grootfs = [str(BIN / "grootfs"), "--store", str(store), "--log-file", str(work / "log")]
    insecure = ["--insecure-registry", host]
    podman = podman_argv(peers)
    image = f"{host}/{name}"

    cold: list[Sample] = []
    for i in range(reps):
        cold.append(timed([*grootfs, "create", *insecure, url, f"cold-{i}"]))
        run([*grootfs, "delete", f"cold-{i}"])
        run([*grootfs, "clean"])
    run([*grootfs, "create", *insecure, url, "warm-up"])
    warm: list[Sample] = []
    for i in range(reps):
        warm.append(timed([*grootfs, "create", *insecure, url, f"warm-{i}"]))
        run([*grootfs, "delete", f"warm-{i}"])
    run([*grootfs, "delete", "warm-up"])
    run([*grootfs, "clean"])

    umoci: list[float] = []
    for _ in range(reps):
        oci, bundle = peers / "skopeo-oci", peers / "bundle"
        copy = timed(
            ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{image}",
             f"oci:{oci}:{TAG}"]
        )  # fmt: skip
        unpack = timed(["umoci", "unpack", "--image", f"{oci}:{TAG}", str(bundle)])
        umoci.append(copy.seconds + unpack.seconds)
        shutil.rmtree(oci)
        shutil.rmtree(bundle)

    pod_cold: list[float] = []
    for i in range(reps):
        pull = timed([*podman, "pull", "--quiet", "--tls-verify=false", image])
        create = timed([*podman, "create", "--name", f"cold-{i}", image])
        mount = timed([*podman, "mount", f"cold-{i}"])
        pod_cold.append(pull.seconds + create.seconds + mount.seconds)
        run([*podman, "rm", "--all", "--force"])
        run([*podman, "rmi", "--all", "--force"])
    run([*podman, "pull", "--quiet", "--tls-verify=false", image])
    pod_warm: list[float] = []
    for i in range(reps):
        create = timed([*podman, "create", "--name", f"warm-{i}", image])
        mount = timed([*podman, "mount", f"warm-{i}"])
        pod_warm.append(create.seconds + mount.seconds)
    run([*podman, "rm", "--all", "--force"])
    run([*podman, "rmi", "--all", "--force"])

    c, w = median(cold), median(warm)
    u, pc, pw = statistics.median(umoci), statistics.median(pod_cold), statistics.median(pod_warm)
    faster = min(u, pc)
    rss = [s.max_rss_kib / 1024 for s in cold]

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:9.1f} ms"

    return [
        (f"{name}: cold create (empty store)", ms(c)),
        ("    skopeo copy + umoci unpack", ms(u)),
        ("    podman pull + create + mount", ms(pc)),
        ("    cold / skopeo+umoci", f"{c / u:9.2f} x"),
        ("    cold / podman", f"{c / pc:9.2f} x"),
        ("    cold / faster peer (target <= 0.60)", f"{c / faster:9.2f} x"),
        (f"{name}: warm create (layers cached)", ms(w)),
        ("    podman create + mount", ms(pw)),
        ("    warm / podman (target <= 0.25)", f"{w / pw:9.2f} x"),
        (f"{name}: cold create peak RSS, median", f"{statistics.median(rss):9.1f} MiB"),
        ("    cold create peak RSS, max (target < 60)", f"{max(rss):9.1f} MiB"),
    ]


def floor(reps: int) -> list[tuple[str, str]]:
    """What CPython costs before a warm create does any work of its own."""
    bare = [timed([sys.executable, "-I", "-S", "-c", "pass"]) for _ in range(reps)]
    needed = "import json, socket, ctypes"
    least = [timed([sys.executable, "-I", "-S", "-c", needed]) for _ in range(reps)]
    return [
        ("interpreter floor: python3 -I -S -c pass", f"{median(bare) * 1000:9.1f} ms"),
        (f"    python3 -I -S -c '{needed}'", f"{median(least) * 1000:9.1f} ms"),
    ]


def main() -> int:
    reps = setup(__doc__.splitlines()[0], default_repetitions=5)
    build_five_layer_image()

    work = Path(tempfile.mkdtemp(prefix="grootfs-bench-registry-"))
    store = work / "store"
    grootfs = [str(BIN / "grootfs"), "--store", str(store), "--log-file", str(work / "log")]
    rows: list[tuple[str, str]] = []
    try:
        run([*grootfs, "init-store", "--store-size-bytes", str(STORE_SIZE)])
        with (
            reg.Registry(work / "registry", work / "registry-storage") as registry,
            loop_xfs(work / "peers") as peers,
        ):
            reg.push(str(LAYOUT), TAG, registry.host, "debian:bookworm")
            reg.push(str(FIVE), TAG, registry.host, "debian5:bookworm")
            try:
                rows += bench_image("debian:bookworm", registry.host, work, peers, reps)
                rows += bench_image("debian5:bookworm", registry.host, work, peers, reps)
                rows += floor(reps)
            finally:
                # podman keeps its storage mounted; the loop device must come free.
                subprocess.run(
                    [*podman_argv(peers), "system", "reset", "--force"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    check=False,
                )
    finally:
        subprocess.run([*grootfs, "delete-store"], stdin=subprocess.DEVNULL, check=False)
        shutil.rmtree(RUNROOT, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"grootfs create docker:// from a local registry; medians of {reps} runs; "
          f"{os.cpu_count()} CPUs\n")  # fmt: skip
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
