"""Garden's calls (tests/garden.py) against the real CLI, on two plain-directory stores.

The stores log to stderr at debug, so every line also goes through Garden's
relogger model. The simulated Diego cell (tests/release/test_cell.py) drives
the same emulator against the released job on BOSH's paths.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import garden
import imagefactory as f

PLUGIN = str(Path(sys.executable).with_name("grootfs"))


@pytest.fixture
def stores(grootfs, require_root, tmp_path_factory):
    parent = tmp_path_factory.mktemp("garden-stores")
    parent.chmod(0o755)
    configs = {}
    for kind in ("unprivileged", "privileged"):
        store = parent / kind
        configs[kind] = parent / f"{kind}.yml"
        # As garden-runc-release configures both stores (its two-layer images need it).
        create = {"skip_layer_validation": True}
        configs[kind].write_text(
            json.dumps({"store": str(store), "log_level": "debug", "create": create})
        )
        grootfs("init-store", config=configs[kind])
    yield configs
    for config in configs.values():
        grootfs("delete-store", config=config)


@pytest.fixture
def gdn(stores, tmp_path):
    return garden.Garden(
        PLUGIN, str(stores["unprivileged"]), str(stores["privileged"]), str(tmp_path / "depot")
    )


@pytest.fixture
def layout(tmp_path_factory):
    path = tmp_path_factory.mktemp("layout")
    path.chmod(0o755)
    image = f.write_oci_layout(
        str(path / "oci"),
        [f.busybox_layer(), [f.file("etc/motd", b"hi\n")]],
        tag="v1",
        env=["PATH=/bin", "GREETING=hello"],
    )
    return image.path


def _own_levels_kept(calls: list[garden.PluginCall]) -> None:
    for call in calls:
        lines = [line for line in call.stderr.split("\n") if line]
        assert len(call.relogged) == len(lines)
        for line, r in zip(lines, call.relogged, strict=True):
            assert r.entry.is_lager, f"logged by Garden as an error: {line}"
            assert (
                r.garden_level == ("debug", "info", "error", "error")[json.loads(line)["log_level"]]
            )


@pytest.mark.parametrize(
    ("kwargs", "flags"),
    [
        ({}, []),
        ({"exclusive": True}, []),
        ({"disk_limit": 1024}, ["--disk-limit-size-bytes", "1024"]),
        (
            {"disk_limit": 1024, "exclusive": True},
            ["--disk-limit-size-bytes", "1024", "--exclude-image-from-quota"],
        ),
        ({"username": "u", "password": "p"}, ["--username", "u", "--password", "p"]),
        ({"password": "p"}, ["--password", "p"]),
    ],
    ids=["plain", "exclusive-without-limit", "limit", "limit-exclusive", "credentials", "password"],
)
def test_create_argv_is_gardens(kwargs, flags):
    gdn = garden.Garden("/plugin", "/u.yml", "/p.yml", "/depot")
    argv = gdn.create_argv("docker:///cfd/app#v1#x", "h", **kwargs)
    assert argv == ["create", *flags, "docker:///cfd/app:v1#x", "h"]


def test_a_container_gets_the_fields_garden_reads(gdn, stores, layout):
    c = gdn.create("web-1", f"oci://{layout}#v1")
    (call,) = gdn.calls
    assert call.argv == [
        PLUGIN,
        "--config",
        str(stores["unprivileged"]),
        "create",
        f"oci://{layout}:v1",
        "web-1",
    ]
    assert Path(c.spec.root_path, "etc/motd").read_text() == "hi\n"
    assert c.spec.env == ["PATH=/bin", "GREETING=hello"]
    assert c.spec.mounts == []
    total, exclusive = gdn.stats("web-1")
    assert total > 0 and 0 <= exclusive <= total
    gdn.destroy("web-1")
    assert not os.path.exists(c.spec.root_path)
    _own_levels_kept(gdn.calls)


def test_a_failed_create_is_reported_with_stdout_and_destroyed_in_both_stores(gdn, stores):
    with pytest.raises(garden.GardenError) as err:
        gdn.create("bad", "/no/such/rootfs.tar")
    create, *deletes = gdn.calls
    assert str(err.value) == f"running image plugin create: {create.stdout}: exit status 1"
    assert create.stdout.count("\n") == 1  # one line, as the contract says
    assert [(d.command, d.argv[2], d.returncode) for d in deletes] == [
        ("delete", str(stores["unprivileged"]), 0),
        ("delete", str(stores["privileged"]), 0),
    ]
    (error,) = [r for r in create.relogged if r.garden_level == "error"]
    assert error.entry.error == create.stdout.strip()
    _own_levels_kept(gdn.calls)


def test_stats_of_a_privileged_container_falls_back_to_the_privileged_store(gdn, stores, layout):
    gdn.create("task-1", f"oci://{layout}:v1", privileged=True)
    gdn.calls.clear()
    total, _ = gdn.stats("task-1")
    assert total > 0
    assert [(c.command, c.argv[2], c.returncode) for c in gdn.calls] == [
        ("stats", str(stores["unprivileged"]), 1),
        ("stats", str(stores["privileged"]), 0),
    ]
    gdn.calls.clear()
    gdn.destroy("task-1")
    assert [(c.command, c.argv[2], c.stdout.strip()) for c in gdn.calls] == [
        ("delete", str(stores["unprivileged"]), "Image `task-1` not found. Skipping delete."),
        ("delete", str(stores["privileged"]), "Image task-1 deleted"),
    ]


def test_capacity_asks_the_unprivileged_store_only(gdn, stores):
    assert gdn.capacity() == 0  # a plain-directory store has no configured size
    (call,) = gdn.calls
    assert call.argv[1:] == ["--config", str(stores["unprivileged"]), "capacity"]


@pytest.mark.parametrize(
    ("stdout", "reads"),
    [
        ('{"disk_usage":{"total_bytes_used":3,"exclusive_bytes_used":1}}', (3, 1)),
        ('{"disk_usage":{"total_bytes_used":3}}', (3, 0)),
        ('{"disk_usage":{"total_bytes_used":3,"exclusive_bytes_used":1},"x":null}', (3, 1)),
        ('{"disk_usage":{"total_bytes_used":3.0,"exclusive_bytes_used":1}}', None),
        ('{"disk_usage":{"total_bytes_used":-1,"exclusive_bytes_used":1}}', None),
        ('{"disk_usage":{"total_bytes_used":3},"quota":5}', None),
        ("disk usage: 3", None),
    ],
)
def test_stats_output_is_read_as_guardian_decodes_it(stdout, reads):
    if reads is None:
        with pytest.raises(garden.GardenError, match=r"^parsing stats: "):
            garden.parse_stats_output(stdout)
    else:
        assert garden.parse_stats_output(stdout) == reads


def test_a_two_layer_app_gets_gardens_layout_in_the_depot(gdn, tmp_path_factory):
    from urllib.parse import urlencode

    import blobstore

    work = tmp_path_factory.mktemp("two-layer")
    work.chmod(0o755)
    (work / "blobs").mkdir()
    packages = work / "packages"
    (packages / "stack-1").mkdir(parents=True)
    f.write_tarball(
        str(packages / "stack-1" / "rootfs.tar"),
        [*f.busybox_layer(), f.directory("home"), f.directory("home/vcap", uid=2000, gid=2000)],
    )
    (packages / "stack").symlink_to(packages / "stack-1")
    droplet = f.compress(f.layer_tar([f.file("app/index.html", b"droplet\n", uid=2000)]), "gzip")
    (work / "blobs" / "droplet.tgz").write_bytes(droplet)
    with blobstore.Blobstore(work / "nginx", work / "blobs") as store:
        query = urlencode(
            {
                "layer": f"{store.url}/droplet.tgz",
                "layer_path": "/home/vcap",
                "layer_digest": f.sha256(droplet).removeprefix("sha256:"),
            }
        )
        app = gdn.create("web-1", f"preloaded+layer:{packages}/stack/rootfs.tar?{query}")
    image = Path(gdn.depot, "web-1", "image")
    assert gdn.calls[-1].argv[-2:] == [f"oci://{image}", "web-1"]
    assert sorted(os.listdir(image)) == ["blobs", "index.json"]  # no oci-layout file
    assert Path(app.spec.root_path, "home/vcap/app/index.html").read_text() == "droplet\n"
    gdn.destroy("web-1")
    assert not Path(gdn.depot, "web-1").exists()
    _own_levels_kept(gdn.calls)
