"""Whole-create mutation runs: mutated layers and OCI layouts through the real CLI.

    python tests/fuzz/creates.py --seconds 240 [--seed N] [--runs N] [--work DIR]

Every input is a mutated layer tar (as a stack tarball, plain or gzipped) or
a small OCI layout whose layers or JSON documents are mutated. Each one is
created on a real loop-mounted XFS store by ``cli.main`` in a forked child
(the real code path, without an interpreter start per input), and checked:

- the create exits 0 with one line of JSON, or 1 with one clean line
  (tests/oneline.py), and never prints a traceback;
- it ends within a time bound (a hang is killed and reported);
- a failed create leaves no image and no mount; a created image deletes;
- nothing outside the store changes: bait entries aim at a canary
  directory beside the store, which must stay as it was;
- every 50 inputs (and at the end) ``check-store`` finds nothing, then
  ``clean`` removes the layers, so the store never fills.

Run as root. Prints one JSON summary line; findings go to <work>/findings.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import select
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import zstandard  # noqa: E402
from isal import igzip_threaded  # noqa: E402, F401

import oneline  # noqa: E402

# Everything a create may import, imported once here: the children inherit it.
from grootfs_py import (  # noqa: E402, F401
    checkstore,
    clean,
    cli,
    compression,
    images,
    mounts,
    overlay,
    unpack,
    volumes,
)
from grootfs_py.sources import manifest, oci, tarball  # noqa: E402, F401

TIMEOUT = 20  # seconds for one command; small inputs take well under one
CHECK_EVERY = 50
MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
HOSTILE_NAMES = [
    b"../escape",
    b"/abs/path",
    b"a/../../b",
    b'nope\n{"ociVersion":"1.0.2"}\x1b[2J',
    b"\xff\xfe\x80",
    b".wh..wh..opq",
    b".wh.x",
    b"dir/.wh.",
    b".",
    b"",
    b"/",
    b"esc/owned",
    b"x" * 99,
]
NUMBERS = [
    b"0",
    b"7777777",
    b"-1",
    b"\x80\x00\x00\x00\x00\x00\x00\x01",
    b"\xff" * 8,
    b"99999999999",
    b"  ",
    b"0x10",
]


def run_cli(argv: list[str], timeout: float = TIMEOUT) -> tuple[int, str, str, bool]:
    """``cli.main(argv)`` in a forked child: exit status, stdout, stderr, whether it hung."""
    out, err = os.memfd_create("stdout"), os.memfd_create("stderr")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: stdout and stderr into the memfds, then the real main
        status = 70
        try:
            os.dup2(out, 1)
            os.dup2(err, 2)
            status = cli.main(argv)
            sys.stdout.flush()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        os._exit(status)
    pidfd = os.pidfd_open(pid)
    hung = not select.select([pidfd], [], [], timeout)[0]
    if hung:
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    os.close(pidfd)
    code = os.waitstatus_to_exitcode(wait_status)
    texts = []
    for fd in (out, err):
        size = os.fstat(fd).st_size
        texts.append(os.pread(fd, size, 0).decode("utf-8", "replace"))
        os.close(fd)
    return code, texts[0], texts[1], hung


# -- mutations -----------------------------------------------------------------


def fix_checksums(buf: bytearray) -> None:
    """Give every block that looks like a tar header a right checksum again."""
    for off in range(0, len(buf) - 511, 512):
        block = buf[off : off + 512]
        if block[257:262] != b"ustar":
            continue
        total = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        buf[off + 148 : off + 156] = b"%06o\0 " % (total & 0o777777)


def _header_offsets(buf: bytes) -> list[int]:
    return [off for off in range(0, len(buf) - 511, 512) if buf[off + 257 : off + 262] == b"ustar"]


def mutate_tar(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        heads = _header_offsets(buf) or [0]
        head = rng.choice(heads)
        kind = rng.randrange(10)
        if kind in (1, 2, 3, 4, 9) and head + 512 > len(buf):
            kind = 0  # no whole header left to change
        if kind == 0 and buf:  # random bytes
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind == 1:  # a hostile name
            name = rng.choice(HOSTILE_NAMES)[:100]
            buf[head : head + 100] = name.ljust(100, b"\0")
        elif kind == 2:  # a hostile link target
            name = rng.choice(HOSTILE_NAMES)[:100]
            buf[head + 157 : head + 257] = name.ljust(100, b"\0")
        elif kind == 3:  # a type flag
            buf[head + 156] = rng.choice(b"0123456789xgLKSAZ\0")
        elif kind == 4:  # a number field: mode, uid, gid, size, mtime
            start, width = rng.choice([(100, 8), (108, 8), (116, 8), (124, 12), (136, 12)])
            value = rng.choice(NUMBERS)[:width]
            buf[head + start : head + start + width] = value.ljust(width, b"\0")
        elif kind == 5:  # cut it short
            del buf[rng.randrange(len(buf) + 1) :]
        elif kind == 6 and len(buf) > 1024:  # drop or repeat a block
            off = rng.randrange(len(buf) // 512) * 512
            if rng.random() < 0.5:
                del buf[off : off + 512]
            else:
                buf[off:off] = buf[off : off + 512]
        elif kind == 7:  # splice another seed's entries in
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) // 512 + 1) * 512
            buf[head:head] = other[:cut]
        elif kind == 8:  # a PAX record
            record = rng.choice(
                [b"path=../pax-escape", b"linkpath=/etc/passwd", b"size=99999999", b"uid=-5",
                 b"mtime=1e9", b"SCHILY.xattr.security.capability=\x01", b"GNU.sparse.map=0,1",
                 b"path=a\nb", b"SCHILY.xattr.trusted.overlay.opaque=y"]
            )  # fmt: skip
            text = b"%d " % (len(record) + 4) + record + b"\n"
            info = tarfile.TarInfo("pax")
            info.type, info.size = tarfile.XHDTYPE, len(text)
            block = info.tobuf(tarfile.USTAR_FORMAT) + text + bytes(-len(text) % 512)
            buf[head:head] = block
        else:  # a size field that lies a little
            size = rng.choice([0, 1, 511, 512, 513, 1 << 20])
            buf[head + 124 : head + 136] = b"%011o\0" % size
    if rng.random() < 0.85:
        fix_checksums(buf)
    return bytes(buf)


def mutate_json(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """*value* with one part changed: a key dropped, a type swapped, a hostile value."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        copy = dict(value)
        if rng.random() < 0.15:
            del copy[key]
        else:
            copy[key] = mutate_json(rng, value[key], depth + 1)
        return copy
    if isinstance(value, list) and value and rng.random() < 0.7:
        copy = list(value)
        i = rng.randrange(len(copy))
        choice = rng.random()
        if choice < 0.15:
            del copy[i]
        elif choice < 0.3:
            copy.append(copy[i])
        else:
            copy[i] = mutate_json(rng, copy[i], depth + 1)
        return copy
    return rng.choice(
        [None, True, 0, -1, 2**64, 1.5, "", "x" * 5000, "sha256:" + "0" * 64, "sha256:zz",
         "md5:abc", "../../etc", "a\nb\x1b[2J", [], {}, [value], {"k": value},
         "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.index.v1+json",
         "application/vnd.docker.distribution.manifest.v1+json", "\udcff"]
    )  # fmt: skip


# -- images --------------------------------------------------------------------


def _blob(layout: str, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "wb") as f:
        f.write(data)
    return digest, len(data)


def _compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


def spoil(rng: random.Random, blob: bytes) -> bytes:
    """Compressed bytes with a few flipped or cut off: the decompressors' error paths."""
    out = bytearray(blob)
    if out and rng.random() < 0.7:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    else:
        del out[rng.randrange(len(out) + 1) :]
    return bytes(out)


def write_layout(rng: random.Random, path: str, tars: list[bytes], mutate: str) -> str:
    """An OCI layout of *tars*; *mutate* names the JSON document to spoil, if any."""
    os.makedirs(os.path.join(path, "blobs", "sha256"))
    layers, diff_ids = [], []
    for data in tars:
        kind = rng.choice(["gzip", "gzip", "none", "zstd"])
        blob = _compress(data, kind)
        if kind != "none" and rng.random() < 0.15:
            blob = spoil(rng, blob)  # digest and size still match it: only the stream is bad
        digest, size = _blob(path, blob)
        layers.append({"mediaType": MEDIA[kind], "digest": digest, "size": size})
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
    config: Any = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if mutate == "config":
        config = mutate_json(rng, config)
    config_digest, config_size = _blob(path, json.dumps(config).encode("utf-8", "surrogatepass"))
    doc: Any = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    }
    if mutate == "manifest":
        doc = mutate_json(rng, doc)
    manifest_digest, manifest_size = _blob(path, json.dumps(doc).encode("utf-8", "surrogatepass"))
    index: Any = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    if mutate == "index":
        index = mutate_json(rng, index)
    raw = json.dumps(index).encode("utf-8", "surrogatepass")
    if mutate == "bytes":
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    with open(os.path.join(path, "index.json"), "wb") as f:
        f.write(raw)
    return f"oci://{path}:latest" if rng.random() < 0.5 else f"oci://{path}"


def make_special(rng: random.Random, path: str) -> str:
    """Replace the file at *path* by something that is not a regular file; say what."""
    if os.path.lexists(path):
        os.unlink(path)
    kind = rng.choice(["fifo", "directory", "link-to-fifo", "link-to-device", "missing"])
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "link-to-fifo":
        os.mkfifo(path + ".fifo")
        os.symlink(os.path.basename(path) + ".fifo", path)
    elif kind == "link-to-device":
        os.symlink("/dev/zero", path)
    return kind


def bait_seeds(canary: str) -> list[bytes]:
    """Layers that try to write into *canary*, outside the store, every way we know."""
    up = "../" * 12 + canary.lstrip("/")

    def tar(entries: list[tuple[str, bytes, str]]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name, kind, target in entries:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                info.size = 5 if kind == tarfile.REGTYPE else 0
                t.addfile(info, io.BytesIO(b"owned") if info.size else None)
        return out.getvalue()

    reg, sym, lnk = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    return [
        tar([("esc", sym, canary), ("esc/owned", reg, "")]),
        tar([("up", sym, up), ("up/owned", reg, "")]),
        tar([(up + "/owned", reg, "")]),
        tar([("hard", lnk, up + "/victim"), ("hard", reg, "")]),
        tar([("hard", lnk, canary + "/victim")]),
        tar([("d", sym, "."), ("d/d/d/../../../../owned", reg, "")]),
        tar([("esc", sym, canary), ("esc", tarfile.DIRTYPE, ""), ("esc/owned", reg, "")]),
    ]


# -- the run -------------------------------------------------------------------


def _outside(work: str, skip: set[str]) -> dict[str, tuple[int, int, int]]:
    """Every path under *work* but the store and the inputs: what no create may touch."""
    seen = {}
    for root, dirs, files in os.walk(work):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in dirs + files:
            path = os.path.join(root, name)
            if path in skip:
                continue
            st = os.lstat(path)
            seen[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


class Campaign:
    def __init__(self, work: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.work = work
        self.store = os.path.join(work, "store")
        self.inputs = os.path.join(work, "in")
        self.findings = os.path.join(work, "findings")
        self.log = os.path.join(work, "grootfs.log")
        self.canary = os.path.join(work, "canary")
        os.makedirs(self.canary)
        os.makedirs(self.findings)
        with open(os.path.join(self.canary, "victim"), "w") as f:
            f.write("untouched\n")
        corpus = os.path.join(HERE, "corpus", "tar")
        self.seeds = [Path(corpus, n).read_bytes() for n in sorted(os.listdir(corpus))]
        self.seeds += bait_seeds(self.canary)
        self.skip = {
            self.store,
            self.store + ".backing-store",
            self.inputs,
            self.findings,
            self.log,
        }
        self.counts = {"executions": 0, "created": 0, "refused": 0}
        self.found: dict[str, int] = {}
        self.n = 0

    def cli(self, *args: str) -> tuple[int, str, str, bool]:
        return run_cli(["--store", self.store, "--log-file", self.log, *args])

    def setup(self) -> None:
        code, out, err, _ = self.cli("init-store", "--store-size-bytes", str(1 << 30))
        if code != 0:
            raise SystemExit(f"init-store failed: {out}{err}")
        self.baseline = _outside(self.work, self.skip)

    def teardown(self) -> None:
        self.cli("delete-store")

    def finding(self, kind: str, detail: str, what: str) -> None:
        self.found[kind] = self.found.get(kind, 0) + 1
        with open(os.path.join(self.findings, f"{self.n:06d}-{kind}.txt"), "w") as f:
            f.write(f"{kind}\ninput: {what}\n{detail}\n")
        keep = os.path.join(self.findings, f"{self.n:06d}-input")
        source = os.path.join(self.inputs, str(self.n))
        for candidate in (source, source + ".tar"):
            # Links are kept as links and FIFOs skipped: copying must not block or read forever.
            try:
                if os.path.isdir(candidate) and not os.path.islink(candidate):
                    shutil.copytree(candidate, keep, symlinks=True)
                elif os.path.isfile(candidate) and not os.path.islink(candidate):
                    shutil.copy(candidate, keep)
            except (OSError, shutil.Error) as exc:
                with open(keep + ".copy-error", "w") as f:
                    f.write(str(exc))

    def one(self) -> None:
        self.n += 1
        rng = self.rng
        os.makedirs(self.inputs, exist_ok=True)
        tars = [mutate_tar(rng, rng.choice(self.seeds), self.seeds)]
        if rng.random() < 0.5:
            path = os.path.join(self.inputs, f"{self.n}.tar")
            with open(path, "wb") as f:
                if rng.random() < 0.3:
                    gzipped = _compress(tars[0], "gzip")
                    f.write(spoil(rng, gzipped) if rng.random() < 0.3 else gzipped)
                else:
                    f.write(tars[0])
            url, what = path, "tarball"
            if rng.random() < 0.03:
                what += " that is a " + make_special(rng, path)
        else:
            if rng.random() < 0.4:
                tars.insert(0, rng.choice(self.seeds))  # a good lower layer under it
            mutate = rng.choice(["", "", "config", "manifest", "index", "bytes"])
            if mutate:
                tars = [rng.choice(self.seeds) for _ in tars]
            layout = os.path.join(self.inputs, str(self.n))
            url = write_layout(rng, layout, tars, mutate)
            what = f"layout ({mutate or 'layers'} mutated)"
            if rng.random() < 0.05:
                blobs = os.path.join(layout, "blobs", "sha256")
                victim = rng.choice([*(os.path.join(blobs, b) for b in os.listdir(blobs)),
                                     os.path.join(layout, "index.json")])  # fmt: skip
                what += f", {os.path.basename(victim)[:12]} a {make_special(rng, victim)}"
        flags = []
        if rng.random() < 0.75:
            flags.append("--without-mount")
        if rng.random() < 0.1:
            flags.append("--skip-layer-validation")
        image_id = f"fuzz-{self.n}"
        code, out, err, hung = self.cli("create", *flags, url, image_id)
        self.counts["executions"] += 1
        if hung:
            self.finding("hang", f"killed after {TIMEOUT}s", what)
            self.cli("check-store", "--repair")
        for problem in oneline.problems(code, out, err):
            kind = problem.split(":")[0]
            self.finding(kind, f"{problem}\nstdout: {out!r}\nstderr: {err[-3000:]}", what)
        if code == 0:
            self.counts["created"] += 1
            try:
                json.loads(out)
            except ValueError:
                self.finding("bad-json", repr(out), what)
            code, out, err, _ = self.cli("delete", image_id)
            if code != 0:
                self.finding("delete", f"{out!r} {err[-3000:]}", what)
        elif code == 1:
            self.counts["refused"] += 1
            if os.path.exists(os.path.join(self.store, "images", image_id)):
                self.finding("leftover", f"image {image_id} left behind: {out!r}", what)
            if mounts.under(self.store):
                self.finding("leftover", f"mounts left: {mounts.under(self.store)}", what)
        now = _outside(self.work, self.skip)
        if now != self.baseline:
            changed = sorted(set(now.items()) ^ set(self.baseline.items()))
            self.finding("escape", f"outside the store changed: {changed}", what)
            self.baseline = now
        shutil.rmtree(self.inputs, ignore_errors=True)
        if self.n % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        code, out, err, _ = self.cli("check-store")
        if code != 0 or out:
            self.finding("inconsistent-store", f"check-store: {out!r} {err[-3000:]}", "")
            self.cli("check-store", "--repair")
        code, out, err, _ = self.cli("clean", "--threshold-bytes", "0")
        if code != 0:
            self.finding("clean", f"{out!r} {err[-3000:]}", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--runs", type=int, default=0, help="stop after this many (0: no limit)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--findings", default=None, help="copy findings (if any) here")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    work = tempfile.mkdtemp(prefix="grootfs-fuzz-")
    os.chmod(work, 0o755)
    try:
        campaign = Campaign(work, seed)
        campaign.setup()
        start = time.monotonic()
        try:
            while time.monotonic() - start < args.seconds and not (
                args.runs and campaign.n >= args.runs
            ):
                campaign.one()
            campaign.check()
        finally:
            campaign.teardown()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    elapsed = time.monotonic() - start
    summary = {
        "target": "create",
        "seed": seed,
        **campaign.counts,
        "seconds": round(elapsed, 1),
        "exec_per_s": round(campaign.counts["executions"] / elapsed, 1),
        "findings": campaign.found,
    }
    if campaign.found and args.findings:
        shutil.copytree(campaign.findings, args.findings, dirs_exist_ok=True)
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if campaign.found else 0


if __name__ == "__main__":
    sys.exit(main())
