"""pre-start's Python half on a rendered job directory: final configs and the cron entry."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bosh import render_job

from grootfs_py import config as grootfs_config
from grootfs_py.release import prepare as prep
from grootfs_py.release.sizing import GiB, MiB


@pytest.fixture
def cell(tmp_path, monkeypatch):
    """A rendered job, a data dir reporting 100 GiB free, and a cron dir."""
    job = tmp_path / "jobs" / "grootfs"
    render_job("grootfs", {"grootfs": {"log_level": "debug"}}, job)
    for name in ("grootfs_config.yml", "privileged_grootfs_config.yml"):
        path = job / "config" / name
        data = json.loads(path.read_text())
        data["store"] = str(tmp_path / "data" / "store" / name.split("_")[0])
        path.write_text(json.dumps(data))
    monkeypatch.setattr(prep, "disk_available", lambda path: 100 * GiB)
    return prep.Paths(
        job_dir=str(job),
        data_dir=str(tmp_path / "data"),
        cron_dir=str(tmp_path / "cron.d"),
        log_dir="/var/vcap/sys/log/grootfs",
    )


def test_prepare_writes_sized_configs_that_grootfs_reads(cell):
    plan = prep.prepare(cell, say=lambda line: None)
    for size in plan.stores:
        text = Path(cell.config(size.name)).read_text()
        loaded = grootfs_config.parse(text).validate()
        assert text.lstrip().startswith("{")  # JSON: read without the YAML parser
        assert loaded.init.store_size_bytes == size.store_size_bytes
        assert loaded.clean.threshold_bytes == size.threshold_bytes
        assert loaded.create.with_clean is True
        assert loaded.log_level == "debug"  # the rendered keys are kept
    total = sum(s.store_size_bytes for s in plan.stores)
    assert total == pytest.approx(85 * GiB, abs=2 * MiB)


def test_prepare_installs_the_cron_entry_for_the_clean_script(cell):
    prep.prepare(cell, say=lambda line: None)
    entry = Path(f"{cell.cron_dir}/grootfs-py-clean").read_text().splitlines()
    assert entry[-1] == (
        f"*/30 * * * * root {cell.job_dir}/bin/clean"
        " >>/var/vcap/sys/log/grootfs/scheduled-clean.log 2>&1"
    )
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in entry


def test_prepare_twice_gives_the_same_files(cell):
    prep.prepare(cell, say=lambda line: None)
    first = [Path(cell.config(n)).read_text() for n in prep.CONFIGS]
    prep.prepare(cell, say=lambda line: None)
    assert [Path(cell.config(n)).read_text() for n in prep.CONFIGS] == first


def test_prepare_refuses_bad_properties_before_writing_anything(cell):
    release = f"{cell.job_dir}/config/release.json"
    data = json.loads(Path(release).read_text())
    data["grootfs.privileged_store_percent"] = 100
    Path(release).write_text(json.dumps(data))
    before = Path(cell.config("unprivileged")).read_text()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grootfs_py.release",
            "prepare",
            "--job-dir",
            cell.job_dir,
            "--data-dir",
            cell.data_dir,
            "--cron-dir",
            cell.cron_dir,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "prepare: grootfs.privileged_store_percent must be a whole number from 5 to 95, not `100`"
    )
    assert Path(cell.config("unprivileged")).read_text() == before


CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("tls", "installed"),
    [
        ({}, []),
        ({"ca_cert": CERT}, ["remote-layer.crt"]),
        ({"cert": CERT, "key": KEY}, ["remote-layer.cert", "remote-layer.key"]),
        (
            {"cert": CERT, "key": KEY, "ca_cert": CERT},
            ["remote-layer.cert", "remote-layer.crt", "remote-layer.key"],
        ),
    ],
    ids=["none", "ca-only", "client-pair", "all"],
)
def test_prepare_installs_only_the_certificates_that_are_set(cell, tls, installed):
    render_job("grootfs", {"grootfs": {"tls": tls}}, Path(cell.job_dir))
    _point_stores_at(cell)
    assert sorted(p.name for p in Path(cell.job_dir, "config", "tls").iterdir()) == [
        "remote-layer.cert",
        "remote-layer.crt",
        "remote-layer.key",
    ]  # BOSH renders all three, set or not
    prep.prepare(cell, say=lambda line: None)
    certs = Path(cell.certificates)
    assert sorted(p.name for p in certs.iterdir()) == installed
    for name in installed:
        rendered = Path(cell.job_dir, "config", "tls", name)
        assert (certs / name).read_text() == rendered.read_text()
        assert (certs / name).stat().st_mode == rendered.stat().st_mode
    for name in ("grootfs_config.yml", "privileged_grootfs_config.yml"):
        config = json.loads(Path(cell.job_dir, "config", name).read_text())
        assert config["create"]["skip_layer_validation"] is True
        assert config["create"]["remote_layer_client_certificates_path"] == (
            "/var/vcap/jobs/grootfs/config/certs"  # cell.certificates on a real cell
        )


def test_prepare_removes_a_certificate_whose_property_was_unset(cell):
    render_job("grootfs", {"grootfs": {"tls": {"cert": CERT, "key": KEY}}}, Path(cell.job_dir))
    _point_stores_at(cell)
    prep.prepare(cell, say=lambda line: None)
    render_job("grootfs", {"grootfs": {"tls": {"ca_cert": CERT}}}, Path(cell.job_dir))
    _point_stores_at(cell)
    prep.prepare(cell, say=lambda line: None)
    assert [p.name for p in Path(cell.certificates).iterdir()] == ["remote-layer.crt"]


def _point_stores_at(cell):
    for name in ("grootfs_config.yml", "privileged_grootfs_config.yml"):
        path = Path(cell.job_dir, "config", name)
        data = json.loads(path.read_text())
        data["store"] = f"{cell.data_dir}/store/{name.split('_')[0]}"
        path.write_text(json.dumps(data))
