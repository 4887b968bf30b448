"""The packages compile as BOSH compiles them, offline, and what they install works offline."""

import pytest
from bosh import Namespace, package_names


@pytest.fixture(scope="module")
def packages_offline(compiled_packages):
    """The compiled packages at /var/vcap/packages in a namespace without network."""
    ns = Namespace(network=False)
    try:
        for name in package_names():
            ns.install(name)
        yield ns
    finally:
        ns.close()


def test_grootfs_runs_from_its_package_with_the_packaged_interpreter(packages_offline):
    ns = packages_offline
    help_text = ns.run(["/var/vcap/packages/grootfs_py/bin/grootfs", "--help"]).stdout
    for command in ("init-store", "create", "delete", "stats", "clean", "capacity"):
        assert command in help_text
    base = ns.run(
        [
            "/var/vcap/packages/grootfs_py/venv/bin/python",
            "-c",
            "import sys; print(sys.base_prefix)",
        ]
    ).stdout.strip()
    assert base == "/var/vcap/packages/python3"
    shebang = ns.run(["head", "-1", "/var/vcap/packages/grootfs_py/venv/bin/grootfs"]).stdout
    assert shebang.strip() == "#!/var/vcap/packages/grootfs_py/venv/bin/python"


def test_the_packaged_interpreter_has_every_module_grootfs_needs(packages_offline):
    modules = "zlib, ssl, ctypes, yaml, zstandard, isal, jinja2, http.client, grootfs_py.release"
    ns = packages_offline
    ns.run(["/var/vcap/packages/grootfs_py/venv/bin/python", "-c", f"import {modules}"])
    # the release module runs offline too
    out = ns.run(
        ["/var/vcap/packages/grootfs_py/venv/bin/python", "-m", "grootfs_py.release", "--help"]
    )
    assert "prepare" in out.stdout


def test_xfsprogs_is_built_from_source_and_self_contained(packages_offline):
    ns = packages_offline
    version = ns.run(["/var/vcap/packages/xfsprogs/sbin/mkfs.xfs", "-V"]).stdout
    assert version.strip() == "mkfs.xfs version 6.1.0"
    libs = ns.run(["ldd", "/var/vcap/packages/xfsprogs/sbin/mkfs.xfs"]).stdout
    assert "liburcu" not in libs and "inih" not in libs  # linked statically


def test_the_canary_image_is_shipped_in_the_package(packages_offline):
    listing = packages_offline.run(
        ["tar", "-tvf", "/var/vcap/packages/grootfs_py/canary/rootfs.tar"]
    ).stdout
    assert "./etc/grootfs-canary" in listing
    assert "./bin/busybox" in listing
    assert "./bin/sh -> busybox" in listing


def test_the_shim_is_compiled_into_the_package_statically(packages_offline):
    ns = packages_offline
    shim = "/var/vcap/packages/grootfs_py/bin/grootfs-shim"
    ldd = ns.run(["ldd", shim], check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr  # nothing to load at run time
    # No server here: with its defaults the shim runs the packaged Python command.
    help_text = ns.run([shim, "--help"]).stdout
    assert "init-store" in help_text and "create" in help_text
