"""The create output drives a real OCI runtime."""

import json
import os
import shutil
import tempfile

from runc import run_in_rootfs

import imagefactory as f


def test_runc_runs_a_container_on_the_created_rootfs(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(
        str(tmp_path / "l"),
        [f.busybox_layer(), [f.file("etc/motd", b"hello from grootfs-py\n")]],
        env=["PATH=/bin", "GREETING=hi"],
    )
    spec = json.loads(grootfs("create", f"oci://{layout.path}", "runc", store=xfs_store).stdout)
    result = run_in_rootfs(spec, ["/bin/sh", "-c", "cat /etc/motd; echo $GREETING; id -u"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello from grootfs-py", "hi", "0"]
    grootfs("delete", "runc", store=xfs_store)


def test_runc_runs_in_a_user_namespace_on_the_unprivileged_store(grootfs, tmp_path):
    # pytest's tmp_path sits below 0700 directories that the container's
    # mapped root could not traverse to reach its rootfs.
    parent = tempfile.mkdtemp(prefix="grootfs-userns-")
    os.chmod(parent, 0o755)
    store = os.path.join(parent, "unpriv")
    maps = ["0:4294967294:1", "1:1:4294967293"]
    flags = [x for m in maps for x in ("--uid-mapping", m)] + [
        x for m in maps for x in ("--gid-mapping", m)
    ]
    grootfs("init-store", "--store-size-bytes", str(1 << 30), *flags, store=store)
    try:
        layout = f.write_oci_layout(str(tmp_path / "l"), [f.busybox_layer()], env=["PATH=/bin"])
        spec = json.loads(grootfs("create", f"oci://{layout.path}", "ns", store=store).stdout)
        mappings = [(0, 4294967294, 1), (1, 1, 4294967293)]
        result = run_in_rootfs(
            spec,
            ["/bin/sh", "-c", "id -u; stat -c %u /etc/passwd; echo ok > /written; cat /written"],
            uid_mappings=mappings,
            gid_mappings=mappings,
        )
        assert result.returncode == 0, result.stderr
        # Root in the container owns the image's files, and can write its rootfs.
        assert result.stdout.splitlines() == ["0", "0", "ok"]
    finally:
        grootfs("delete-store", store=store)
        shutil.rmtree(parent)
