"""Rootless: a real non-root user works in a store that root initialised for it.

The module makes a user (``useradd``) with its own ``/etc/subuid`` and
``/etc/subgid`` ranges, and a virtualenv from Debian's ``/usr/bin/python3``
in a world-readable temporary directory with the project installed in it
(the suite's own interpreter lives under ``/root``, which the user cannot
traverse). Root runs ``init-store`` with the user's mappings; the user runs
everything else through ``runuser``. The user, its id ranges, the venv and
every store are removed afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from runc import run_in_rootfs

import imagefactory as f

RANGE = 65536
GiB = 1024**3
REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
SUBID_FILES = ("/etc/subuid", "/etc/subgid")
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    subid: int  # first of RANGE subordinate uids and gids
    python: str  # an interpreter this user can run, with grootfs_py installed


def _run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, **kwargs
    )


def _free_subid_base() -> int:
    """A range start past every range already delegated in /etc/subuid and /etc/subgid."""
    end = 1 << 20
    for path in SUBID_FILES:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(path).read_text().splitlines():
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    end = max(end, int(parts[1]) + int(parts[2]))
    return -(-end // RANGE) * RANGE


def _drop_subid_lines(name: str) -> None:
    for path in SUBID_FILES:
        with contextlib.suppress(FileNotFoundError):
            lines = Path(path).read_text().splitlines(keepends=True)
            kept = [line for line in lines if not line.startswith(f"{name}:")]
            if kept != lines:
                Path(path).write_text("".join(kept))


@contextlib.contextmanager
def _world_readable_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _install_project(venv_parent: Path) -> str:
    """A venv of Debian's python with this project installed (not editable); its python."""
    source = venv_parent / "source"
    source.mkdir()
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = venv_parent / "venv"
    made = _run(SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv))
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
    installed = _run(*pip, "--disable-pip-version-check", str(source))
    assert installed.returncode == 0, installed.stderr
    return python


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    if os.geteuid() != 0:
        pytest.fail("the rootless tests need root to make a user and a store", pytrace=False)
    for tool in ("useradd", "userdel", "runuser", "newuidmap", "newgidmap", "unshare"):
        assert shutil.which(tool), f"{tool} is missing (make deps installs uidmap)"
    name = f"grootfs-rl{os.getpid() % 100000}"
    old_umask = os.umask(0o022)
    try:
        with _world_readable_dir("grootfs-rootless-venv-") as venv_parent:
            try:
                # -K ..._COUNT=0: no automatic ranges; the test adds its own.
                added = _run(
                    "useradd", "--create-home", "--shell", "/bin/sh",
                    "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", name,
                )  # fmt: skip
                assert added.returncode == 0, added.stderr
                base = _free_subid_base()
                for path in SUBID_FILES:
                    with open(path, "a", encoding="utf-8") as file:
                        file.write(f"{name}:{base}:{RANGE}\n")
                info = _run("id", "-u", name).stdout, _run("id", "-g", name).stdout
                yield User(name, int(info[0]), int(info[1]), base, _install_project(venv_parent))
            finally:
                _run("userdel", "--remove", "--force", name)
                _drop_subid_lines(name)
    finally:
        os.umask(old_umask)


@dataclass(frozen=True)
class Rootless:
    user: User
    store: str
    work: Path  # root-owned, world-readable: the test's images
    config: str  # the user's config file
    log: Path  # the user's grootfs log

    def mappings(self) -> list[str]:
        u = self.user
        uids = [f"0:{u.uid}:1", f"1:{u.subid}:{RANGE}"]
        gids = [f"0:{u.gid}:1", f"1:{u.subid}:{RANGE}"]
        return [a for m in uids for a in ("--uid-mapping", m)] + [
            a for m in gids for a in ("--gid-mapping", m)
        ]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """grootfs as the user, with a clean environment."""
        return _run(
            *self.as_user(self.user.python, "-m", "grootfs_py", "--config", self.config, *args),
            cwd="/",
        )

    def as_user(self, *argv: str) -> list[str]:
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"]
        return ["runuser", "-u", self.user.name, "--", *env, *argv]

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, (
            f"{args} exited {result.returncode}: {result.stdout}{result.stderr}"
            f"\nlog tail:\n{self.log.read_text()[-3000:] if self.log.exists() else ''}"
        )
        assert "Traceback" not in result.stderr
        return result.stdout

    def fails(self, *args: str) -> str:
        """The one line of a failed command (exit 1, no traceback)."""
        result = self.run(*args)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1, result.stdout
        return lines[0]

    def volumes(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.store, "volumes")))


@pytest.fixture
def rootless(user: User, grootfs: Any) -> Iterator[Rootless]:
    """A 1 GiB XFS store that root initialised with the user's mappings."""
    with _world_readable_dir("grootfs-rootless-") as parent:
        store = str(parent / "store")
        logs = parent / "logs"
        logs.mkdir()
        os.chown(logs, user.uid, user.gid)
        config = parent / "config.json"
        config.write_text(
            json.dumps({"store": store, "log_level": "debug", "log_file": str(logs / "user.log")})
        )
        config.chmod(0o644)
        work = parent / "work"
        work.mkdir()
        env = Rootless(user, store, work, str(config), logs / "user.log")
        try:
            grootfs("init-store", "--store-size-bytes", str(GiB), *env.mappings(), store=store)
            yield env
        finally:
            for point in _mounts_under(parent):
                _run("umount", "--lazy", point)
            deleted = grootfs("delete-store", store=store, check=False)
            assert deleted.returncode == 0, deleted.stdout + deleted.stderr
            assert not _mounts_under(parent)


def _mounts_under(path: Path) -> list[str]:
    prefix = os.fspath(path)
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(prefix + "/")), reverse=True)


def _layers() -> list[list[f.Entry]]:
    base = [
        *f.busybox_layer(),
        f.directory("home"),
        f.directory("home/vcap", uid=1000, gid=1000, mode=0o750),
        f.file("home/vcap/app", b"app", uid=1000, gid=1000),
        f.file("bin/su", b"su", mode=0o4755),
        f.file("bin/sg", b"sg", mode=0o2755, gid=42),
        f.file(
            "bin/ping",
            b"ping",
            mode=0o755,
            xattrs={"security.capability": CAP_NET_RAW, "user.note": b"kept"},
        ),
        f.file("etc/trusted", b"t", xattrs={"trusted.note": b"dropped"}),
        f.directory("opq"),
        f.file("opq/lower", b"hidden by the opaque directory above"),
        f.file("gone", b"deleted by the layer above"),
    ]
    top = [f.whiteout("gone"), f.opaque("opq"), f.file("opq/upper", b"upper")]
    return [base, top]


def _image(env: Rootless, name: str = "image", layers: list[list[f.Entry]] | None = None) -> str:
    layout = f.write_oci_layout(str(env.work / name), layers or _layers(), env=["PATH=/bin"])
    for root, dirs, files in os.walk(layout.path):
        for entry in dirs + files:
            os.chmod(os.path.join(root, entry), 0o755 if entry in dirs else 0o644)
    return layout.ref


def _volume(env: Rootless, spec: dict[str, Any], index: int) -> Path:
    """The directory of the image's layer *index* (0: bottom), from the create JSON."""
    lower = spec["mounts"][0]["options"][0].split(",")[0].removeprefix("lowerdir=").split(":")
    return Path(os.path.realpath(lower[::-1][index]))


def test_init_store_gives_the_store_and_its_layout_to_the_user(rootless: Rootless) -> None:
    u = rootless.user
    for sub in ("", "images", "volumes", "l", "meta", "meta/dependencies", "locks", "tmp"):
        st = os.stat(os.path.join(rootless.store, sub))
        assert (st.st_uid, st.st_gid) == (u.uid, u.gid), sub
    # The user cannot make init-store rewrite its mappings, nor unmount the store.
    assert rootless.fails("init-store") == (
        f"store {rootless.store} can only be initialized by Root user"
    )
    assert rootless.fails("delete-store") == (
        f"store {rootless.store} can only be deleted by Root user"
    )
    assert sorted(os.listdir(rootless.store)) == sorted(
        ["images", "volumes", "l", "meta", "locks", "tmp", "projectids"]
    )


def test_user_creates_an_image_whose_layers_carry_mapped_owners(rootless: Rootless) -> None:
    u = rootless.user
    spec = json.loads(rootless.ok("create", "--without-mount", _image(rootless), "app"))

    assert spec["root"]["path"] == f"{rootless.store}/images/app/rootfs"
    (mount,) = spec["mounts"]
    assert (mount["destination"], mount["type"]) == ("/", "overlay")
    assert mount["options"][0].endswith(",userxattr")
    assert rootless.ok("list").split() == [f"{rootless.store}/images/app"]

    base, top = _volume(rootless, spec, 0), _volume(rootless, spec, 1)
    owners = {
        "bin/busybox": (u.uid, u.gid),  # 0 -> the user
        "home/vcap": (u.subid + 999, u.subid + 999),  # n -> subid + n - 1
        "home/vcap/app": (u.subid + 999, u.subid + 999),
        "bin/sg": (u.uid, u.subid + 41),
    }
    for name, ids in owners.items():
        st = (base / name).lstat()
        assert (st.st_uid, st.st_gid) == ids, name
    assert stat.S_IMODE((base / "bin/su").lstat().st_mode) == 0o4755
    assert stat.S_IMODE((base / "bin/sg").lstat().st_mode) == 0o2755
    # File capabilities become namespaced (v3, rooted at the user), user.* stays,
    # trusted.* is dropped: the kernel keeps it for root.
    caps = os.getxattr(base / "bin/ping", "security.capability")
    assert caps[3] == 3 and int.from_bytes(caps[20:24], "little") == u.uid
    assert os.getxattr(base / "bin/ping", "user.note") == b"kept"
    assert os.listxattr(base / "etc/trusted") == []
    assert ".skip-trusted-xattr-needs-root" in rootless.log.read_text()
    # Whiteouts are character devices 0/0; opaque directories use overlay's user xattr.
    gone = (top / "gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert (gone.st_uid, gone.st_gid) == (u.uid, u.gid)
    assert os.getxattr(top / "opq", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(top / "opq")


def test_user_runs_the_rootfs_in_its_namespace_then_stats_deletes_and_cleans(
    rootless: Rootless, grootfs: Any
) -> None:
    u = rootless.user
    spec = json.loads(rootless.ok("create", "--without-mount", _image(rootless), "app"))
    rootfs = spec["root"]["path"]
    inside = (
        "id -u; stat -c '%u:%g %a %n' /home/vcap /bin/su /bin/sg; ls /opq; "
        "test -e /gone || echo gone is hidden; "
        "echo hi > /home/vcap/new; busybox mkdir -p /var/private; "
        "cat /bin/busybox > /var/private/blob; "
        "busybox chown -R 1000:1000 /var/private; busybox chmod 700 /var/private"
    )
    script = (
        f"mount -t overlay overlay -o {shlex.quote(spec['mounts'][0]['options'][0])} "
        f"{shlex.quote(rootfs)} && chroot {shlex.quote(rootfs)} /bin/sh -c {shlex.quote(inside)}"
    )
    # util-linux 2.38's order: outer id, inner id, count (newuidmap writes them).
    maps = [f"--map-users={u.subid},1,{RANGE}", f"--map-groups={u.subid},1,{RANGE}"]
    unshare = ["unshare", "--user", "--map-root-user", *maps, "--mount", "/bin/sh", "-c", script]
    ran = _run(*rootless.as_user(*unshare), cwd="/")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [
        "0",
        "1000:1000 750 /home/vcap",
        "0:0 4755 /bin/su",
        "0:42 2755 /bin/sg",
        "upper",
        "gone is hidden",
    ]
    diff = Path(rootless.store, "images", "app", "diff")
    # Written by the container's root into a directory of its uid 1000.
    assert (diff / "home/vcap/new").stat().st_uid == u.uid
    assert (diff / "home/vcap").stat().st_uid == u.subid + 999
    private = (diff / "var/private").lstat()
    assert (private.st_uid, stat.S_IMODE(private.st_mode)) == (u.subid + 999, 0o700)

    # The user cannot read var/private: stats counts it from its namespace,
    # and agrees with root's own walk.
    usage = json.loads(rootless.ok("stats", "app"))["disk_usage"]
    as_root = json.loads(grootfs("stats", "app", store=rootless.store).stdout)["disk_usage"]
    assert usage == as_root
    assert usage["exclusive_bytes_used"] >= os.path.getsize(f.BUSYBOX)

    assert rootless.ok("delete", "app").strip() == "Image app deleted"
    assert rootless.ok("list").strip() == "Store empty"
    assert rootless.volumes()  # layers stay for the next create
    assert rootless.ok("clean").strip() == "clean completed"
    assert rootless.volumes() == []
    assert os.listdir(os.path.join(rootless.store, "tmp")) == []
    assert os.listdir(os.path.join(rootless.store, "images")) == []


def test_runc_runs_the_users_image_as_root_with_the_users_mappings(
    rootless: Rootless, grootfs: Any
) -> None:
    u = rootless.user
    spec = json.loads(rootless.ok("create", "--without-mount", _image(rootless), "app"))
    rootfs = spec["root"]["path"]
    mounted = _run(
        "mount", "-t", "overlay", "overlay", "-o", spec["mounts"][0]["options"][0], rootfs
    )
    assert mounted.returncode == 0, mounted.stderr
    try:
        maps = [(0, u.uid, 1), (1, u.subid, RANGE)]
        result = run_in_rootfs(
            spec,
            ["/bin/sh", "-c", "id -u; stat -c %u:%g /home/vcap; ls /opq; test -e /gone || echo ok"],
            uid_mappings=maps,
            gid_mappings=maps,
        )
    finally:
        assert _run("umount", rootfs).returncode == 0
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0", "1000:1000", "upper", "ok"]
    # Root's overlay left its work directory (root's, an id outside the user's
    # mappings): the user's delete takes the image out of use but cannot remove
    # that, its clean carries on past it, root's clean removes it.
    assert rootless.fails("delete", "app").endswith(
        "belongs to an id outside the store's mappings: only root can remove it"
    )
    assert rootless.ok("list").strip() == "Store empty"
    assert rootless.ok("clean").strip() == "clean completed"
    assert ".cannot-remove-leftover-without-root" in rootless.log.read_text()
    assert rootless.volumes() == []
    assert len(os.listdir(os.path.join(rootless.store, "tmp"))) == 1
    assert grootfs("clean", store=rootless.store).stdout.strip() == "clean completed"
    assert os.listdir(os.path.join(rootless.store, "tmp")) == []


def test_what_needs_root_says_so_in_one_line_and_changes_nothing(
    rootless: Rootless, grootfs: Any
) -> None:
    image = _image(rootless)
    assert rootless.fails("create", image, "a").startswith(
        "a non-root user cannot mount the image: create it with --without-mount"
    )
    assert rootless.fails(
        "create", "--without-mount", "--disk-limit-size-bytes", str(10 << 20), image, "a"
    ) == ("disk limits need root: a non-root user cannot set XFS project quotas")
    assert rootless.fails("check-quota") == "check-quota needs root: it sets an XFS project quota"
    assert os.listdir(os.path.join(rootless.store, "images")) == []
    assert rootless.volumes() == []

    # An image with a disk limit (root's create would make one on a store with
    # quotas, which this kernel lacks: its record is written as that create would).
    rootless.ok("create", "--without-mount", image, "limited")
    record_path = Path(rootless.store, "images", "limited", "image.json")
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "project_id": 7, "quota_size_bytes": 1 << 20}))
    assert rootless.fails("stats", "limited") == (
        "read disk usage of image `limited`: it has a disk limit, "
        "and reading an XFS project quota needs root"
    )
    assert rootless.ok("delete", "limited").strip() == "Image limited deleted"


def test_an_id_outside_the_mappings_fails_cleanly_and_leaves_no_layer(rootless: Rootless) -> None:
    layers = [[*f.busybox_layer(), f.file("far", b"x", uid=RANGE + 1)]]
    message = rootless.fails("create", "--without-mount", _image(rootless, "far", layers), "far")
    assert message.endswith(f"entry far: uid {RANGE + 1} is not mapped in this store")
    assert rootless.volumes() == []
    assert os.listdir(os.path.join(rootless.store, "images")) == []


def test_a_store_of_an_older_init_store_says_so_until_root_runs_it_again(
    rootless: Rootless, grootfs: Any
) -> None:
    # What init-store used to leave: only the store, images/, l/ and volumes/
    # were given to the mapped root (the user then hit a PermissionError traceback).
    for sub in ("meta", "meta/dependencies", "locks", "tmp", "projectids"):
        os.chown(os.path.join(rootless.store, sub), 0, 0)
    image = _image(rootless)
    assert rootless.fails("create", "--without-mount", image, "app") == (
        f"open lock {rootless.store}/locks/store.lock: Permission denied "
        "(a non-root user needs a store that root initialised with its id mappings)"
    )
    assert os.listdir(os.path.join(rootless.store, "images")) == []
    grootfs("init-store", *rootless.mappings(), store=rootless.store)
    rootless.ok("create", "--without-mount", image, "app")


def test_a_store_root_keeps_for_itself_is_one_line(user: User, dir_store: str) -> None:
    config = Path(dir_store).parent / "user.json"
    config.write_text(json.dumps({"store": dir_store}))
    config.chmod(0o644)
    env = Rootless(user, dir_store, Path(dir_store), str(config), Path("/nonexistent"))
    for command in (["list"], ["clean"], ["stats", "x"], ["create", "--without-mount", "/x", "x"]):
        assert env.fails(*command) == (
            f"read store {dir_store}: Permission denied "
            "(a non-root user needs a store that root initialised with its id mappings)"
        ), command


def test_user_regenerates_layer_sizes_it_cannot_read_itself(rootless: Rootless) -> None:
    rootless.ok("create", "--without-mount", _image(rootless), "app")
    meta = Path(rootless.store, "meta")
    records = {p.name: p.read_text() for p in meta.glob("volume-*")}
    assert len(records) == 2
    for name in records:
        (meta / name).unlink()
    # The base layer's home/vcap is its uid 1000's, mode 0750: the user cannot list it.
    assert rootless.ok("generate-volume-size-metadata") == ""
    assert {p.name: p.read_text() for p in meta.glob("volume-*")} == records


def test_newuidmap_bin_from_the_config_is_used_and_its_failure_is_one_line(
    rootless: Rootless,
) -> None:
    config = json.loads(Path(rootless.config).read_text())
    Path(rootless.config).write_text(json.dumps({**config, "newuidmap_bin": "/nonexistent/map"}))
    message = rootless.fails("create", "--without-mount", _image(rootless), "app")
    assert message.startswith("map the store's ids in a user namespace: ")
    assert "/nonexistent/map" in message
    assert rootless.volumes() == []
    assert os.listdir(os.path.join(rootless.store, "images")) == []


def test_the_clean_started_by_create_with_clean_maps_ids_with_the_configured_binary(
    rootless: Rootless,
) -> None:
    calls = rootless.log.parent / "newuidmap-calls"
    wrapper = rootless.work / "newuidmap"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec /usr/bin/newuidmap "$@"\n')
    wrapper.chmod(0o755)
    config = json.loads(Path(rootless.config).read_text())
    Path(rootless.config).write_text(json.dumps({**config, "newuidmap_bin": str(wrapper)}))

    rootless.ok("create", "--without-mount", _image(rootless), "old")
    rootless.ok("delete", "old")
    old_layers = rootless.volumes()
    assert len(calls.read_text().splitlines()) == 2  # one helper per layer unpacked
    new_image = _image(rootless, "new", [[*f.busybox_layer(), f.file("new", b"new")]])
    rootless.ok("create", "--without-mount", "--with-clean", new_image, "new")
    deadline = time.monotonic() + 30
    while '"message":"grootfs.clean.clean-completed"' not in rootless.log.read_text():
        assert time.monotonic() < deadline, "the detached clean did not finish"
        time.sleep(0.1)
    assert not set(old_layers) & set(rootless.volumes())
    assert os.listdir(os.path.join(rootless.store, "tmp")) == []
    # One more unpack, and the clean removing the old base layer (its home/vcap
    # is uid 1000's) through the configured binary.
    assert len(calls.read_text().splitlines()) == 4


def test_user_creates_gardens_two_layer_app_image(rootless: Rootless, tmp_path: Path) -> None:
    """The droplet (from nginx) unpacks under /home/vcap in the user's namespace."""
    import hashlib

    import blobstore
    import gardenlayout

    u = rootless.user
    stack = str(rootless.work / "rootfs.tar")
    f.write_tarball(stack, _layers()[0])
    os.chmod(stack, 0o644)
    root = tmp_path / "blobs"
    root.mkdir()
    droplet = f.compress(f.layer_tar([f.file("app/run", b"run", uid=2000, gid=2000)]), "gzip")
    (root / "droplet.tgz").write_bytes(droplet)
    with blobstore.Blobstore(tmp_path / "nginx", root) as store:
        image = gardenlayout.write(
            str(rootless.work / "depot" / "image"),
            stack,
            f"{store.url}/droplet.tgz",
            hashlib.sha256(droplet).hexdigest(),
        )
        for dirpath, dirs, _ in os.walk(image.path):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o755)
        spec = json.loads(
            rootless.ok("create", "--without-mount", "--skip-layer-validation", image.url, "app")
        )
    droplet_volume = _volume(rootless, spec, 1)
    vcap = (droplet_volume / "home/vcap").lstat()
    # The stack's /home/vcap (1000:1000, 0750), mapped: subid + 999.
    assert (vcap.st_uid, vcap.st_gid) == (u.subid + 999, u.subid + 999)
    assert stat.S_IMODE(vcap.st_mode) == 0o750
    run = (droplet_volume / "home/vcap/app/run").lstat()
    assert (run.st_uid, run.st_gid) == (u.subid + 1999, u.subid + 1999)
