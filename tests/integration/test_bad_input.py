"""Bad input: exit 1, one clear line on stdout, and the store exactly as it was."""

import os

import pytest

import imagefactory as f
from grootfs_py import mounts


def _snapshot(store):
    """Everything a failed command could have left behind."""

    def listing(sub):
        return sorted(os.listdir(os.path.join(store, sub)))

    return {
        "images": listing("images"),
        "volumes": listing("volumes"),
        "links": listing("l"),
        "tmp": listing("tmp"),
        "deps": listing("meta/dependencies"),
        "mounts": mounts.under(store),
    }


def _fails(grootfs, store, *args):
    result = grootfs(*args, store=store, check=False)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one line on stdout, got {result.stdout!r}"
    return lines[0]


CORRUPTIONS = [
    ("layer-digest", "layerID digest mismatch"),
    ("layer-size", "layer size is different from the value in the manifest"),
    ("diff-id", "diffID digest mismatch"),
    ("media-type", "unknown media type"),
    ("truncate-gzip", "unpack layer"),
    ("bad-gzip", "unpack layer"),
]


@pytest.mark.parametrize(("corrupt", "message"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_layer_fails_and_leaves_no_layer(grootfs, xfs_store, tmp_path, corrupt, message):
    good = [f.file("base", b"b" * 10_000)]
    layout = f.write_oci_layout(
        str(tmp_path / "l"), [good, [f.file("top", b"t" * 200_000)]], corrupt=corrupt
    )
    before = _snapshot(xfs_store)
    line = _fails(grootfs, xfs_store, "create", f"oci://{layout.path}", "c")
    assert message in line
    after = _snapshot(xfs_store)
    # The first, good layer may stay cached (it is whole); nothing else may.
    assert not any("-incomplete-" in v for v in after["volumes"])
    assert set(after["volumes"]) - set(before["volumes"]) <= {layout.chain_ids[0].split(":")[1]}
    assert layout.chain_ids[1].split(":")[1] not in after["volumes"]
    assert (after["images"], after["tmp"], after["deps"], after["mounts"]) == ([], [], [], [])


def test_skip_layer_validation_accepts_wrong_digests(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]], corrupt="layer-digest")
    result = grootfs(
        "create", "--skip-layer-validation", f"oci://{layout.path}", "c", store=xfs_store
    )
    assert result.returncode == 0


def test_truncated_tarball_fails_cleanly(grootfs, xfs_store, tmp_path):
    tar = f.write_tarball(str(tmp_path / "t.tar"), [f.file("big", b"x" * 100_000)])
    with open(tar, "r+b") as fh:
        fh.truncate(30_000)
    before = _snapshot(xfs_store)
    assert _fails(grootfs, xfs_store, "create", tar, "c").startswith("unpack layer")
    assert _snapshot(xfs_store) == before


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (
            lambda t, url: ["create", str(t), "c"],
            "invalid base image: directory provided instead of a tar file",
        ),
        (lambda t, url: ["create", str(t / "missing.tar"), "c"], "Image source doesn't exist"),
        (lambda t, url: ["create", "oci:///no/such/layout", "c"], "Image source doesn't exist"),
        (lambda t, url: ["create", url + ":nope", "c"], "image tag `nope` not found"),
        (lambda t, url: ["create", url, "a/b"], "id `a/b` contains invalid characters: `/`"),
        (
            lambda t, url: ["create", url],
            "invalid arguments - usage: create [options] <image> <id>",
        ),
        (
            lambda t, url: ["create", "--disk-limit-size-bytes", "-1", url, "c"],
            "invalid argument: disk limit cannot be negative",
        ),
        (
            lambda t, url: ["create", "--with-clean", "--without-clean", url, "c"],
            "with-clean and without-clean cannot be used together",
        ),
        (
            lambda t, url: ["create", "--disk-limit-size-bytes", "10000000", url, "c"],
            "disk limits are not available",
        ),
        (
            lambda t, url: ["clean", "--threshold-bytes", "-5"],
            "invalid argument: clean threshold cannot be negative",
        ),
    ],
    ids=[
        "directory",
        "missing-tar",
        "missing-layout",
        "missing-tag",
        "slash-in-id",
        "usage",
        "negative-limit",
        "clean-flags",
        "limit-without-quota",
        "negative-threshold",
    ],
)
def test_bad_arguments_fail_with_the_contract_message(
    grootfs, xfs_store, tmp_path, make_args, message
):
    layout = f.write_oci_layout(str(tmp_path / "layout"), [[f.file("a")]])
    before = _snapshot(xfs_store)
    line = _fails(grootfs, xfs_store, *make_args(tmp_path, f"oci://{layout.path}"))
    assert line.startswith(message)
    assert _snapshot(xfs_store) == before


def test_duplicate_id_fails_and_keeps_the_first_image(grootfs, xfs_store, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a", b"first")]])
    url = f"oci://{layout.path}"
    grootfs("create", url, "dup", store=xfs_store)
    assert _fails(grootfs, xfs_store, "create", url, "dup") == "image for id `dup` already exists"
    with open(os.path.join(xfs_store, "images/dup/rootfs/a"), "rb") as fh:
        assert fh.read() == b"first"


def test_uninitialised_store_is_refused(grootfs, tmp_path):
    layout = f.write_oci_layout(str(tmp_path / "l"), [[f.file("a")]])
    store = str(tmp_path / "never-initialised")
    line = _fails(grootfs, store, "create", f"oci://{layout.path}", "c")
    assert line == "Store path is not initialized. Please run init-store."
    assert not os.path.exists(os.path.join(store, "images"))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "invalid config path"), ("store: [broken", "invalid config file")],
    ids=["missing", "unparsable"],
)
def test_bad_config_file_is_refused(grootfs, xfs_store, tmp_path, content, message):
    path = tmp_path / "config.yml"
    if content is not None:
        path.write_text(content)
    assert _fails(grootfs, xfs_store, "--config", str(path), "list").startswith(message)
