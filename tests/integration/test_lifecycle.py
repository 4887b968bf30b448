"""The store under load: locking, collection, crash safety, check-store.

Real processes on a real kernel against the real registry: creates, deletes
and cleans run concurrently and are killed with SIGKILL, at random moments
and at named points (GROOTFS_TEST_CRASH_AT, a test-only hook in
``fsutil.crash_point``).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import imagefactory as f

CONTENT = {"base": b"base\n", "a": b"a" * 3000, "b": b"b" * 3000, "solo": b"solo\n"}


@pytest.fixture(params=["python", "shim"])
def grootfs_via(request):
    """Every test here runs through the Python command and through shim and server."""
    return request.param


def _layouts(tmp_path):
    """Three tiny images: two share their base layer, one shares nothing."""
    base = [f.directory("etc"), f.file("etc/base", CONTENT["base"])]
    return {
        "a": f.write_oci_layout(str(tmp_path / "a"), [base, [f.file("a", CONTENT["a"])]]),
        "b": f.write_oci_layout(str(tmp_path / "b"), [base, [f.file("b", CONTENT["b"])]]),
        "solo": f.write_oci_layout(str(tmp_path / "solo"), [[f.file("solo", CONTENT["solo"])]]),
    }


def _files_of(name):
    return (
        {"solo": CONTENT["solo"]}
        if name == "solo"
        else {"etc/base": CONTENT["base"], name: CONTENT[name]}
    )


def _assert_rootfs_complete(store, image_id, name):
    rootfs = os.path.join(store, "images", image_id, "rootfs")
    for path, content in _files_of(name).items():
        with open(os.path.join(rootfs, path), "rb") as fh:
            assert fh.read() == content, f"{image_id}: {path}"


def _check_store(grootfs, store, *flags):
    result = grootfs("check-store", *flags, store=store, check=False)
    return result.returncode, result.stdout.splitlines()


def _assert_store_consistent(grootfs, store):
    assert _check_store(grootfs, store) == (0, [])


def _lock_waits(log_path):
    waits = []
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record["message"].endswith(".lock-waited"):
            waits.append(record["data"]["waited_s"])
    return waits


def test_parallel_creates_of_one_image_download_each_layer_once(grootfs, xfs_store, pushed):
    reg = pushed.open
    image = pushed.images["multi:v1"]
    url = f"docker://{reg.host}/multi:v1"
    before = {d: len(reg.requests(rf"^GET /v2/multi/blobs/{d}")) for d in image.layer_digests}

    def create(i):
        return grootfs("create", "--insecure-registry", reg.host, url, f"p{i}", store=xfs_store)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(create, range(20)))

    assert all(r.returncode == 0 for r in results)
    after = {d: len(reg.requests(rf"^GET /v2/multi/blobs/{d}")) for d in image.layer_digests}
    assert {d: after[d] - before[d] for d in after} == {d: 1 for d in after}
    assert len(os.listdir(os.path.join(xfs_store, "images"))) == 20
    _assert_store_consistent(grootfs, xfs_store)


def test_creates_deletes_and_cleans_interleaved_leave_a_consistent_store(
    grootfs, xfs_store, tmp_path, grootfs_log
):
    layouts = _layouts(tmp_path)
    names = sorted(layouts)
    image_of = {f"c{i}": names[i % 3] for i in range(100)}
    # 75 deletes of images created here (each waits for its create), 25 of ids
    # never created: 25 images survive to be checked.
    deleted = {f"c{i}" for i in range(100) if i % 4 != 3}
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        creates, others = {}, []
        for i in range(100):
            image_id = f"c{i}"
            creates[image_id] = pool.submit(
                grootfs, "create", layouts[image_of[image_id]].ref, image_id, store=xfs_store
            )
            others.append(pool.submit(grootfs, "clean", store=xfs_store))
            if image_id in deleted:
                others.append(
                    pool.submit(
                        lambda i=image_id: (
                            creates[i].result(),
                            grootfs("delete", i, store=xfs_store),
                        )[1]
                    )
                )
            else:
                others.append(pool.submit(grootfs, "delete", f"ghost{i}", store=xfs_store))
        results = [c.result() for c in creates.values()] + [o.result() for o in others]
    elapsed = time.monotonic() - start

    assert [r for r in results if r.returncode != 0] == []
    cleans = [r.stdout for r in results if r.args[-1] == "clean"]
    assert set(cleans) <= {"clean completed\n", "clean already running\n"}
    assert "clean completed\n" in cleans
    survivors = sorted(os.listdir(os.path.join(xfs_store, "images")))
    assert survivors == sorted(set(image_of) - deleted)
    for image_id in survivors:
        _assert_rootfs_complete(xfs_store, image_id, image_of[image_id])
    _assert_store_consistent(grootfs, xfs_store)
    grootfs("clean", store=xfs_store)
    _assert_store_consistent(grootfs, xfs_store)

    longest = max(_lock_waits(grootfs_log), default=0.0)
    print(f"\n100x100x100: total {elapsed:.1f}s, longest lock wait {longest:.3f}s")
    assert longest < 30, "a create, delete or clean waited for a whole other operation"


def _image_with_unused_layer(grootfs, store, layouts):
    grootfs("create", layouts["solo"].ref, "gone", store=store)
    grootfs("delete", "gone", store=store)


CRASHES = [
    # (point, setup, command that gets killed there, rerun that must then succeed)
    pytest.param(
        "create-before-layer-rename",
        None,
        ["create", "{a}", "c1"],
        ["create", "{a}", "c1"],
        id="create-killed-before-renaming-its-layer",
    ),
    pytest.param(
        "create-after-claim",
        None,
        ["create", "{a}", "c1"],
        ["create", "{a}", "c1"],
        id="create-killed-after-claiming-the-image",
    ),
    pytest.param(
        "create-before-image-json",
        None,
        ["create", "{a}", "c1"],
        ["create", "{a}", "c1"],
        id="create-killed-with-rootfs-mounted-before-image-json",
    ),
    pytest.param(
        "delete-after-trash",
        "image",
        ["delete", "c1"],
        ["delete", "c1"],
        id="delete-killed-after-moving-the-image-aside",
    ),
    pytest.param(
        "clean-after-layer-trash",
        "unused",
        ["clean"],
        ["clean"],
        id="clean-killed-after-moving-a-layer-aside",
    ),
]


def _argv(template, layouts):
    return [a.format(**{k: v.ref for k, v in layouts.items()}) for a in template]


@pytest.mark.parametrize("fix", ["clean", "check-store --repair"])
@pytest.mark.parametrize(("point", "setup", "killed", "rerun"), CRASHES)
def test_kill_at_a_named_point_then_rerun_succeeds_and_store_is_consistent(
    grootfs, dir_store, tmp_path, grootfs_log, point, setup, killed, rerun, fix
):
    layouts = _layouts(tmp_path)
    if setup == "image":
        grootfs("create", layouts["a"].ref, "c1", store=dir_store)
    elif setup == "unused":
        _image_with_unused_layer(grootfs, dir_store, layouts)
        grootfs("create", layouts["a"].ref, "c1", store=dir_store)
    argv = [
        sys.executable,
        "-m",
        "grootfs_py",
        "--store",
        dir_store,
        "--log-file",
        str(grootfs_log),
    ]
    env = {**os.environ, "GROOTFS_TEST_CRASH_AT": point}
    crashed = subprocess.run(
        [*argv, *_argv(killed, layouts)], env=env, capture_output=True, text=True
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout

    code, problems = _check_store(grootfs, dir_store)
    assert code == 1 and problems, "the kill must leave something check-store sees"
    grootfs(*_argv(rerun, layouts), store=dir_store)
    grootfs(*fix.split(), store=dir_store)
    _assert_store_consistent(grootfs, dir_store)
    if rerun[0] == "create" or setup == "unused":
        _assert_rootfs_complete(dir_store, "c1", "a")


def test_kill_at_random_moments_then_rerun_succeeds_and_store_is_consistent(
    grootfs, dir_store, tmp_path, grootfs_log
):
    big = [f.file(f"f{i}", os.urandom(300_000)) for i in range(12)]
    layout = f.write_oci_layout(str(tmp_path / "big"), [big, [f.file("top", b"top")]])
    rng = random.Random(4)
    argv = [
        sys.executable,
        "-m",
        "grootfs_py",
        "--store",
        dir_store,
        "--log-file",
        str(grootfs_log),
    ]
    kinds = ["create", "delete", "clean"]
    for n in range(12):
        kind = kinds[n % 3]
        if kind == "create":
            command = ["create", layout.ref, f"r{n}"]
        elif kind == "delete":
            grootfs("create", layout.ref, f"r{n}", store=dir_store)
            command = ["delete", f"r{n}"]
        else:
            grootfs("create", layout.ref, f"r{n}", store=dir_store)
            grootfs("delete", f"r{n}", store=dir_store)  # its layers are now unused
            command = ["clean"]
        proc = subprocess.Popen([*argv, *command], stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.kill()
        finished = proc.wait() == 0  # it may have finished before the kill
        if not (kind == "create" and finished):
            rerun = grootfs(*command, store=dir_store, check=False)
            completed = os.path.exists(os.path.join(dir_store, "images", f"r{n}", "image.json"))
            if kind == "create" and rerun.returncode == 1:
                # Killed after writing image.json, before exiting: the image is
                # whole, and a second create of the id is rightly refused.
                assert rerun.stdout == f"image for id `r{n}` already exists\n"
                assert completed
            else:
                assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        if kind == "create":
            with open(os.path.join(dir_store, "images", f"r{n}", "rootfs", "top"), "rb") as fh:
                assert fh.read() == b"top"
            grootfs("delete", f"r{n}", store=dir_store)
        grootfs("clean", store=dir_store)
        _assert_store_consistent(grootfs, dir_store)


# Python only: 17 s of waiting on a stalled registry either way, and the locks
# it checks do not depend on how the command's process was started.
@pytest.mark.parametrize("grootfs_via", ["python"])
def test_slow_registry_blocks_neither_creates_of_other_images_nor_clean(
    grootfs, dir_store, pushed, proxy, tmp_path
):
    reg = pushed.open
    proxy.reset(stall_blobs=100, stall_seconds=8)
    slow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grootfs_py",
            "--store",
            dir_store,
            "create",
            "--insecure-registry",
            proxy.host,
            f"docker://{proxy.host}/five:v1",
            "slow",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not proxy.blob_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.blob_requests(), "the slow create never reached the registry"
        _image_with_unused_layer(grootfs, dir_store, _layouts(tmp_path))

        start = time.monotonic()
        grootfs(
            "create",
            "--insecure-registry",
            reg.host,
            f"docker://{reg.host}/busybox:latest",
            "fast",
            store=dir_store,
        )
        assert grootfs("clean", store=dir_store).stdout == "clean completed\n"
        assert time.monotonic() - start < 5
        assert slow.poll() is None, "the slow create must still be downloading"
    finally:
        out, _ = slow.communicate(timeout=120)
    assert slow.returncode == 0, out
    assert json.loads(out)["root"]["path"].endswith("/images/slow/rootfs")
    _assert_store_consistent(grootfs, dir_store)


@pytest.fixture
def held_lock():
    """Hold a store lock file as another process would; released at the end."""
    held = []

    def hold(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)

    yield hold
    for fd in held:
        os.close(fd)


def test_second_clean_exits_at_once_saying_one_is_running(grootfs, dir_store, held_lock):
    held_lock(os.path.join(dir_store, "locks", "clean.lock"))
    start = time.monotonic()
    result = grootfs("clean", store=dir_store)
    assert (result.returncode, result.stdout) == (0, "clean already running\n")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("flags", "config"),
    [
        pytest.param(["--deadline-seconds", "1"], None, id="flag"),
        pytest.param([], {"clean": {"deadline_seconds": 1}}, id="config-key"),
    ],
)
def test_clean_gives_up_at_its_deadline_with_a_clear_error(
    grootfs, dir_store, held_lock, flags, config
):
    # An exclusive store lock (check-store takes one) makes a clean wait.
    lock = os.path.join(dir_store, "locks", "store.lock")
    held_lock(lock)
    start = time.monotonic()
    result = grootfs("clean", *flags, store=dir_store, config=config, check=False)
    assert time.monotonic() - start < 10
    assert (result.returncode, result.stdout) == (
        1,
        "clean store: passed its deadline of 1s waiting for the store lock\n",
    )


def test_create_with_clean_starts_a_detached_clean_that_logs_to_its_file(
    grootfs, dir_store, tmp_path
):
    layouts = _layouts(tmp_path)
    _image_with_unused_layer(grootfs, dir_store, layouts)
    clean_log = tmp_path / "clean.log"
    config = {"create": {"clean_log_file": str(clean_log)}}
    grootfs("create", "--with-clean", layouts["a"].ref, "c1", store=dir_store, config=config)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "grootfs.clean.clean-completed" not in (
        clean_log.read_text() if clean_log.exists() else ""
    ):
        time.sleep(0.1)
    assert "grootfs.clean.clean-completed" in clean_log.read_text()
    solo_layer = layouts["solo"].chain_ids[0].split(":")[1]
    assert solo_layer not in os.listdir(os.path.join(dir_store, "volumes"))
    _assert_rootfs_complete(dir_store, "c1", "a")


def _layer_hex(layout, i=0):
    return layout.chain_ids[i].split(":")[1]


def _break_link(store, layouts):
    from grootfs_py import overlay

    os.unlink(os.path.join(store, "l", overlay.short_name(layouts["a"].chain_ids[0])))


def _dangling_link(store, layouts):
    os.symlink("../volumes/" + "0" * 64, os.path.join(store, "l", "DANGLINGLINK"))


def _drop_size(store, layouts):
    os.unlink(os.path.join(store, "meta", f"volume-{_layer_hex(layouts['a'])}"))


def _drop_dependencies(store, layouts):
    os.unlink(os.path.join(store, "meta", "dependencies", "image:c1.json"))


def _orphan_dependencies(store, layouts):
    with open(os.path.join(store, "meta", "dependencies", "image:nobody.json"), "w") as fh:
        json.dump({"layers": layouts["a"].chain_ids}, fh)


def _unmount(store, layouts):
    subprocess.run(["umount", os.path.join(store, "images", "c1", "rootfs")], check=True)


def _unmount_and_reboot(store, layouts):
    """The image was mounted volatile in a boot before this one.

    A reboot cannot happen inside a test: the record's boot id is rewritten
    to one that is not this boot's, which is all check-store can see of it.
    """
    _unmount(store, layouts)
    path = os.path.join(store, "images", "c1", "image.json")
    with open(path) as fh:
        record = json.load(fh)
    assert record["volatile_boot"]
    record["volatile_boot"] = "00000000-0000-4000-8000-000000000000"
    with open(path, "w") as fh:
        json.dump(record, fh)


def _stray_mount(store, layouts):
    target = os.path.join(store, "tmp", "stray")
    os.mkdir(target)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)


def _orphan_project(store, layouts):
    with open(os.path.join(store, "projectids", "77"), "w") as fh:
        fh.write("nobody")


def _lose_layer(store, layouts):
    import shutil

    shutil.rmtree(os.path.join(store, "volumes", _layer_hex(layouts["a"], 1)))


BREAKAGES = [
    # (how the store is broken, the line check-store prints, repairable)
    pytest.param(_break_link, "layer {a0}: link l/{a0short} is missing", True, id="missing-link"),
    pytest.param(_dangling_link, "link l/DANGLINGLINK: does not resolve", True, id="dangling-link"),
    pytest.param(_drop_size, "layer {a0}: no size record", True, id="missing-size-record"),
    pytest.param(
        _drop_dependencies,
        "image c1: no dependency record from its image.json",
        True,
        id="missing-dependency-record",
    ),
    pytest.param(
        _orphan_dependencies,
        "dependency record of missing image nobody",
        True,
        id="dependency-record-without-image",
    ),
    pytest.param(_unmount, "image c1: rootfs is not mounted", True, id="image-not-mounted"),
    pytest.param(
        _unmount_and_reboot,
        "image c1: rootfs is not mounted, and its volatile upper may not have survived "
        "the reboot since: delete the image",
        False,
        id="volatile-image-from-an-earlier-boot",
    ),
    pytest.param(
        _stray_mount,
        "tmp/stray: unfinished removal",
        True,
        id="mount-of-no-image",
    ),
    pytest.param(
        _orphan_project,
        "project id 77: its image nobody does not use it",
        True,
        id="project-id-without-image",
    ),
    pytest.param(_lose_layer, "image c1: layer {a1} is missing", False, id="missing-layer"),
]


@pytest.mark.parametrize(("breakage", "line", "repairable"), BREAKAGES)
def test_check_store_names_each_broken_invariant_and_repairs_what_is_safe(
    grootfs, dir_store, tmp_path, breakage, line, repairable
):
    from grootfs_py import overlay

    layouts = _layouts(tmp_path)
    grootfs("create", layouts["a"].ref, "c1", store=dir_store)
    _assert_store_consistent(grootfs, dir_store)
    breakage(dir_store, layouts)
    a = layouts["a"].chain_ids
    line = line.format(a0=a[0], a1=a[1], a0short=overlay.short_name(a[0]))

    code, problems = _check_store(grootfs, dir_store)
    assert code == 1
    assert line in problems
    code, repaired = _check_store(grootfs, dir_store, "--repair")
    if repairable:
        assert code == 0 and f"{line} (repaired)" in repaired
        _assert_store_consistent(grootfs, dir_store)
        _assert_rootfs_complete(dir_store, "c1", "a")
    else:
        assert code == 1 and line in repaired
        assert os.path.isdir(os.path.join(dir_store, "images", "c1")), "repair lost an image"


def test_generate_volume_size_metadata_restores_lost_size_records(grootfs, dir_store, tmp_path):
    layouts = _layouts(tmp_path)
    grootfs("create", layouts["a"].ref, "c1", store=dir_store)
    _drop_size(dir_store, layouts)
    assert _check_store(grootfs, dir_store)[0] == 1
    grootfs("generate-volume-size-metadata", store=dir_store)
    _assert_store_consistent(grootfs, dir_store)
