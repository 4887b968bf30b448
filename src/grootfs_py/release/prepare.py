"""Pre-start's Python half: size both stores, write their final configs, install the cron entry.

BOSH renders the two store configs (JSON) without sizes; the sizes depend on
the cell's data disk, so they are filled in here, in place, which is where
Garden's ``--config`` points. Running it again gives the same result: the
backing files already there count as free space and keep their size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grootfs_py.release import cron, properties, sizing
from grootfs_py.release.errors import ReleaseError

CONFIGS = {
    "unprivileged": "grootfs_config.yml",
    "privileged": "privileged_grootfs_config.yml",
}
# grootfs.tls.* as BOSH renders them (an unset property gives an empty file),
# garden-runc-release's names for them.
CERTIFICATES = ("remote-layer.crt", "remote-layer.cert", "remote-layer.key")


@dataclass(frozen=True)
class Paths:
    job_dir: str = "/var/vcap/jobs/grootfs"
    data_dir: str = "/var/vcap/data"
    cron_dir: str = "/etc/cron.d"
    log_dir: str = "/var/vcap/sys/log/grootfs"

    def config(self, name: str) -> str:
        return os.path.join(self.job_dir, "config", CONFIGS[name])

    @property
    def rendered_certificates(self) -> str:
        return os.path.join(self.job_dir, "config", "tls")

    @property
    def certificates(self) -> str:
        """create.remote_layer_client_certificates_path of both configs."""
        return os.path.join(self.job_dir, "config", "certs")


def disk_available(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def backing_file(store: str) -> str:
    return store.rstrip("/") + ".backing-store"


def existing_backing_files(stores: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Store name -> (apparent size, bytes allocated) of each backing file present."""
    found = {}
    for name, store in stores.items():
        try:
            st = os.stat(backing_file(store))
        except FileNotFoundError:
            continue
        found[name] = (st.st_size, st.st_blocks * 512)
    return found


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sized_config(config: dict[str, Any], size: sizing.StoreSize) -> dict[str, Any]:
    """*config* with the sizing keys set (the contract's key names)."""
    out = dict(config)
    out["init"] = {**(config.get("init") or {}), "store_size_bytes": size.store_size_bytes}
    out["clean"] = {**(config.get("clean") or {}), "threshold_bytes": size.threshold_bytes}
    out["create"] = {**(config.get("create") or {}), "with_clean": size.with_clean}
    return out


def install_certificates(paths: Paths) -> list[str]:
    """Copy the non-empty rendered certificate files into the configs' directory.

    BOSH renders every template, so an unset grootfs.tls.cert/key leaves an
    empty remote-layer.cert/.key; GrootFS's rules would then fail every
    create that fetches a remote layer. Only files with content are copied,
    keeping the mode and owner BOSH gave them (a rootless Garden's plugin
    must still read them); one left from an earlier run whose property is now
    unset is removed. Returns the names installed.
    """
    os.makedirs(paths.certificates, mode=0o755, exist_ok=True)
    installed = []
    for name in CERTIFICATES:
        target = os.path.join(paths.certificates, name)
        try:
            with open(os.path.join(paths.rendered_certificates, name), encoding="utf-8") as f:
                text = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            text = ""
        if text.strip():
            write_atomically(target, text, st.st_mode & 0o777)
            os.chown(target, st.st_uid, st.st_gid)
            installed.append(name)
        elif os.path.lexists(target):
            os.unlink(target)
    return installed


def prepare(paths: Paths, say: Callable[[str], None] = print) -> sizing.Plan:
    props = properties.load(os.path.join(paths.job_dir, "config", "release.json"))
    configs = {name: properties.read_json_object(paths.config(name)) for name in CONFIGS}
    stores = {}
    for name, config in configs.items():
        store = config.get("store")
        if not isinstance(store, str) or not store.startswith("/"):
            raise ReleaseError(f"{paths.config(name)}: `store` must be an absolute path")
        stores[name] = store

    installed = install_certificates(paths)
    say(f"certificates in {paths.certificates}: {', '.join(installed) or 'none'}")

    os.makedirs(paths.data_dir, exist_ok=True)
    plan = sizing.plan(
        disk_available(paths.data_dir), existing_backing_files(stores), props.sizing()
    )
    for warning in plan.warnings:
        say(f"warning: {warning}")
    for size in plan.stores:
        text = json.dumps(sized_config(configs[size.name], size), indent=2, sort_keys=True)
        write_atomically(paths.config(size.name), text + "\n")
        kept = " (existing backing file)" if size.kept_existing else ""
        say(
            f"{size.name} store {stores[size.name]}: {size.store_size_bytes} bytes{kept}, "
            f"clean threshold {size.threshold_bytes} bytes, "
            f"with_clean {str(size.with_clean).lower()}"
        )

    entry = cron.render(
        schedule=props["grootfs.clean.schedule"],
        job_dir=paths.job_dir,
        log_dir=paths.log_dir,
        deadline=props["grootfs.clean.deadline_in_seconds"],
    )
    os.makedirs(paths.cron_dir, exist_ok=True)
    write_atomically(os.path.join(paths.cron_dir, cron.CRON_FILE), entry)
    say(f"cron entry {os.path.join(paths.cron_dir, cron.CRON_FILE)}: {entry.splitlines()[-1]}")
    return plan
