"""What the BOSH director and agent do with this release, done here without them.

A helper for the release tests, not a test module:

- read job and package specs, resolve a package's file globs in ``src/``
  then ``blobs/`` as ``bosh create-release`` does;
- compile a package as the agent does on a compilation VM: its files laid
  out in a compile directory, its dependencies' compiled packages at
  ``/var/vcap/packages/<dep>``, ``bash -x packaging`` with
  ``BOSH_COMPILE_TARGET`` and ``BOSH_INSTALL_TARGET`` set. That runs in a
  private mount namespace with a tmpfs at ``/var/vcap`` and no network
  (packaging must be offline), and the result is cached as a tarball under
  ``.cache/compiled-packages/`` keyed by the sha256 of everything that went in;
- render a job's templates with the Ruby harness in ``spec/support``.

Run as a script, ``bosh.py compile-here NAME`` is the part that runs inside
the namespace.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "compiled-packages"
VCAP = Path("/var/vcap")


@dataclass(frozen=True)
class PackageSpec:
    name: str
    dependencies: tuple[str, ...]
    files: tuple[str, ...]
    excluded_files: tuple[str, ...] = field(default=())

    @property
    def dir(self) -> Path:
        return ROOT / "packages" / self.name


@cache
def package(name: str) -> PackageSpec:
    data = yaml.safe_load((ROOT / "packages" / name / "spec").read_text())
    return PackageSpec(
        name=data["name"],
        dependencies=tuple(data.get("dependencies") or ()),
        files=tuple(data.get("files") or ()),
        excluded_files=tuple(data.get("excluded_files") or ()),
    )


def package_names() -> list[str]:
    return sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "spec").exists())


def job_spec(name: str) -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((ROOT / "jobs" / name / "spec").read_text())
    return data


def _glob(base: Path, pattern: str) -> set[str]:
    return {p for p in glob.glob(pattern, root_dir=base, recursive=True) if (base / p).is_file()}


def resolve_files(spec: PackageSpec) -> dict[str, Path]:
    """Relative path in the compile directory -> the file, as create-release finds them."""
    found: dict[str, Path] = {}
    for pattern in spec.files:
        matches = {p: ROOT / "src" / p for p in _glob(ROOT / "src", pattern)}
        if not matches:
            matches = {p: ROOT / "blobs" / p for p in _glob(ROOT / "blobs", pattern)}
        if not matches:
            raise FileNotFoundError(f"package {spec.name}: `{pattern}` matches no file")
        found.update(matches)
    for pattern in spec.excluded_files:
        for p in _glob(ROOT / "src", pattern):
            found.pop(p, None)
    return dict(sorted(found.items()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def fingerprint(name: str) -> str:
    """sha256 of the package's spec, packaging, files and its dependencies' fingerprints."""
    spec = package(name)
    digest = hashlib.sha256()
    for part in ("spec", "packaging"):
        digest.update((spec.dir / part).read_bytes())
    for rel, path in resolve_files(spec).items():
        digest.update(f"{rel}\0{_sha256(path)}\n".encode())
    for dep in spec.dependencies:
        digest.update(f"dep {dep} {fingerprint(dep)}\n".encode())
    return digest.hexdigest()


def compiled(name: str) -> Path:
    """The compiled package's tarball, compiling it (and its dependencies) if not cached."""
    for dep in package(name).dependencies:
        compiled(dep)
    tarball = CACHE / f"{name}-{fingerprint(name)}.tgz"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    VCAP.mkdir(exist_ok=True)  # a mount point; the tmpfs over it is private
    log = CACHE / f"{name}-{fingerprint(name)}.log"
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            [
                "unshare",
                "--mount",
                "--net",
                "--propagation",
                "private",
                sys.executable,
                __file__,
                "compile-here",
                name,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0 or not tarball.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"compiling {name} failed (log {log}):\n{tail}")
    print(f"compiled {name} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return tarball


def install_compiled(name: str, vcap: Path = VCAP) -> None:
    """Unpack a compiled package where the agent puts it, linked from /var/vcap/packages."""
    target = vcap / "data" / "packages" / name / fingerprint(name)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(CACHE / f"{name}-{fingerprint(name)}.tgz") as tar:
        tar.extractall(target, filter="tar")
    link = vcap / "packages" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _compile_here(name: str) -> None:
    """Inside the private mount namespace: compile *name* as a compilation VM would."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(VCAP)], check=True)
    spec = package(name)
    for dep in spec.dependencies:
        install_compiled(dep)
    version = fingerprint(name)
    compile_dir = VCAP / "data" / "compile" / name
    install_dir = VCAP / "data" / "packages" / name / version
    install_dir.mkdir(parents=True)
    (VCAP / "packages").mkdir(exist_ok=True)
    (VCAP / "packages" / name).symlink_to(install_dir)
    for rel, path in resolve_files(spec).items():
        (compile_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, compile_dir / rel)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(compile_dir),
        "LANG": "C.UTF-8",
        "BOSH_COMPILE_TARGET": str(compile_dir),
        "BOSH_INSTALL_TARGET": str(VCAP / "packages" / name),
        "BOSH_PACKAGE_NAME": name,
        "BOSH_PACKAGE_VERSION": version,
    }
    subprocess.run(
        ["bash", "-x", str(spec.dir / "packaging")],
        cwd=compile_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    tarball = CACHE / f"{name}-{version}.tgz"
    with tempfile.NamedTemporaryFile(dir=CACHE, suffix=".partial", delete=False) as tmp:
        subprocess.run(["tar", "-czf", tmp.name, "-C", str(install_dir), "."], check=True)
    os.replace(tmp.name, tarball)


class Namespace:
    """A private mount namespace (optionally without network) kept alive by a holder process.

    Commands run in it through ``nsenter``; mounts made there are invisible
    outside and go away with it. ``close`` unmounts everything under
    ``/var/vcap`` first, so loop devices are detached before the holder dies.
    """

    def __init__(self, *, network: bool = True) -> None:
        VCAP.mkdir(exist_ok=True)  # a mount point; the tmpfs over it is private
        flags = ["--mount", "--propagation", "private", *([] if network else ["--net"])]
        self.holder = subprocess.Popen(
            ["unshare", *flags, "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        self.enter = ["nsenter", "-t", str(self.holder.pid), "-m", *([] if network else ["-n"])]
        for _ in range(100):  # until unshare has exec'd sleep in the new namespace
            if os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                break
            time.sleep(0.05)
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(VCAP)])

    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.enter, "--", *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env or {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def install(self, name: str) -> None:
        """Lay out a compiled package as the agent does."""
        target = f"/var/vcap/data/packages/{name}/{fingerprint(name)}"
        self.run(["mkdir", "-p", target, "/var/vcap/packages"])
        self.run(["tar", "-xzf", str(CACHE / f"{name}-{fingerprint(name)}.tgz"), "-C", target])
        self.run(["ln", "-sfn", target, f"/var/vcap/packages/{name}"])

    def close(self) -> None:
        try:
            self.run(["umount", "--recursive", str(VCAP)], check=False)
        finally:
            self.holder.kill()
            self.holder.wait()


def render_job(name: str, properties: dict[str, object], out: Path) -> None:
    """Render every template of job *name* into *out* (bin/ files executable)."""
    subprocess.run(
        [
            "ruby",
            str(ROOT / "spec" / "support" / "render_job.rb"),
            name,
            json.dumps(properties),
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        check=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "compile-here":
        _compile_here(sys.argv[2])
    else:
        sys.exit("usage: bosh.py compile-here PACKAGE")
