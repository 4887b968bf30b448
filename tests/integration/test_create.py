"""create / delete / list / stats against a real loop-mounted XFS store."""

import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import imagefactory as f
from grootfs_py import mounts


@pytest.fixture(params=["python", "shim"])
def grootfs_via(request):
    """Every test here runs through the Python command and through shim and server."""
    return request.param


def _create(grootfs, store, url, image_id, *flags):
    out = grootfs("create", *flags, url, image_id, store=store).stdout
    lines = out.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got {out!r}"
    return json.loads(lines[0])


def _volumes(store):
    return sorted(os.listdir(os.path.join(store, "volumes")))


def test_oci_layout_becomes_a_mounted_overlay_of_its_layers(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(
        str(tmp_path / "layout"),
        [
            [f.directory("etc"), f.file("etc/hostname", b"base\n"), f.file("etc/gone", b"x")],
            [f.whiteout("etc/gone"), f.file("etc/added", b"top\n")],
        ],
        env=["PATH=/bin", "GREETING=hi"],
    )
    spec = _create(grootfs, xfs_store, f"oci://{layout.path}:latest", "c1")

    rootfs = os.path.join(xfs_store, "images", "c1", "rootfs")
    assert spec == {
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin", "GREETING=hi"], "cwd": ""},
        "root": {"path": rootfs},
    }
    assert mounts.find(rootfs).fstype == "overlay"
    with open(os.path.join(rootfs, "etc/hostname"), "rb") as fh:
        assert fh.read() == b"base\n"
    assert not os.path.exists(os.path.join(rootfs, "etc/gone"))
    assert os.path.exists(os.path.join(rootfs, "etc/added"))
    assert _volumes(xfs_store) == sorted(c.split(":")[1] for c in layout.chain_ids)

    # The container writes into its own upper directory, never into a layer.
    with open(os.path.join(rootfs, "etc/hostname"), "wb") as fh:
        fh.write(b"changed\n")
    lower = os.path.join(xfs_store, "volumes", layout.chain_ids[0].split(":")[1], "etc/hostname")
    with open(lower, "rb") as fh:
        assert fh.read() == b"base\n"

    assert grootfs("delete", "c1", store=xfs_store).stdout == "Image c1 deleted\n"
    assert mounts.find(rootfs) is None
    assert not os.path.exists(os.path.join(xfs_store, "images", "c1"))
    assert grootfs("list", store=xfs_store).stdout == "Store empty\n"


def _volatile(mount):
    # Linux 5.10 lists the option as "volatile", later kernels as "fsync=volatile".
    return bool({"volatile", "fsync=volatile"} & mount.options)


def test_the_rootfs_is_volatile_unless_the_config_says_otherwise(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "layout"), [[f.file("etc/hostname", b"h\n")]])
    url = f"oci://{layout.path}:latest"
    with open("/proc/sys/kernel/random/boot_id") as fh:
        boot_id = fh.read().strip()

    _create(grootfs, xfs_store, url, "c1")
    rootfs = os.path.join(xfs_store, "images", "c1", "rootfs")
    assert _volatile(mounts.find(rootfs))
    with open(os.path.join(xfs_store, "images", "c1", "image.json")) as fh:
        assert json.load(fh)["volatile_boot"] == boot_id
    # What the container writes is there all the same; fsync just returns.
    with open(os.path.join(rootfs, "etc/hostname"), "wb") as fh:
        fh.write(b"written\n")
        os.fsync(fh.fileno())
    with open(os.path.join(xfs_store, "images", "c1", "diff", "etc/hostname"), "rb") as fh:
        assert fh.read() == b"written\n"

    config = {"store": xfs_store, "create": {"volatile_rootfs": False}}
    grootfs("create", url, "c2", config=config)
    synced = os.path.join(xfs_store, "images", "c2", "rootfs")
    assert mounts.find(synced).fstype == "overlay" and not _volatile(mounts.find(synced))
    with open(os.path.join(xfs_store, "images", "c2", "image.json")) as fh:
        assert "volatile_boot" not in json.load(fh)

    # The kernel's marker in the volatile workdir goes with the image.
    for image_id in ("c1", "c2"):
        grootfs("delete", image_id, store=xfs_store)
    assert grootfs("list", store=xfs_store).stdout == "Store empty\n"
    assert os.listdir(os.path.join(xfs_store, "tmp")) == []


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain-tar", "gzip-tar"])
def test_local_tarball_creates_rootfs(grootfs, xfs_store, tmp_path, gzipped):
    tar = f.write_tarball(
        str(tmp_path / "stack.tar"),
        [f.directory("usr"), f.file("usr/stack", b"cflinuxfs4\n", mode=0o600)],
        gzip=gzipped,
    )
    spec = _create(grootfs, xfs_store, tar, "app")
    with open(os.path.join(spec["root"]["path"], "usr/stack"), "rb") as fh:
        assert fh.read() == b"cflinuxfs4\n"
    assert spec["process"]["env"] == []


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_every_layer_compression_unpacks(grootfs, xfs_store, tmp_path, compression):
    layout = f.write_oci_layout(
        str(tmp_path / "l"), [[f.file("data", b"x" * 100_000)]], compression=compression
    )
    spec = _create(grootfs, xfs_store, f"oci://{layout.path}", "c")
    assert os.path.getsize(os.path.join(spec["root"]["path"], "data")) == 100_000


def test_images_share_layers_unpacked_once(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a", b"1")], [f.file("b", b"2")]])
    url = f"oci://{layout.path}"
    one = _create(grootfs, xfs_store, url, "one")
    before = _volumes(xfs_store)
    bottom = layout.chain_ids[0].split(":")[1]
    inode = os.stat(os.path.join(xfs_store, "volumes", bottom, "a")).st_ino
    two = _create(grootfs, xfs_store, url, "two")
    assert _volumes(xfs_store) == before
    assert os.stat(os.path.join(xfs_store, "volumes", bottom, "a")).st_ino == inode
    assert grootfs("list", store=xfs_store).stdout.splitlines() == [
        os.path.join(xfs_store, "images", "one"),
        os.path.join(xfs_store, "images", "two"),
    ]
    # Writes in one container are invisible in the other.
    with open(os.path.join(one["root"]["path"], "a"), "w") as fh:
        fh.write("mine")
    with open(os.path.join(two["root"]["path"], "a")) as fh:
        assert fh.read() == "1"


def test_concurrent_creates_of_one_image_all_succeed(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a", b"1" * 1_000_000)]])
    with ThreadPoolExecutor(4) as pool:
        specs = list(
            pool.map(
                lambda i: _create(grootfs, xfs_store, f"oci://{layout.path}", f"c{i}"), range(4)
            )
        )
    assert len({s["root"]["path"] for s in specs}) == 4
    assert _volumes(xfs_store) == [layout.chain_ids[0].split(":")[1]]


def test_130_layer_image_mounts(grootfs, xfs_store, tmp_path):
    layers = [[f.file(f"layer-{i:03d}", str(i).encode())] for i in range(130)]
    layout = f.write_oci_layout(str(tmp_path / "l"), layers, compression="none")
    spec = _create(grootfs, xfs_store, f"oci://{layout.path}", "tall")
    names = sorted(n for n in os.listdir(spec["root"]["path"]) if n.startswith("layer-"))
    assert len(names) == 130


def test_without_mount_returns_the_overlay_mount_and_leaves_rootfs_empty(
    grootfs, xfs_store, tmp_path
):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a", b"1")], [f.file("b", b"2")]])
    spec = _create(grootfs, xfs_store, f"oci://{layout.path}", "rootless", "--without-mount")
    rootfs = spec["root"]["path"]
    assert os.listdir(rootfs) == []
    assert mounts.find(rootfs) is None
    [mount] = spec["mounts"]
    assert (mount["destination"], mount["type"], mount["source"]) == ("/", "overlay", "overlay")
    [opts] = mount["options"]
    lower = opts.split(",")[0].removeprefix("lowerdir=").split(":")
    assert all(p.startswith(f"{xfs_store}/l/") for p in lower)
    assert [os.path.realpath(p) for p in lower] == [
        os.path.join(xfs_store, "volumes", c.split(":")[1]) for c in reversed(layout.chain_ids)
    ]
    assert f"upperdir={xfs_store}/images/rootless/diff" in opts
    assert f"workdir={xfs_store}/images/rootless/workdir" in opts
    # What Garden would do with it: mount it, and see both layers.
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, rootfs], check=True)
    try:
        assert sorted(os.listdir(rootfs)) == ["a", "b"]
    finally:
        subprocess.run(["umount", rootfs], check=True)
    assert grootfs("delete", "rootless", store=xfs_store).returncode == 0


def test_delete_by_rootfs_path(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]])
    spec = _create(grootfs, xfs_store, f"oci://{layout.path}", "by-path")
    out = grootfs("delete", spec["root"]["path"], store=xfs_store).stdout
    assert out == "Image by-path deleted\n"
    assert not os.path.exists(os.path.join(xfs_store, "images", "by-path"))


@pytest.mark.parametrize(
    "argument", ["never-created", "/var/vcap/data/other-store/images/x/rootfs"]
)
def test_delete_of_unknown_image_succeeds(grootfs, xfs_store, argument):
    result = grootfs("delete", argument, store=xfs_store)
    assert result.stdout == f"Image `{argument}` not found. Skipping delete.\n"


def test_delete_succeeds_after_container_made_untraversable_dirs(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.directory("home")]])
    spec = _create(grootfs, xfs_store, f"oci://{layout.path}", "messy")
    locked = os.path.join(spec["root"]["path"], "home/locked/deeper")
    os.makedirs(locked)
    with open(os.path.join(locked, "file"), "w") as fh:
        fh.write("x")
    for path in (locked, os.path.dirname(locked)):
        os.chown(path, 1234, 1234)
        os.chmod(path, 0)
    assert grootfs("delete", "messy", store=xfs_store).stdout == "Image messy deleted\n"
    assert os.listdir(os.path.join(xfs_store, "images")) == []


def test_stats_reports_base_and_upper_usage(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("base", b"b" * 300_000)]])
    spec = _create(grootfs, xfs_store, f"oci://{layout.path}", "s")
    with open(os.path.join(spec["root"]["path"], "new"), "wb") as fh:
        fh.write(b"n" * 1_000_000)
        os.fsync(fh.fileno())
    usage = json.loads(grootfs("stats", "s", store=xfs_store).stdout)["disk_usage"]
    assert set(usage) == {
        "total_bytes_used",
        "exclusive_bytes_used",
        "quota_size_bytes",
        "committed_space_bytes",
    }
    assert 1_000_000 <= usage["exclusive_bytes_used"] < 1_000_000 + 64 * 1024
    assert usage["total_bytes_used"] == usage["exclusive_bytes_used"] + 300_000
    assert usage["quota_size_bytes"] == 0
    assert usage["committed_space_bytes"] == 300_000


def test_clean_removes_only_layers_no_image_uses(grootfs, xfs_store, tmp_path):
    shared = [f.file("shared", b"s")]
    a = f.write_oci_layout(str(tmp_path / "a"), [shared, [f.file("only-a")]])
    b = f.write_oci_layout(str(tmp_path / "b"), [shared, [f.file("only-b")]])
    _create(grootfs, xfs_store, f"oci://{a.path}", "a")
    _create(grootfs, xfs_store, f"oci://{b.path}", "b")
    assert len(_volumes(xfs_store)) == 3
    grootfs("delete", "a", store=xfs_store)

    assert grootfs("clean", store=xfs_store).stdout == "clean completed\n"
    assert _volumes(xfs_store) == sorted(c.split(":")[1] for c in b.chain_ids)
    assert sorted(os.listdir(os.path.join(xfs_store, "l"))) == sorted(
        os.path.basename(p) for p in _links_of(xfs_store)
    )
    # The surviving image still works.
    assert os.path.exists(os.path.join(xfs_store, "images/b/rootfs/only-b"))


def _links_of(store):
    folder = os.path.join(store, "l")
    return [
        os.path.join(folder, n)
        for n in os.listdir(folder)
        if os.path.exists(os.path.join(folder, n))
    ]


def test_clean_below_threshold_skips(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a", b"a" * 1000)]])
    _create(grootfs, xfs_store, f"oci://{layout.path}", "x")
    grootfs("delete", "x", store=xfs_store)
    out = grootfs("clean", "--threshold-bytes", str(10**9), store=xfs_store).stdout
    assert out == "threshold not reached: skipping clean\n"
    assert len(_volumes(xfs_store)) == 1
    assert grootfs("clean", "--threshold-bytes", "1", store=xfs_store).stdout == "clean completed\n"
    assert _volumes(xfs_store) == []


def test_generate_volume_size_metadata_rebuilds_sizes(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(
        str(tmp_path / "l"), [[f.file("a", b"a" * 4242), f.hardlink("b", "a")]]
    )
    _create(grootfs, xfs_store, f"oci://{layout.path}", "x")
    meta = os.path.join(xfs_store, "meta", "volume-" + layout.chain_ids[0].split(":")[1])
    with open(meta) as fh:
        assert json.load(fh) == {"size": 4242}
    os.unlink(meta)
    grootfs("generate-volume-size-metadata", store=xfs_store)
    with open(meta) as fh:
        assert json.load(fh) == {"size": 4242}


def test_unprivileged_store_gives_every_file_the_mapped_owner(grootfs, tmp_path):
    store = str(tmp_path / "unpriv")
    garden = ["0:4294967294:1", "1:1:4294967293"]
    args = [a for m in garden for a in ("--uid-mapping", m)] + [
        a for m in garden for a in ("--gid-mapping", m)
    ]
    grootfs("init-store", "--store-size-bytes", str(1 << 30), *args, store=store)
    try:
        layout = f.write_oci_layout(
            str(tmp_path / "l"),
            [
                [
                    f.directory("etc"),
                    f.file("etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
                    f.file("home-file", uid=1000, gid=1000),
                    f.symlink("link", "etc/passwd"),
                ]
            ],
        )
        spec = _create(grootfs, store, f"oci://{layout.path}", "app")
        rootfs = spec["root"]["path"]
        owners = {}
        for path in ("", "etc", "etc/passwd", "link", "home-file"):
            st = os.lstat(os.path.join(rootfs, path))
            owners[path] = (st.st_uid, st.st_gid)
        nobody = (4294967294, 4294967294)
        assert owners == {
            "": nobody,
            "etc": nobody,
            "etc/passwd": nobody,
            "link": nobody,
            "home-file": (1000, 1000),
        }
        st = os.stat(store)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4294967294, 4294967294, 0o700)
    finally:
        grootfs("delete-store", store=store)


def test_log_lines_are_json_and_never_on_stdout(tmp_path):
    store = str(tmp_path / "s")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grootfs_py",
            "--store",
            store,
            "--log-level",
            "debug",
            "init-store",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == ""
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    keys = {"timestamp", "log_level", "source", "message", "data"}
    assert lines and all(set(e) == keys and e["source"] == "grootfs" for e in lines)
    assert all(e["message"].startswith("grootfs.init-store.") for e in lines)
    subprocess.run(
        [sys.executable, "-m", "grootfs_py", "--store", store, "delete-store"],
        check=True,
        capture_output=True,
    )
