"""init-store / delete-store on real loop devices and XFS."""

import json
import os
import subprocess
import threading
import time

from grootfs_py import mounts

GiB = 1 << 30


def _loops(backing):
    out = subprocess.run(["losetup", "-j", backing], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_init_store_formats_once_and_remounts_after_unmount(grootfs, tmp_path):
    store = str(tmp_path / "store")
    backing = store + ".backing-store"
    grootfs("init-store", "--store-size-bytes", str(GiB), store=store)
    try:
        info = mounts.find(store)
        assert info.fstype == "xfs"
        assert "noatime" in info.options
        st = os.stat(backing)
        assert st.st_size == GiB
        assert st.st_blocks * 512 < GiB // 4, "the backing file must be sparse"
        with open(os.path.join(store, "meta", "store.json")) as fh:
            # This kernel has no XFS quota support: the store says so.
            assert json.load(fh)["quotas"] == ("prjquota" in info.options)
        marker = os.path.join(store, "keep-me")
        open(marker, "w").close()

        grootfs("init-store", "--store-size-bytes", str(GiB), store=store)  # idempotent
        assert os.path.exists(marker)
        subprocess.run(["umount", store], check=True)  # e.g. a reboot
        assert not os.path.exists(marker)
        grootfs("init-store", "--store-size-bytes", str(GiB), store=store)
        assert os.path.exists(marker), "an existing backing file must never be reformatted"
        assert len(_loops(backing).splitlines()) == 1
    finally:
        grootfs("delete-store", store=store)
    assert not os.path.exists(store)
    assert not os.path.exists(backing)
    assert mounts.find(store) is None


def test_delete_store_with_images_leaves_no_mount_or_loop_device(grootfs, tmp_path):
    import imagefactory as f

    store = str(tmp_path / "store")
    grootfs("init-store", "--store-size-bytes", str(GiB), store=store)
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]])
    for i in range(3):
        grootfs("create", f"oci://{layout.path}", f"c{i}", store=store)
    grootfs("delete-store", store=store)
    assert mounts.under(str(tmp_path)) == []
    assert mounts.find(store) is None
    assert _loops(store + ".backing-store") == ""
    assert os.listdir(tmp_path) == ["l"]


def test_delete_store_of_missing_store_succeeds(grootfs, tmp_path):
    assert grootfs("delete-store", store=str(tmp_path / "none")).returncode == 0


def test_mappings_must_match_on_later_runs(grootfs, dir_store):
    result = grootfs("init-store", "--uid-mapping", "0:1000:1", store=dir_store, check=False)
    assert result.returncode == 1
    assert result.stdout == (
        "provided id mappings do not match those already configured in the store\n"
    )


def test_directory_store_works_without_a_backing_file(grootfs, dir_store, tmp_path):
    import imagefactory as f

    assert not os.path.exists(dir_store + ".backing-store")
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("hello", b"world")]])
    out = grootfs("create", f"oci://{layout.path}", "dev", store=dir_store).stdout
    rootfs = json.loads(out)["root"]["path"]
    with open(os.path.join(rootfs, "hello"), "rb") as fh:
        assert fh.read() == b"world"
    grootfs("delete", "dev", store=dir_store)


def test_capacity_reports_the_configured_store_size(grootfs, dir_store, tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("init:\n  store_size_bytes: 123456789\n")
    out = grootfs("--config", str(config), "capacity", store=dir_store).stdout
    assert json.loads(out) == {"capacity": 123456789}


def _dio(store):
    device = mounts.find(store).source
    with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as fh:
        return fh.read().strip()


def test_direct_io_is_set_when_asked_and_cleared_when_not(grootfs, tmp_path):
    store = str(tmp_path / "store")
    try:
        grootfs("init-store", "--store-size-bytes", str(GiB), "--with-direct-io", store=store)
        assert _dio(store) == "1"
        grootfs("init-store", "--store-size-bytes", str(GiB), store=store)
        assert _dio(store) == "0"
        config = tmp_path / "c.yml"
        config.write_text("init:\n  with_direct_io: true\n  store_size_bytes: 1073741824\n")
        grootfs("--config", str(config), "init-store", store=store)
        assert _dio(store) == "1"
    finally:
        grootfs("delete-store", store=store)


def test_check_quota_fails_clearly_on_a_store_without_quotas(grootfs, dir_store):
    # A plain-directory store never has project quotas, whatever the kernel.
    result = grootfs("check-quota", store=dir_store, check=False)
    assert result.returncode == 1
    assert result.stdout == (
        "store cannot enforce disk quotas: it is not mounted with XFS project quotas\n"
    )


def test_a_crash_right_after_init_store_leaves_a_usable_store(grootfs, xfs_store):
    # XFS's simulated crash: the log reaches the disk, data not yet written back does not.
    subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", xfs_store], check=True)
    subprocess.run(["umount", xfs_store], check=True)

    grootfs("init-store", "--store-size-bytes", str(GiB), store=xfs_store)

    with open(os.path.join(xfs_store, "meta", "namespace.json")) as fh:
        assert json.load(fh)["uid_mappings"] is not None
    assert grootfs("list", store=xfs_store).stdout == "Store empty\n"


def test_delete_store_waits_for_a_store_that_is_busy_for_a_moment(grootfs, xfs_store):
    # What a create's settler (settle.py) still flushing looks like: the store held open.
    fd = os.open(xfs_store, os.O_RDONLY | os.O_DIRECTORY)
    releaser = threading.Timer(1.0, os.close, (fd,))
    releaser.start()
    try:
        start = time.monotonic()
        result = grootfs("delete-store", store=xfs_store, check=False)
    finally:
        releaser.join()
    assert result.returncode == 0, result.stdout
    assert time.monotonic() - start >= 0.9
    assert not os.path.exists(xfs_store)
    # The fixture's own delete-store then finds nothing: a missing store is success.
