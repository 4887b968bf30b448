"""Layers flushed after their create has answered (settle.py), put through XFS's own crash.

``xfs_io -x -c "shutdown -f"`` is how XFS's test suite simulates a crash:
the filesystem writes out its log and nothing else, then refuses all I/O.
Every layer's metadata (its name included) survives it and any data the
kernel had not yet written back is lost: the worst case for a layer renamed
into place before its data reached the disk. The store is then unmounted
and mounted again (its log replayed), as an operator would after such a
shutdown; that attaches a new loop device, so it starts a new epoch just
as a reboot would.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import forkserver as fs
import imagefactory as f

GiB = 1024**3  # the xfs_store fixture's size
SETTLE_TIMEOUT = 30.0


@pytest.fixture(params=["python", "shim"])
def grootfs_via(request):
    return request.param


def _content():
    rng = random.Random(11)
    return {f"data/f{i:02d}": rng.randbytes(48_000 + i * 1_000) for i in range(40)}


def _layout(tmp_path):
    files = _content()
    base = [f.directory("data"), *(f.file(name, data) for name, data in files.items())]
    return f.write_oci_layout(str(tmp_path / "layout"), [base]), files


def _markers(store):
    return sorted(os.listdir(os.path.join(store, "meta", "unsettled")))


def _only_volume(store):
    (name,) = os.listdir(os.path.join(store, "volumes"))
    return os.path.join(store, "volumes", name)


def _wait_settled(store):
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while _markers(store):
        assert time.monotonic() < deadline, f"still unsettled: {_markers(store)}"
        time.sleep(0.02)


def _digests(root, files):
    out = {}
    for name in files:
        with open(os.path.join(root, name), "rb") as fh:
            out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _expected(files):
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def _create_unsettled(grootfs, store, layout, image_id):
    """A create whose settler dies before its flush, as if a crash had come first."""
    grootfs(
        "create",
        layout.ref,
        image_id,
        store=store,
        env={"GROOTFS_TEST_CRASH_AT": "settle-before-flush"},
    )


def _crash_and_remount(grootfs, store):
    """XFS's simulated crash (log out, data lost), then the store mounted again."""
    subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", store], check=True)
    # The images' overlays first, then the store.
    points = subprocess.run(
        ["findmnt", "--list", "--noheadings", "--output", "TARGET"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for point in sorted((p for p in points if p.startswith(store)), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=True)
    grootfs("init-store", "--store-size-bytes", str(GiB), store=store)


def test_a_cold_create_answers_first_and_its_layer_is_flushed_after(grootfs, xfs_store, tmp_path):
    layout, files = _layout(tmp_path)

    grootfs("create", layout.ref, "c1", store=xfs_store)

    # Settled within moments, by a process the create left behind.
    _wait_settled(xfs_store)
    _crash_and_remount(grootfs, xfs_store)
    volume = _only_volume(xfs_store)
    assert _digests(volume, files) == _expected(files)
    inode = os.stat(volume).st_ino
    grootfs("create", layout.ref, "c2", store=xfs_store)
    assert os.stat(_only_volume(xfs_store)).st_ino == inode, "a flushed layer is kept"
    rootfs = os.path.join(xfs_store, "images", "c2", "rootfs")
    assert _digests(rootfs, files) == _expected(files)


def test_a_layer_whose_flush_a_crash_cut_off_is_never_used_and_is_unpacked_again(
    grootfs, xfs_store, tmp_path
):
    layout, files = _layout(tmp_path)
    _create_unsettled(grootfs, xfs_store, layout, "c1")
    # Image records are not flushed (Garden recreates containers after a
    # crash); without one, what is left to look at is the layer.
    grootfs("delete", "c1", store=xfs_store)
    marked = _markers(xfs_store)
    assert len(marked) == 1

    _crash_and_remount(grootfs, xfs_store)

    # What the crash did: the layer kept its name and lost its data.
    volume = _only_volume(xfs_store)
    assert os.path.basename(volume) == marked[0]
    assert _digests(volume, files) != _expected(files), "the crash should have torn the layer"
    assert _markers(xfs_store) == marked
    checked = grootfs("check-store", store=xfs_store, check=False)
    assert (checked.returncode, checked.stdout) == (
        1,
        f"layer sha256:{marked[0]}: not flushed before its store was last lost\n"
        "check store: 1 problem left\n",
    )

    grootfs("create", layout.ref, "c2", store=xfs_store)

    rootfs = os.path.join(xfs_store, "images", "c2", "rootfs")
    assert _digests(rootfs, files) == _expected(files)
    assert _digests(_only_volume(xfs_store), files) == _expected(files)
    _wait_settled(xfs_store)
    assert grootfs("check-store", store=xfs_store, check=False).stdout == ""


def test_check_store_remounts_no_image_on_a_layer_from_a_lost_epoch(grootfs, xfs_store, tmp_path):
    layout, files = _layout(tmp_path)
    grootfs("create", layout.ref, "c1", store=xfs_store)
    _wait_settled(xfs_store)
    rootfs = os.path.join(xfs_store, "images", "c1", "rootfs")
    subprocess.run(["umount", rootfs], check=True)
    volume = _only_volume(xfs_store)
    chain_id = f"sha256:{os.path.basename(volume)}"
    # A marker as a crash in an earlier epoch leaves it (the test cannot
    # reboot; a new epoch is a boot id or disk sequence number not now's).
    os.symlink(
        "00000000-0000-0000-0000-000000000000/1/1-test",
        os.path.join(xfs_store, "meta", "unsettled", os.path.basename(volume)),
    )

    checked = grootfs("check-store", "--repair", store=xfs_store, check=False)

    assert checked.returncode == 1
    assert checked.stdout.splitlines()[:2] == [
        f"image c1: rootfs is not mounted, and its layer {chain_id} was not flushed "
        "before its store was last lost: delete the image",
        f"layer {chain_id}: not flushed before its store was last lost, and images use it",
    ]
    assert not os.path.ismount(rootfs)
    inode = os.stat(volume).st_ino
    grootfs("create", layout.ref, "c2", store=xfs_store)
    assert os.stat(_only_volume(xfs_store)).st_ino != inode, "unpacked again"
    _wait_settled(xfs_store)
    grootfs("check-store", "--repair", store=xfs_store)
    assert _digests(rootfs, files) == _expected(files)  # c1 now stands on the new layer


def test_an_unsettled_layer_is_used_as_it_is_until_its_store_is_lost(grootfs, xfs_store, tmp_path):
    layout, files = _layout(tmp_path)
    _create_unsettled(grootfs, xfs_store, layout, "c1")
    marked = _markers(xfs_store)
    assert len(marked) == 1
    inode = os.stat(_only_volume(xfs_store)).st_ino

    grootfs("create", layout.ref, "c2", store=xfs_store)
    grootfs("clean", store=xfs_store)

    # No crash came: the page cache holds the layer, which is used and kept.
    assert os.stat(_only_volume(xfs_store)).st_ino == inode
    assert _markers(xfs_store) == marked
    assert grootfs("check-store", store=xfs_store, check=False).stdout == ""
    rootfs = os.path.join(xfs_store, "images", "c2", "rootfs")
    assert _digests(rootfs, files) == _expected(files)


def test_a_store_not_on_a_loop_device_flushes_each_layer_before_its_rename(
    grootfs, dir_store, tmp_path
):
    layout, files = _layout(tmp_path)

    grootfs("create", layout.ref, "c1", store=dir_store)

    assert _markers(dir_store) == []
    rootfs = os.path.join(dir_store, "images", "c1", "rootfs")
    assert _digests(rootfs, files) == _expected(files)


@pytest.mark.parametrize("fix", ["clean", "check-store --repair"])
def test_a_create_killed_between_marking_and_renaming_its_layer_leaves_debris_that_goes(
    grootfs, xfs_store, tmp_path, fix
):
    layout, files = _layout(tmp_path)
    killed = grootfs(
        "create",
        layout.ref,
        "c1",
        store=xfs_store,
        check=False,
        env={"GROOTFS_TEST_CRASH_AT": "create-after-layer-mark"},
    )
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed
    (marked,) = _markers(xfs_store)
    checked = grootfs("check-store", store=xfs_store, check=False).stdout.splitlines()
    assert f"layer sha256:{marked}: flush marker without the layer" in checked

    grootfs(*fix.split(), store=xfs_store)

    assert _markers(xfs_store) == []
    assert os.listdir(os.path.join(xfs_store, "volumes")) == []
    assert grootfs("check-store", store=xfs_store, check=False).stdout == ""
    grootfs("create", layout.ref, "c1", store=xfs_store)
    _wait_settled(xfs_store)
    rootfs = os.path.join(xfs_store, "images", "c1", "rootfs")
    assert _digests(rootfs, files) == _expected(files)


def _stopped_holding(store):
    """Pids of the stopped processes that have *store* open: a settler stopped at its point."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                state = fh.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if state == b"T" and store in fs.open_files(pid).values():
            pids.append(int(pid))
    return pids


def test_the_create_answers_without_waiting_for_its_settler_or_leaving_it_a_pipe(
    grootfs_via, grootfs_shim_server, xfs_store, tmp_path
):
    layout, files = _layout(tmp_path)
    point = "settle-before-flush"
    env = {**os.environ, "GROOTFS_TEST_STOP_AT": point}
    command = [sys.executable, "-m", "grootfs_py"]
    if grootfs_via == "shim":
        command = [str(fs.SHIM)]
        env = grootfs_shim_server.shim_env(GROOTFS_TEST_STOP_AT=point)
    # Garden reads stdout and stderr to their end, so the settler must not
    # hold them: communicate() returns only once every copy is closed.
    proc = subprocess.Popen(
        [*command, "--store", xfs_store, "create", layout.ref, "c1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b'"root"' in out
    settlers = _stopped_holding(xfs_store)
    assert len(settlers) == 1, "the settler should be stopped at its point, flush not begun"
    assert len(_markers(xfs_store)) == 1

    os.kill(settlers[0], signal.SIGCONT)

    _wait_settled(xfs_store)
    rootfs = os.path.join(xfs_store, "images", "c1", "rootfs")
    assert _digests(rootfs, files) == _expected(files)


def test_a_marker_that_is_not_a_symlink_is_not_trusted(grootfs, xfs_store, tmp_path):
    layout, files = _layout(tmp_path)
    grootfs("create", layout.ref, "c1", store=xfs_store)
    _wait_settled(xfs_store)
    grootfs("delete", "c1", store=xfs_store)
    volume = _only_volume(xfs_store)
    inode = os.stat(volume).st_ino
    with open(os.path.join(xfs_store, "meta", "unsettled", os.path.basename(volume)), "w") as fh:
        fh.write("not a marker grootfs made")

    grootfs("create", layout.ref, "c2", store=xfs_store)

    assert os.stat(_only_volume(xfs_store)).st_ino != inode, "unpacked again"
    rootfs = os.path.join(xfs_store, "images", "c2", "rootfs")
    assert _digests(rootfs, files) == _expected(files)
    _wait_settled(xfs_store)


@pytest.mark.parametrize("grootfs_via", ["python"])
def test_a_create_through_the_library_has_its_layers_on_disk_when_it_returns(xfs_store, tmp_path):
    # images.create called in-process (as the quota tier does): no command
    # answers first, so nothing is left for later, and nothing stays open.
    from grootfs_py import images
    from grootfs_py.store import Store

    layout, files = _layout(tmp_path)

    images.create(Store(xfs_store), layout.ref, "c1", images.CreateOptions())

    assert _markers(xfs_store) == []
    assert not [path for path in fs.open_files().values() if path.startswith(xfs_store)]
    rootfs = os.path.join(xfs_store, "images", "c1", "rootfs")
    assert _digests(rootfs, files) == _expected(files)
