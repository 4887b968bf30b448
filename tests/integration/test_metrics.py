"""Metrics on the wire: what each command sends to a fake loggregator agent, checked
against the store's real state (the layers' files on disk, the file system's usage).

The agent (tests/agent.py) decodes with the protobuf library and a .proto
written from the public dropsonde schema, not with the project's encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest

import agent as a
import imagefactory as f

NANOS, BYTES, PERCENTAGE, SECONDS = "nanos", "bytes", "percentage", "seconds"
UNITS = {
    "ImageCreationTime": NANOS,
    "ImageDeletionTime": NANOS,
    "ImageCleanTime": NANOS,
    "DownloadTime": NANOS,
    "UnpackTime": NANOS,
    "SharedLockingTime": NANOS,
    "ExclusiveLockingTime": NANOS,
    "UsedLayersSize": BYTES,
    "UnusedLayersSize": BYTES,
    "DownloadedLayersSizeInBytes": BYTES,
    "CommittedQuotaInBytes": BYTES,
    "UsedBackingStoreInBytes": BYTES,
    "DiskCachePercentage": PERCENTAGE,
    "DiskPurgeableCachePercentage": PERCENTAGE,
    "DiskCommittedPercentage": PERCENTAGE,
    "OldestUnusedLayerAge": SECONDS,
}
STORE_SIZES = ["UsedLayersSize", "UnusedLayersSize"]
CACHE = ["DiskCachePercentage", "DiskPurgeableCachePercentage", "OldestUnusedLayerAge"]
AFTER_CREATE = [
    "DownloadedLayersSizeInBytes",
    "CommittedQuotaInBytes",
    "UsedBackingStoreInBytes",
    "DiskCommittedPercentage",
]


@pytest.fixture
def agent():
    agent = a.Agent()
    yield agent
    agent.close()


@pytest.fixture
def images(tmp_path):
    """Two images sharing a base layer, each with a top layer of its own."""
    base = [f.directory("etc"), f.file("etc/base", b"b" * 50_000)]
    return {
        name: f.write_oci_layout(
            str(tmp_path / name), [base, [f.file(name, os.urandom(size))]], compression="gzip"
        )
        for name, size in (("one", 70_000), ("two", 130_000))
    }


def _run(grootfs, agent, store, *args, until=None, check=True, via_config=False):
    """Run one command with the agent's endpoint; its result, what arrived, and when.

    The endpoint goes as --metron-endpoint, or *via_config* as the config file's key.
    """
    before = time.time_ns()
    if via_config:
        config = {"metron_endpoint": agent.endpoint}
        result = grootfs(*args, store=store, check=check, config=config)
    else:
        result = grootfs("--metron-endpoint", agent.endpoint, *args, store=store, check=check)
    after = time.time_ns()
    got = agent.receive(until, timeout=10, quiet=0.3)
    for m in got:
        assert m.unit == UNITS[m.name], m
        assert before <= m.timestamp_ns <= time.time_ns(), m
        if m.unit == NANOS:
            assert 0 < m.value < after - before + 5e9, m  # the clean may run after the create
    return result, got, after - before


def _on_disk(store, chain_ids):
    """Bytes of regular-file content in these layers' volumes, each inode once."""
    total = 0
    for chain_id in chain_ids:
        seen = set()
        for root, _, files in os.walk(os.path.join(store, "volumes", chain_id.split(":")[1])):
            for name in files:
                st = os.lstat(os.path.join(root, name))
                if st.st_ino not in seen and (st.st_mode & 0o170000) == 0o100000:
                    seen.add(st.st_ino)
                    total += st.st_size
    return total


def _wait_for_detached_cleans(store, timeout=20):
    """Until no `grootfs ... clean` of this store runs (the store is deleted after the test)."""
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            if b"clean" in argv and store.encode() in argv:
                running.append(pid)
        if not running:
            return
        assert time.monotonic() < deadline, f"detached cleans still running: {running}"
        time.sleep(0.05)


def _fs(store):
    st = os.statvfs(store)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


def _by_name(got):
    return {m.name: m.value for m in got}


def test_a_cold_create_sends_what_grootfs_sends_with_true_values(grootfs, xfs_store, agent, images):
    one = images["one"]
    _, got, took = _run(grootfs, agent, xfs_store, "create", one.ref, "c1")

    assert Counter(a.names(got)) == Counter(
        ["ImageCreationTime", "SharedLockingTime"]
        + ["ExclusiveLockingTime", "DownloadTime", "UnpackTime"] * 2  # per layer pulled
        + STORE_SIZES
        + CACHE
        + AFTER_CREATE
    )
    v = _by_name(got)
    layers = _on_disk(xfs_store, one.chain_ids)
    assert layers == 50_000 + 70_000
    assert v["UsedLayersSize"] == layers
    assert v["UnusedLayersSize"] == 0
    assert v["DownloadedLayersSizeInBytes"] == layers
    assert v["CommittedQuotaInBytes"] == 0  # no disk limit (limits are tested in the VM tier)
    size, used = _fs(xfs_store)
    assert abs(v["UsedBackingStoreInBytes"] - used) <= 1 << 20
    assert v["UsedBackingStoreInBytes"] > layers
    assert v["DiskCachePercentage"] == pytest.approx(100 * layers / size)
    assert v["DiskCommittedPercentage"] == pytest.approx(100 * layers / size)
    assert v["DiskPurgeableCachePercentage"] == 0
    assert v["OldestUnusedLayerAge"] == 0

    downloads = sorted(m.value for m in got if m.name == "DownloadTime")
    unpacks = sorted(m.value for m in got if m.name == "UnpackTime")
    assert all(u <= d for u, d in zip(unpacks, downloads, strict=True))
    assert max(downloads) <= v["ImageCreationTime"] <= took


def test_a_warm_create_sends_no_layer_pull_metrics(grootfs, xfs_store, agent, images):
    grootfs("create", images["one"].ref, "c1", store=xfs_store)
    _, got, _ = _run(grootfs, agent, xfs_store, "create", images["one"].ref, "c2", via_config=True)
    assert Counter(a.names(got)) == Counter(
        ["ImageCreationTime", "SharedLockingTime", *STORE_SIZES, *CACHE, *AFTER_CREATE]
    )
    assert _by_name(got)["UsedLayersSize"] == _on_disk(xfs_store, images["one"].chain_ids)


def test_delete_sends_its_time_and_which_layers_are_left_unused(grootfs, xfs_store, agent, images):
    one, two = images["one"], images["two"]
    grootfs("create", one.ref, "c1", store=xfs_store)
    grootfs("create", two.ref, "c2", store=xfs_store)

    _, got, took = _run(grootfs, agent, xfs_store, "delete", "c2")
    assert sorted(a.names(got)) == sorted(["ImageDeletionTime", *STORE_SIZES, *CACHE])
    v = _by_name(got)
    assert 0 < v["ImageDeletionTime"] <= took
    assert v["UsedLayersSize"] == _on_disk(xfs_store, one.chain_ids)
    unused = _on_disk(xfs_store, two.chain_ids[1:])
    assert v["UnusedLayersSize"] == unused == 130_000
    size, _ = _fs(xfs_store)
    assert v["DiskPurgeableCachePercentage"] == pytest.approx(100 * unused / size)
    assert 0 <= v["OldestUnusedLayerAge"] < 5  # released just now

    result, got, _ = _run(grootfs, agent, xfs_store, "delete", "never-created")
    assert "not found" in result.stdout
    assert got == []  # as GrootFS: nothing for an image that is not there


def test_clean_sends_its_time_its_locks_and_what_is_left(grootfs, xfs_store, agent, images):
    one, two = images["one"], images["two"]
    grootfs("create", one.ref, "c1", store=xfs_store)
    grootfs("create", two.ref, "c2", store=xfs_store)
    grootfs("delete", "c2", store=xfs_store)
    # Pretend c2 was deleted an hour ago: its layer has waited that long for a clean.
    meta = os.path.join(xfs_store, "meta", "volume-" + two.chain_ids[1].split(":")[1])
    hour_ago = time.time() - 3600
    os.utime(meta, (hour_ago, hour_ago))

    result, got, _ = _run(grootfs, agent, xfs_store, "clean", "--threshold-bytes", str(1 << 40))
    assert result.stdout.startswith("threshold not reached")
    v = _by_name(got)
    assert v["UnusedLayersSize"] == _on_disk(xfs_store, two.chain_ids[1:])
    assert 3600 <= v["OldestUnusedLayerAge"] < 3600 + 60

    result, got, took = _run(grootfs, agent, xfs_store, "clean")
    assert result.stdout == "clean completed\n"
    assert Counter(a.names(got)) == Counter(
        ["ImageCleanTime", "ExclusiveLockingTime", "SharedLockingTime", *STORE_SIZES, *CACHE]
    )
    v = _by_name(got)
    assert v["UnusedLayersSize"] == 0
    assert v["UsedLayersSize"] == _on_disk(xfs_store, one.chain_ids)
    assert v["OldestUnusedLayerAge"] == 0
    assert v["ExclusiveLockingTime"] <= v["ImageCleanTime"] <= took


def test_the_clean_that_create_with_clean_starts_sends_its_metrics(
    grootfs, xfs_store, agent, images
):
    grootfs("create", images["two"].ref, "c2", store=xfs_store)
    grootfs("delete", "c2", store=xfs_store)

    _, got, _ = _run(
        grootfs,
        agent,
        xfs_store,
        "create",
        "--with-clean",
        images["one"].ref,
        "c1",
        until=lambda got: "ImageCleanTime" in a.names(got) and "UsedLayersSize" in a.names(got),
    )
    names = a.names(got)
    # The create leaves the layer sizes to its clean, as GrootFS does: they come once.
    pulled = ["ExclusiveLockingTime", "DownloadTime", "UnpackTime"]  # one's own top layer
    create = ["ImageCreationTime", "SharedLockingTime", *pulled, *AFTER_CREATE]
    clean = ["ImageCleanTime", "ExclusiveLockingTime", "SharedLockingTime", *STORE_SIZES, *CACHE]
    assert Counter(names) == Counter(create) + Counter(clean)
    _wait_for_detached_cleans(xfs_store)
    v = _by_name(got)
    assert v["UnusedLayersSize"] == 0  # two's own layer was collected
    assert v["UsedLayersSize"] == _on_disk(xfs_store, images["one"].chain_ids)


def test_a_failed_create_sends_its_time_only(grootfs, xfs_store, agent, images):
    grootfs("create", images["one"].ref, "c1", store=xfs_store)
    result, got, _ = _run(grootfs, agent, xfs_store, "create", images["one"].ref, "c1", check=False)
    assert result.returncode == 1
    assert sorted(a.names(got)) == ["ImageCreationTime", "SharedLockingTime"]


@pytest.mark.parametrize("command", [["stats", "c1"], ["list"], ["capacity"]])
def test_stats_list_and_capacity_send_nothing(grootfs, xfs_store, agent, images, command):
    grootfs("create", images["one"].ref, "c1", store=xfs_store)
    _, got, _ = _run(grootfs, agent, xfs_store, *command)
    assert got == []


def _closed_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize(
    "endpoint",
    # Loopback only: this machine's tests send nothing to any other address.
    [f"127.0.0.1:{_closed_port()}", "[::1]:9", "no-such-host.invalid:3457"],
    ids=["nobody-listening", "ipv6-discard", "a-host-name"],
)
def test_without_an_agent_every_command_behaves_as_without_metrics(
    grootfs, xfs_store, images, grootfs_log, tmp_path, endpoint
):
    def each(phase, *flags):
        clean_log = tmp_path / f"clean-{phase}.log"
        config = {"create": {"clean_log_file": str(clean_log)}}
        out = []
        for args in (
            ("create", images["one"].ref, "c1"),
            ("clean",),
            ("create", "--with-clean", images["two"].ref, "c2"),
            ("stats", "c1"),
            ("delete", "c1"),
            ("delete", "c2"),
        ):
            out.append(grootfs(*flags, *args, store=xfs_store, config=config).stdout)
            if "--with-clean" in args:  # its clean, detached, must be done before the next phase
                deadline = time.monotonic() + 20
                while ".clean-completed" not in (
                    clean_log.read_text() if clean_log.exists() else ""
                ):
                    assert time.monotonic() < deadline, "the detached clean did not finish"
                    time.sleep(0.05)
                _wait_for_detached_cleans(xfs_store)
        return out, clean_log

    plain, _ = each("plain")
    grootfs_log.unlink()
    with_endpoint, clean_log = each("metrics", "--metron-endpoint", endpoint)
    assert with_endpoint == plain
    lines = grootfs_log.read_text().splitlines() + clean_log.read_text().splitlines()
    errors = [
        json.loads(line)["message"].rpartition(".")[2]
        for line in lines
        if json.loads(line)["log_level"] == 2  # error
    ]
    if endpoint.startswith("no-such-host"):
        # Refused (no DNS lookup on every call), said by each command, never fatal.
        assert set(errors) == {"metrics-disabled"}
        assert len(errors) == 7  # six commands and the detached clean
    else:
        assert errors == []


def test_without_an_agent_a_warm_create_takes_as_long(grootfs, xfs_store, images):
    """Medians of warm create + delete with and without an endpoint nobody listens on.

    Loose on purpose (the machine is shared): a blocked or slow send would
    cost far more than the margin.
    """
    endpoint = f"127.0.0.1:{_closed_port()}"
    grootfs("create", images["one"].ref, "warm", store=xfs_store)
    times = {"without": [], "with": []}
    for i in range(7):
        for kind, flags in (("without", ()), ("with", ("--metron-endpoint", endpoint))):
            start = time.perf_counter()
            grootfs(*flags, "create", images["one"].ref, f"t{i}", store=xfs_store)
            grootfs(*flags, "delete", f"t{i}", store=xfs_store)
            times[kind].append(time.perf_counter() - start)
    without, with_ = (statistics.median(times[k]) for k in ("without", "with"))
    print(f"\nwarm create + delete: {without * 1e3:.1f} ms without, {with_ * 1e3:.1f} ms with")
    assert with_ < without + 0.05


def test_nothing_is_imported_for_metrics_without_an_endpoint(xfs_store, images, grootfs):
    grootfs("create", images["one"].ref, "warm", store=xfs_store)
    probe = (
        "import sys\n"
        "from grootfs_py import cli\n"
        "rc = cli.main(sys.argv[1:])\n"
        "sys.stderr.write(repr(sorted(m for m in ('_socket', 'socket', 'grootfs_py.usage')"
        " if m in sys.modules)))\n"
        "sys.exit(rc)\n"
    )

    def imported(*flags):
        argv = [sys.executable, "-c", probe, "--store", xfs_store, *flags, "create"]
        result = subprocess.run(
            [*argv, images["one"].ref, f"probe{len(flags)}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stderr.splitlines()[-1]

    assert imported() == "[]"
    assert imported("--metron-endpoint", f"127.0.0.1:{_closed_port()}") == (
        "['_socket', 'grootfs_py.usage']"
    )


@pytest.fixture
def quota_store(grootfs, require_root):
    """A store whose file system enforces XFS project quotas (the VM tier)."""
    parent = tempfile.mkdtemp(prefix="grootfs-metrics-quota-")
    store = os.path.join(parent, "store")
    grootfs("init-store", "--store-size-bytes", str(1 << 30), store=store)
    try:
        with open(os.path.join(store, "meta", "store.json")) as fh:
            assert json.load(fh)["quotas"], "no XFS project quotas here: tests/vm/run -m xfs_quota"
        yield store
    finally:
        grootfs("delete-store", store=store)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.xfs_quota
def test_committed_quota_is_the_sum_of_the_images_disk_quotas(grootfs, quota_store, agent, images):
    one, two = images["one"], images["two"]
    limit_one, limit_two = 50 << 20, 30 << 20
    grootfs("create", "--disk-limit-size-bytes", str(limit_one), one.ref, "c1", store=quota_store)
    _, got, _ = _run(
        grootfs,
        agent,
        quota_store,
        "create",
        "--disk-limit-size-bytes",
        str(limit_two),
        "--exclude-image-from-quota",
        two.ref,
        "c2",
    )
    v = _by_name(got)
    # c1's limit includes its layers (its project gets the rest); c2's excludes them.
    expected = (limit_one - _on_disk(quota_store, one.chain_ids)) + limit_two
    assert v["CommittedQuotaInBytes"] == expected
    size, _ = _fs(quota_store)
    layers = v["DownloadedLayersSizeInBytes"]
    assert layers == _on_disk(quota_store, [*one.chain_ids, two.chain_ids[1]])
    assert v["DiskCommittedPercentage"] == pytest.approx(100 * (layers + expected) / size)
