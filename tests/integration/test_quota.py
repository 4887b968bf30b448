"""Disk limits with XFS project quotas.

These need a kernel that enforces XFS project quotas: `make test` runs them
on the host when it can, and otherwise inside a VM with Debian's kernel
(tests/vm/run). On a kernel without quota support they fail, never skip.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

import imagefactory as f

pytestmark = pytest.mark.xfs_quota
MiB = 1 << 20


@pytest.fixture
def quota_store(grootfs, require_root):
    parent = tempfile.mkdtemp(prefix="grootfs-quota-")
    store = os.path.join(parent, "store")
    grootfs("init-store", "--store-size-bytes", str(1 << 30), store=store)
    try:
        with open(os.path.join(store, "meta", "store.json")) as fh:
            assert json.load(fh)["quotas"], (
                "this kernel does not enforce XFS project quotas: run these tests with "
                "tests/vm/run -m xfs_quota (make test does)"
            )
        yield store
    finally:
        grootfs("delete-store", store=store)
        shutil.rmtree(parent, ignore_errors=True)


def _image(tmp_path, size, name="l"):
    # Random bytes: compression cannot shrink them, so compressed and
    # uncompressed sizes agree.
    return f.write_oci_layout(str(tmp_path / name), [[f.file("base", os.urandom(size))]])


def _write(path, size):
    """Write *size* bytes; True if all of it fit, False if the kernel refused."""
    try:
        with open(path, "wb") as fh:
            fh.write(b"\1" * size)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        assert exc.errno in (122, 28), exc  # EDQUOT, or ENOSPC from XFS project quota
        return False
    return True


def _project_limits(store):
    """{project id: hard block limit in KiB} as xfs_quota reports them."""
    out = subprocess.run(
        ["xfs_quota", "-x", "-c", "report -p -b -N -n", store],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    limits = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].startswith("#"):
            limits[int(fields[0][1:])] = int(fields[3])
    return limits


def test_inclusive_limit_counts_the_image(grootfs, quota_store, tmp_path):
    layout = _image(tmp_path, 5 * MiB)
    spec = json.loads(
        grootfs(
            "create",
            "--disk-limit-size-bytes",
            str(10 * MiB),
            f"oci://{layout.path}",
            "inc",
            store=quota_store,
        ).stdout
    )
    rootfs = spec["root"]["path"]
    assert _write(os.path.join(rootfs, "four"), 4 * MiB)
    assert not _write(os.path.join(rootfs, "two-more"), 2 * MiB)


def test_exclusive_limit_ignores_the_image(grootfs, quota_store, tmp_path):
    layout = _image(tmp_path, 5 * MiB)
    spec = json.loads(
        grootfs(
            "create",
            "--disk-limit-size-bytes",
            str(10 * MiB),
            "--exclude-image-from-quota",
            f"oci://{layout.path}",
            "exc",
            store=quota_store,
        ).stdout
    )
    rootfs = spec["root"]["path"]
    assert _write(os.path.join(rootfs, "six"), 6 * MiB)
    assert not _write(os.path.join(rootfs, "five-more"), 5 * MiB)


def test_stats_read_usage_from_the_kernel(grootfs, quota_store, tmp_path):
    layout = _image(tmp_path, 1 * MiB)
    spec = json.loads(
        grootfs(
            "create",
            "--disk-limit-size-bytes",
            str(20 * MiB),
            f"oci://{layout.path}",
            "st",
            store=quota_store,
        ).stdout
    )
    sizes = [3 * MiB, 1 * MiB + 17, 4096]
    for i, size in enumerate(sizes):
        assert _write(os.path.join(spec["root"]["path"], f"f{i}"), size)
    usage = json.loads(grootfs("stats", "st", store=quota_store).stdout)["disk_usage"]
    block = 4096
    # One block per file of slack, plus the upper directory's own blocks.
    assert sum(sizes) <= usage["exclusive_bytes_used"] <= sum(sizes) + block * (len(sizes) + 2)
    assert usage["total_bytes_used"] == usage["exclusive_bytes_used"] + 1 * MiB
    assert usage["quota_size_bytes"] == 20 * MiB - 1 * MiB
    assert usage["committed_space_bytes"] == 20 * MiB


def test_compressed_layers_over_the_limit_fail_before_download(grootfs, quota_store, tmp_path):
    layout = _image(tmp_path, 3 * MiB)
    result = grootfs(
        "create",
        "--disk-limit-size-bytes",
        str(2 * MiB),
        f"oci://{layout.path}",
        "big",
        store=quota_store,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "layers exceed disk quota\n")
    assert os.listdir(os.path.join(quota_store, "volumes")) == []


def test_uncompressed_layers_over_the_limit_fail_while_unpacking(grootfs, quota_store, tmp_path):
    # 8 MiB of zeros compress to a few KiB: only unpacking shows the size.
    layout = f.write_oci_layout(str(tmp_path / "z"), [[f.file("zeros", bytes(8 * MiB))]])
    result = grootfs(
        "create",
        "--disk-limit-size-bytes",
        str(4 * MiB),
        f"oci://{layout.path}",
        "zip",
        store=quota_store,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "uncompressed layer size exceeds quota\n")
    assert os.listdir(os.path.join(quota_store, "volumes")) == []
    assert os.listdir(os.path.join(quota_store, "images")) == []


def test_limit_below_cached_image_size_is_refused(grootfs, quota_store, tmp_path):
    layout = _image(tmp_path, 3 * MiB)
    grootfs("create", f"oci://{layout.path}", "warm", store=quota_store)
    result = grootfs(
        "create",
        "--disk-limit-size-bytes",
        str(2 * MiB + 4096),
        f"oci://{layout.path}",
        "small",
        store=quota_store,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "disk limit is smaller than volume size\n")


def test_project_ids_are_reused_after_delete(grootfs, quota_store, tmp_path):
    layout = _image(tmp_path, 64 * 1024)
    url = f"oci://{layout.path}"

    def project_of(image_id):
        with open(os.path.join(quota_store, "images", image_id, "image.json")) as fh:
            return json.load(fh)["project_id"]

    grootfs("create", "--disk-limit-size-bytes", str(10 * MiB), url, "a", store=quota_store)
    first = project_of("a")
    grootfs("delete", "a", store=quota_store)
    assert os.listdir(os.path.join(quota_store, "projectids")) == []
    grootfs("create", "--disk-limit-size-bytes", str(10 * MiB), url, "b", store=quota_store)
    assert project_of("b") == first


def test_200_limited_creates_and_deletes_leave_no_limit_behind(quota_store, tmp_path):
    # In-process: 400 interpreter start-ups under software emulation would
    # take most of the tier's time budget, and the behaviour is the library's.
    from grootfs_py import images
    from grootfs_py.store import Store

    layout = _image(tmp_path, 64 * 1024)
    store = Store(quota_store)
    options = images.CreateOptions(disk_limit_size_bytes=8 * MiB)
    for i in range(200):
        images.create(store, f"oci://{layout.path}", f"c{i}", options)
    limits = _project_limits(quota_store)
    assert len([p for p, kib in limits.items() if p and kib]) == 200
    for i in range(200):
        assert images.delete(store, f"c{i}") == f"c{i}"
    assert {p: kib for p, kib in _project_limits(quota_store).items() if p and kib} == {}
    assert os.listdir(os.path.join(quota_store, "projectids")) == []


def test_check_quota_proves_enforcement(grootfs, quota_store):
    assert grootfs("check-quota", store=quota_store).stdout == ""
    assert os.listdir(os.path.join(quota_store, "projectids")) == []
    assert os.listdir(os.path.join(quota_store, "tmp")) == []
