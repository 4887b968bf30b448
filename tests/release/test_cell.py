"""A simulated Diego cell: the job's lifecycle on BOSH's real paths, in a private mount namespace.

/var/vcap is a tmpfs, /var/vcap/data an ext4 "ephemeral disk" on a loop
device (40 GiB, sparse), the compiled packages and the rendered job laid out
as the agent lays them out. /etc/cron.d and /usr/local/sbin get tmpfs copies
of their own, and the host's mkfs.xfs is hidden: the stores can only be made
with the release's xfsprogs. The tests run in order, as a deploy would:
pre-start, Garden's calls, post-start, a scheduled clean, a restart.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest
from bosh import ROOT, Namespace, package_names, render_job

import garden
import imagefactory as f
import registry as reg
from blobstore import Blobstore

GiB = 1024**3
MiB = 1024**2
JOB = "/var/vcap/jobs/grootfs"
GROOTFS = "/var/vcap/packages/grootfs_py/bin/grootfs"
# Garden's image plugin: the shim, served by bin/grootfs-server (monit's process).
SHIM = "/var/vcap/packages/grootfs_py/bin/grootfs-shim"
RUN_DIR = "/var/vcap/sys/run/grootfs"
SOCKET = f"{RUN_DIR}/grootfs.sock"
PIDFILE = f"{RUN_DIR}/grootfs-server.pid"
PATH_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
# The shim with its fallback pointed nowhere: only the server can answer.
SERVER_ONLY = {**PATH_ENV, "GROOTFS_PYTHON_CLI": "/nonexistent/grootfs"}
STORES = {
    "unprivileged": "/var/vcap/data/grootfs/store/unprivileged",
    "privileged": "/var/vcap/data/grootfs/store/privileged",
}
CONFIGS = {
    "unprivileged": f"{JOB}/config/grootfs_config.yml",
    "privileged": f"{JOB}/config/privileged_grootfs_config.yml",
}
MAPPINGS = [(0, 4294967294, 1), (1, 1, 4294967293)]
# This machine's kernel (and CI's) cannot enforce XFS quotas, so the cell runs
# with the quota gate off; test_pre_start_with_require_quota_... turns it on.
PROPERTIES = {
    "grootfs": {
        "clean": {"threshold_in_mb": 0, "deadline_in_seconds": 10},
        "require_quota": False,
    }
}

_runc_spec = importlib.util.spec_from_file_location("runc", ROOT / "tests/integration/runc.py")
assert _runc_spec and _runc_spec.loader
runc = importlib.util.module_from_spec(_runc_spec)
_runc_spec.loader.exec_module(runc)


class Cell:
    def __init__(self, ns: Namespace, work: Path, disk_available: int) -> None:
        self.ns = ns
        self.work = work
        self.disk_available = disk_available

    def run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.ns.run(argv, **kwargs)  # type: ignore[arg-type]

    def grootfs(self, store: str, *args: str, check: bool = True) -> str:
        # As Garden calls the plugin (the shim): its extra args first, then the command.
        return self.run([SHIM, "--config", CONFIGS[store], *args], check=check).stdout

    def start_server(self) -> None:
        """What monit does after pre-start: bin/grootfs-server start, in the background."""
        self.run(
            ["bash", "-c", f"setsid {JOB}/bin/grootfs-server start </dev/null >/dev/null 2>&1 &"]
        )
        deadline = time.monotonic() + 30
        while self.run(["test", "-S", SOCKET], check=False).returncode != 0:
            assert time.monotonic() < deadline, "grootfs-server did not start"
            time.sleep(0.05)

    def stop_server(self) -> None:
        self.run([f"{JOB}/bin/grootfs-server", "stop"], timeout=60)

    def config(self, store: str) -> dict[str, object]:
        return json.loads(self.run(["cat", CONFIGS[store]]).stdout)

    def xfs_uuid(self, store: str) -> bytes:
        head = subprocess.run(
            [*self.ns.enter, "--", "head", "-c", "48", f"{STORES[store]}.backing-store"],
            capture_output=True,
            check=True,
        ).stdout
        assert head[:4] == b"XFSB"
        return head[32:48]

    def runc_run(self, spec: dict[str, object], argv: list[str], mapped: bool) -> str:
        root = spec["root"]["path"]  # type: ignore[index]
        env = spec.get("process", {}).get("env") or runc.DEFAULT_ENV  # type: ignore[union-attr]
        config = runc.runtime_config(
            root,
            argv,
            env,
            uid_mappings=MAPPINGS if mapped else None,
            gid_mappings=MAPPINGS if mapped else None,
        )
        bundle = Path(tempfile.mkdtemp(prefix="bundle-", dir=self.work))
        (bundle / "config.json").write_text(json.dumps(config))
        name = f"cell-{uuid.uuid4().hex[:8]}"
        state = str(self.work / "runc-state")
        try:
            return self.run(["runc", "--root", state, "run", "--bundle", str(bundle), name]).stdout
        finally:
            self.run(["runc", "--root", state, "delete", "--force", name], check=False)


def _loop_devices(pattern: str) -> list[str]:
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if pattern in line]


@pytest.fixture(scope="module")
def cell(require_root_module: None, compiled_packages: None):
    work = Path(tempfile.mkdtemp(prefix="grootfs-cell-", dir="/var/tmp"))
    work.chmod(0o755)
    disk = work / "ephemeral-disk.img"
    subprocess.run(["truncate", "-s", "40G", str(disk)], check=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(disk)],
        check=True,
    )
    ns = Namespace()
    try:
        ns.run(["mount", "-t", "tmpfs", "tmpfs", "/etc/cron.d"])
        ns.run(["mount", "-t", "tmpfs", "tmpfs", "/usr/local/sbin"])
        for tool in ("/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs"):
            if Path(tool).exists() and not Path(tool).is_symlink():
                ns.run(["mount", "--bind", "/dev/null", tool])
        ns.run(["mkdir", "-p", "/var/vcap/data"])
        ns.run(["mount", "-o", "loop", str(disk), "/var/vcap/data"])
        ns.run(["mkdir", "-p", "/var/vcap/data/sys/log", "/var/vcap/data/sys/run"])
        ns.run(["ln", "-s", "data/sys", "/var/vcap/sys"])
        for name in package_names():
            ns.install(name)
        rendered = work / "job"
        render_job("grootfs", PROPERTIES, rendered)
        ns.run(["mkdir", "-p", "/var/vcap/data/jobs", "/var/vcap/jobs"])
        ns.run(["cp", "-a", str(rendered), "/var/vcap/data/jobs/grootfs"])
        ns.run(["ln", "-s", "/var/vcap/data/jobs/grootfs", JOB])
        stat = ns.run(["stat", "-f", "-c", "%a %S", "/var/vcap/data"]).stdout.split()
        c = Cell(ns, work, int(stat[0]) * int(stat[1]))
        started = time.monotonic()
        c.pre_start_output = ns.run([f"{JOB}/bin/pre-start"], timeout=300).stdout
        c.pre_start_seconds = time.monotonic() - started
        c.start_server()
        yield c
    finally:
        ns.run([f"{JOB}/bin/grootfs-server", "stop"], check=False, timeout=60)
        ns.close()
        # Nothing may outlive the cell: no loop device on the disk or a store.
        deadline = time.monotonic() + 10
        while (leaks := _loop_devices(str(disk)) + _loop_devices("/var/vcap/data/grootfs")) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        for line in leaks:
            subprocess.run(["losetup", "--detach", line.split()[0]], check=False)
        shutil.rmtree(work, ignore_errors=True)
        assert not leaks, f"the cell left loop devices behind: {leaks}"


@pytest.fixture(scope="module")
def require_root_module() -> None:
    import os

    if os.geteuid() != 0:
        pytest.fail("the simulated cell needs root (mount namespaces, loop devices)", pytrace=False)


@pytest.fixture(scope="module")
def oci_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("cell-image")
    path.chmod(0o755)
    layout = f.write_oci_layout(
        str(path / "layout"),
        [f.busybox_layer(), [f.file("etc/motd", b"hello from the cell\n")]],
        env=["PATH=/bin"],
    )
    return f"oci://{layout.path}"


def test_pre_start_sizes_both_stores_within_what_the_reserve_leaves(cell):
    sizes = {s: cell.config(s)["init"]["store_size_bytes"] for s in STORES}
    budget = cell.disk_available - 15360 * MiB
    assert sum(sizes.values()) <= budget
    assert sum(sizes.values()) >= budget - 2 * MiB
    assert sizes["privileged"] == pytest.approx(0.2 * budget, abs=2 * MiB)
    for store in STORES:
        config = cell.config(store)
        assert 0 < config["clean"]["threshold_bytes"] < sizes[store]
        assert config["create"]["with_clean"] is True


def test_pre_start_formats_mounts_and_initialises_both_stores_with_the_packaged_mkfs(cell):
    assert cell.run(["readlink", "/usr/local/sbin/mkfs.xfs"]).stdout.strip() == (
        "/var/vcap/packages/xfsprogs/sbin/mkfs.xfs"
    )
    for store, path in STORES.items():
        fstype = cell.run(["findmnt", "--noheadings", "--output", "FSTYPE", path]).stdout.strip()
        assert fstype == "xfs"
        namespace = json.loads(cell.run(["cat", f"{path}/meta/namespace.json"]).stdout)
        assert bool(json.dumps(namespace).count("4294967294")) == (store == "unprivileged")
        size, blocks = cell.run(["stat", "-c", "%s %b", f"{path}.backing-store"]).stdout.split()
        assert int(blocks) * 512 < int(size) // 10  # sparse: not grown to its size
    assert "both stores ready" in cell.pre_start_output


def test_pre_start_installs_the_scheduled_clean(cell):
    entry = cell.run(["cat", "/etc/cron.d/grootfs-py-clean"]).stdout.splitlines()[-1]
    assert entry.startswith(f"*/30 * * * * root {JOB}/bin/clean >>/var/vcap/sys/log/grootfs/")


def test_monit_runs_the_server_on_its_socket_in_a_directory_only_root_enters(cell):
    pid = cell.run(["cat", PIDFILE]).stdout.strip()
    cmdline = cell.run(["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")
    assert cmdline[-4:-1] == ["serve", "--socket", SOCKET]
    assert cell.run(["stat", "-c", "%a %U", RUN_DIR]).stdout.split() == ["700", "root"]


@pytest.mark.parametrize("store", STORES)
def test_the_server_answers_garden_s_calls_through_the_shim(cell, oci_image, store):
    handle = f"served-{store}"
    argv = [SHIM, "--config", CONFIGS[store]]
    spec = json.loads(cell.run([*argv, "create", oci_image, handle], env=SERVER_ONLY).stdout)
    assert spec["root"]["path"] == f"{STORES[store]}/images/{handle}/rootfs"
    stats = json.loads(cell.run([*argv, "stats", handle], env=SERVER_ONLY).stdout)
    assert "total_bytes_used" in stats["disk_usage"]
    assert cell.run([*argv, "delete", handle], env=SERVER_ONLY).stdout.startswith("Image ")


def test_a_stopped_server_only_costs_speed(cell, oci_image):
    pid = cell.run(["cat", PIDFILE]).stdout.strip()
    cell.stop_server()
    try:
        assert cell.run(["test", "-e", SOCKET], check=False).returncode == 1
        assert cell.run(["test", "-e", PIDFILE], check=False).returncode == 1
        assert cell.run(["test", "-e", f"/proc/{pid}"], check=False).returncode == 1
        # Garden's calls still work: the shim runs the packaged Python command.
        spec = json.loads(cell.grootfs("unprivileged", "create", oci_image, "no-server"))
        assert spec["root"]["path"].endswith("/images/no-server/rootfs")
        assert "disk_usage" in json.loads(cell.grootfs("unprivileged", "stats", "no-server"))
        assert cell.grootfs("unprivileged", "delete", "no-server").startswith("Image ")
        # Without the fallback nothing answers: these calls really bypassed a server.
        refused = cell.run(
            [SHIM, "--config", CONFIGS["unprivileged"], "list"], env=SERVER_ONLY, check=False
        )
        assert refused.returncode != 0
    finally:
        cell.start_server()
    listed = cell.run([SHIM, "--config", CONFIGS["unprivileged"], "list"], env=SERVER_ONLY)
    assert listed.stdout.strip() == "Store empty"


@pytest.mark.parametrize("store", STORES)
def test_garden_creates_stats_runs_and_deletes_a_container(cell, oci_image, store):
    handle = f"garden-{store}"
    spec = json.loads(cell.grootfs(store, "create", oci_image, handle))
    assert spec["root"]["path"] == f"{STORES[store]}/images/{handle}/rootfs"
    stats = json.loads(cell.grootfs(store, "stats", handle))
    assert set(stats["disk_usage"]) >= {"total_bytes_used", "exclusive_bytes_used"}
    out = cell.runc_run(spec, ["/bin/sh", "-c", "cat /etc/motd; id -u"], store == "unprivileged")
    assert out.splitlines() == ["hello from the cell", "0"]
    assert cell.grootfs(store, "delete", handle).startswith("Image ")
    # Garden deletes through both plugins; the other store does not know the handle.
    other = "privileged" if store == "unprivileged" else "unprivileged"
    assert "not found. Skipping delete." in cell.grootfs(other, "delete", handle)
    assert cell.grootfs(store, "list").strip() == "Store empty"


def test_post_start_passes_the_canary_gate_on_both_stores(cell):
    out = cell.run([f"{JOB}/bin/post-start"], timeout=300).stdout
    assert out.count("canary passed") == 2
    for store in STORES:
        assert cell.grootfs(store, "list").strip() == "Store empty"


def test_post_start_fails_the_deploy_when_a_canary_cannot_be_created(cell):
    canary = "/var/vcap/packages/grootfs_py/canary/rootfs.tar"
    cell.run(["mv", canary, f"{canary}.away"])
    try:
        result = cell.run([f"{JOB}/bin/post-start"], check=False, timeout=300)
    finally:
        cell.run(["mv", f"{canary}.away", canary])
    assert result.returncode == 1
    assert "FAILED: create the canary image" in result.stderr


def test_the_scheduled_clean_collects_unused_layers_of_both_stores(cell, oci_image):
    for store in STORES:
        cell.grootfs(store, "create", oci_image, "short-lived")
        cell.grootfs(store, "delete", "short-lived")
        assert cell.run(["ls", f"{STORES[store]}/volumes"]).stdout.split()  # layers left behind
    out = cell.run([f"{JOB}/bin/clean"], timeout=120).stdout
    assert out.count("cleaned:") == 2
    for store in STORES:
        assert cell.run(["ls", f"{STORES[store]}/volumes"]).stdout.split() == []


def test_a_scheduled_clean_skips_while_another_one_runs(cell):
    # Another run (a separate process, as cron starts them) holds the lock.
    script = (
        "( exec 8>/var/vcap/sys/run/grootfs/clean.lock; flock 8; exec sleep 30 ) >/dev/null 2>&1 & "
        "holder=$!; sleep 1; "
        f"{JOB}/bin/clean; rc=$?; kill $holder; exit $rc"
    )
    result = cell.run(["bash", "-c", script], timeout=60)
    assert "another clean is still running: skipping" in result.stdout
    assert "cleaned:" not in result.stdout


def test_a_scheduled_clean_that_hangs_is_stopped_at_its_deadline(cell):
    # A store lock held elsewhere makes grootfs clean wait (up to its own 300 s).
    lock = f"{STORES['unprivileged']}/locks/store.lock"
    script = (
        f"( exec 8>{lock}; flock --exclusive 8; exec sleep 60 ) >/dev/null 2>&1 & holder=$!; "
        "sleep 1; "
        f"start=$(date +%s); {JOB}/bin/clean; rc=$?; kill $holder; "
        'echo "rc=$rc elapsed=$(( $(date +%s) - start ))"'
    )
    out = cell.run(["bash", "-c", script], timeout=120).stdout
    last = dict(kv.split("=") for kv in out.splitlines()[-1].split())
    assert last["rc"] == "1"
    assert int(last["elapsed"]) < 40  # the 10 s deadline, not the lock's 300 s
    assert "failed or passed the deadline (status 124)" in out


def test_pre_start_with_require_quota_fails_exactly_when_check_quota_does(cell):
    # This machine's kernel lacks XFS quotas (CI's too); a stemcell's has them.
    enforced = all(
        cell.run([GROOTFS, "--config", CONFIGS[s], "check-quota"], check=False).returncode == 0
        for s in STORES
    )
    rendered = cell.work / "job-require-quota"
    render_job("grootfs", {"grootfs": {**PROPERTIES["grootfs"], "require_quota": True}}, rendered)
    pre_start = f"{JOB}/bin/pre-start"
    cell.run(["cp", pre_start, f"{pre_start}.default"])
    cell.run(["cp", str(rendered / "bin" / "pre-start"), pre_start])
    try:
        result = cell.run([pre_start], check=False, timeout=300)
    finally:
        cell.run(["mv", f"{pre_start}.default", pre_start])
    assert (result.returncode == 0) == enforced, result.stdout + result.stderr
    if not enforced:
        assert "does not enforce disk quotas" in result.stderr


def test_restart_and_reboot_keep_the_stores_and_their_images(cell, oci_image):
    cell.grootfs("unprivileged", "create", oci_image, "survivor")
    uuids = {s: cell.xfs_uuid(s) for s in STORES}
    configs = {s: cell.config(s) for s in STORES}

    # A restart: pre-start again with everything mounted.
    cell.run([f"{JOB}/bin/pre-start"], timeout=300)
    # A reboot: the stores and the images' overlays are gone, the disk stays.
    for path in STORES.values():
        cell.run(["umount", "--recursive", path])
    cell.run([f"{JOB}/bin/pre-start"], timeout=300)

    assert {s: cell.xfs_uuid(s) for s in STORES} == uuids  # not reformatted
    assert {s: cell.config(s) for s in STORES} == configs  # sized the same
    listed = cell.grootfs("unprivileged", "list").split()
    assert listed == [f"{STORES['unprivileged']}/images/survivor"]
    assert cell.grootfs("unprivileged", "delete", "survivor").startswith("Image ")


# A fake loggregator agent for the metrics test: run in a network namespace of
# its own (inside the cell's mount namespace) so that it can take the agent's
# real port, 127.0.0.1:3457, which the job renders into both configs. It runs
# Garden's calls, waits for the cleans they start, and prints every datagram.
_AGENT = """
import json, os, socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 3457))
answers = [subprocess.run(argv, capture_output=True, text=True).returncode
           for argv in json.loads(sys.argv[1])]
deadline = time.monotonic() + 60
def cleans_running():
    found = False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        found = found or (b"clean" in argv and b"--metron-endpoint" in argv)
    return found
while cleans_running() and time.monotonic() < deadline:
    time.sleep(0.05)
sock.settimeout(0.5)
datagrams = []
while True:
    try:
        datagrams.append(sock.recv(65536).hex())
    except TimeoutError:
        break
print(json.dumps({"answers": answers, "datagrams": datagrams}))
"""


def test_a_fake_loggregator_agent_on_port_3457_receives_the_creates_and_deletes_metrics(
    cell, oci_image
):
    import sys
    from collections import Counter

    import agent

    for store in STORES:
        assert cell.config(store)["metron_endpoint"] == "127.0.0.1:3457"
    calls = [
        [GROOTFS, "--config", CONFIGS[store], *args]
        for store in STORES
        for args in (("create", oci_image, f"metrics-{store}"), ("delete", f"metrics-{store}"))
    ]
    out = cell.run(["unshare", "--net", sys.executable, "-c", _AGENT, json.dumps(calls)]).stdout
    report = json.loads(out)
    assert report["answers"] == [0, 0, 0, 0]
    got = [agent.decode(bytes.fromhex(d)) for d in report["datagrams"]]

    names = Counter(agent.names(got))
    # Per store: a create (pre-start sets create.with_clean, so its clean sends
    # the layer sizes), that clean, and a delete. The image's layers were
    # pulled by earlier tests' creates or are pulled now: both are right.
    assert names["ImageCreationTime"] == 2
    assert names["ImageDeletionTime"] == 2
    assert names["ImageCleanTime"] == 2
    assert names["UsedBackingStoreInBytes"] == 2
    assert names["CommittedQuotaInBytes"] == 2
    assert names["UsedLayersSize"] == names["UnusedLayersSize"] == 4  # two cleans, two deletes
    assert names["DownloadTime"] == names["UnpackTime"] <= 4
    for m in got:
        if m.name.endswith("Time"):
            assert m.unit == "nanos" and m.value > 0, m
        elif m.name.endswith("Percentage"):
            assert m.unit == "percentage" and 0 <= m.value <= 100, m
        elif m.name == "OldestUnusedLayerAge":
            assert m.unit == "seconds" and m.value >= 0, m
        else:
            assert m.unit == "bytes" and m.value >= 0, m
    backing = [m.value for m in got if m.name == "UsedBackingStoreInBytes"]
    assert all(v > 0 for v in backing)


# ---------------------------------------------------------------------------
# Diego on the cell: Garden's calls, made by the emulator in tests/garden.py
# ---------------------------------------------------------------------------

STACK = "/var/vcap/packages/cflinuxfs4/rootfs.tar"  # unresolved: the package dir is a symlink
DEPOT = "/var/vcap/data/garden/depot"  # where garden-runc-release keeps it
VCAP = 2000  # the stack's vcap user


class Diego:
    """What the cell's rep has to work with: Garden (emulated), a registry, a blobstore."""

    def __init__(self, cell: Cell, work: Path) -> None:
        self.cell = cell
        self.work = work
        self.garden = garden.Garden(
            GROOTFS,
            CONFIGS["unprivileged"],
            CONFIGS["privileged"],
            DEPOT,
            run=lambda argv: cell.run(argv, check=False),
        )
        self.pki = work / "pki"
        self.ca = reg.make_ca(self.pki)
        self.server = reg.make_cert(self.pki, "server", self.ca, server=True)
        self.client = reg.make_cert(self.pki, "client", self.ca, server=False)
        self.registry: reg.Registry | None = None
        self.blobstore: Blobstore | None = None
        self.docker_url = ""
        self.droplet_url = ""
        self.droplet_digest = ""

    def redeploy_with_certificates(self) -> None:
        """A deploy that sets grootfs.tls.*: BOSH renders the job again, pre-start runs."""
        props = {
            **PROPERTIES["grootfs"],
            "tls": {
                "ca_cert": self.ca.cert.read_text(),
                "cert": self.client.cert.read_text(),
                "key": self.client.key.read_text(),
            },
        }
        rendered = self.work / "job-tls"
        render_job("grootfs", {"grootfs": props}, rendered)
        self.cell.run(["cp", "-a", f"{rendered}/.", "/var/vcap/data/jobs/grootfs/"])
        self.cell.run([f"{JOB}/bin/pre-start"], timeout=300)

    def install_stack(self) -> None:
        """A cflinuxfs4-like stack package: a plain tar, where Diego's preloaded rootfs points."""
        tar = f.write_tarball(
            str(self.work / "rootfs.tar"),
            [
                *f.busybox_layer(),
                f.file("etc/stack", b"cflinuxfs4\n"),
                f.directory("home"),
                f.directory("home/vcap", mode=0o750, uid=VCAP, gid=VCAP),
            ],
        )
        target = "/var/vcap/data/packages/cflinuxfs4/0123abcd"
        self.cell.run(["mkdir", "-p", target])
        self.cell.run(["cp", tar, f"{target}/rootfs.tar"])
        self.cell.run(["ln", "-sfn", target, "/var/vcap/packages/cflinuxfs4"])

    def start_registry(self) -> str:
        """A TLS registry whose certificate only the job's remote-layer.crt makes trusted."""
        storage = self.work / "registry-storage"
        layout = f.write_oci_layout(
            str(self.work / "docker-app"),
            [f.busybox_layer(), [f.file("etc/motd", b"hello from a docker app\n")]],
            tag="v1",
            env=["PATH=/bin", "GREETING=docker"],
        )
        with reg.Registry(self.work / "push-registry", storage) as open_registry:
            reg.push(layout.path, "v1", open_registry.host, "apps/docker-app:v1")
        self.registry = reg.Registry(self.work / "registry", storage, tls=self.server).start()
        return f"docker://{self.registry.host}/apps/docker-app#v1"

    def start_blobstore(self) -> None:
        """The droplet blobstore: nginx over HTTPS asking for the job's client certificate."""
        blobs = self.work / "blobs"
        (blobs / "droplets").mkdir(parents=True)
        droplet = f.compress(
            f.layer_tar(
                [
                    f.directory("app", uid=VCAP, gid=VCAP),
                    f.file("app/index.html", b"hello from a droplet\n", uid=VCAP, gid=VCAP),
                ]
            ),
            "gzip",
        )
        (blobs / "droplets" / "web-droplet.tgz").write_bytes(droplet)
        self.droplet_digest = f.sha256(droplet).removeprefix("sha256:")
        self.blobstore = Blobstore(
            self.work / "nginx", blobs, tls=self.server, client_ca=self.ca.cert
        ).start()
        self.droplet_url = f"{self.blobstore.url}/droplets/web-droplet.tgz"

    def two_layer_rootfs(self) -> str:
        """The rootfs Diego's rep sends for a buildpack app in two-layer mode."""
        query = urlencode(
            {
                "layer": self.droplet_url,
                "layer_path": "/home/vcap",
                "layer_digest": self.droplet_digest,
            }
        )
        return f"preloaded+layer:{STACK}?{query}"

    def volumes(self, store: str) -> list[str]:
        return self.cell.run(["ls", f"{STORES[store]}/volumes"]).stdout.split()

    def run_in(self, container: garden.Container, script: str) -> list[str]:
        spec = {"root": {"path": container.spec.root_path}, "process": {"env": container.spec.env}}
        mapped = not container.privileged
        return self.cell.runc_run(spec, ["/bin/sh", "-c", script], mapped).splitlines()

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()
        if self.blobstore is not None:
            self.blobstore.stop()


@pytest.fixture(scope="module")
def diego(cell):
    work = Path(tempfile.mkdtemp(prefix="diego-", dir=cell.work))
    work.chmod(0o755)
    d = Diego(cell, work)
    try:
        d.redeploy_with_certificates()
        d.install_stack()
        d.docker_url = d.start_registry()
        d.start_blobstore()
        yield d
    finally:
        d.stop()


def test_a_redeploy_installs_the_set_certificates_for_both_stores(diego):
    certs = diego.cell.run(["ls", f"{JOB}/config/certs"]).stdout.split()
    assert certs == ["remote-layer.cert", "remote-layer.crt", "remote-layer.key"]
    for store in STORES:
        create = diego.cell.config(store)["create"]
        assert create["remote_layer_client_certificates_path"] == f"{JOB}/config/certs"
        assert create["skip_layer_validation"] is True


def test_diego_runs_a_docker_app_from_a_registry_the_job_certificates_trust(diego):
    app = diego.garden.create("docker-app-1", diego.docker_url)
    assert diego.garden.calls[-1].argv[-2] == diego.docker_url.replace("#", ":")
    assert app.spec.root_path == f"{STORES['unprivileged']}/images/docker-app-1/rootfs"
    assert "GREETING=docker" in app.spec.env
    assert diego.run_in(app, "cat /etc/motd; id -u") == ["hello from a docker app", "0"]


def test_diego_runs_a_privileged_task_on_the_plain_stack(diego):
    task = diego.garden.create("task-1", STACK, privileged=True)
    assert task.spec.root_path == f"{STORES['privileged']}/images/task-1/rootfs"
    assert diego.run_in(task, "cat /etc/stack; id -u; stat -c %u /home/vcap") == [
        "cflinuxfs4",
        "0",
        str(VCAP),
    ]


def test_diego_runs_a_buildpack_app_in_two_layer_mode(diego):
    before = diego.volumes("unprivileged")
    app = diego.garden.create("web-1", diego.two_layer_rootfs())
    # Garden wrote the app's layout in its depot and passed that to create.
    assert diego.garden.calls[-1].argv[-2:] == [f"oci://{DEPOT}/web-1/image", "web-1"]
    assert diego.run_in(
        app, "cat /home/vcap/app/index.html /etc/stack; stat -c '%u %a' /home/vcap /home/vcap/app"
    ) == ["hello from a droplet", "cflinuxfs4", f"{VCAP} 750", f"{VCAP} 755"]
    # The droplet came once from the blobstore, which only serves the job's client certificate.
    size = (diego.work / "blobs" / "droplets" / "web-droplet.tgz").stat().st_size
    assert diego.blobstore.requests("/droplets/web-droplet.tgz") == [
        f"GET /droplets/web-droplet.tgz 200 {size}"
    ]
    added = sorted(set(diego.volumes("unprivileged")) - set(before))
    assert len(added) == 2  # the stack and the droplet
    # A plain app of the same stack (a path, as for a preloaded: rootfs) shares its volume.
    diego.garden.create("plain-1", STACK)
    assert sorted(set(diego.volumes("unprivileged")) - set(before)) == added


def test_garden_stats_every_container_falling_back_for_privileged_ones(diego):
    assert diego.garden.containers  # the tests above made some
    for handle, container in diego.garden.containers.items():
        diego.garden.calls.clear()
        total, exclusive = diego.garden.stats(handle)
        assert total > 0 and 0 <= exclusive <= total, handle
        stores = [c.argv[2] for c in diego.garden.calls]
        expected = ["unprivileged", "privileged"] if container.privileged else ["unprivileged"]
        assert stores == [CONFIGS[s] for s in expected], handle
        assert diego.garden.calls[-1].returncode == 0


def test_garden_destroys_every_container_in_both_stores(diego):
    for handle in list(diego.garden.containers):
        diego.garden.calls.clear()
        diego.garden.destroy(handle)
        assert [(c.command, c.argv[2]) for c in diego.garden.calls] == [
            ("delete", CONFIGS["unprivileged"]),
            ("delete", CONFIGS["privileged"]),
        ]
    for store in STORES:
        assert diego.cell.grootfs(store, "list").strip() == "Store empty"
    assert diego.cell.run(["ls", "-A", DEPOT], check=False).stdout.strip() == ""


def test_garden_keeps_every_line_of_both_stores_logs_at_its_level(diego):
    for name in ("grootfs.log", "privileged_grootfs.log"):
        text = diego.cell.run(["cat", f"/var/vcap/sys/log/grootfs/{name}"]).stdout
        relogged = garden.relog(text)
        assert relogged, name
        kept = [r for r in relogged if r.entry.is_lager and r.garden_level != "crash"]
        assert kept == relogged, [r.entry.raw for r in relogged if r not in kept][:3]
        assert {r.entry.source for r in relogged} == {"grootfs"}
