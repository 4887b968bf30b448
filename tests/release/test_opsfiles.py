"""The ops files apply to cf-deployment's diego-cell and set what Garden needs."""

import pytest
import yaml
from bosh import ROOT
from opsfile import OpsError, apply

OPS = ROOT / "manifests" / "operations"
BASE = yaml.safe_load(
    (ROOT / "tests" / "release" / "fixtures" / "cf-deployment-excerpt.yml").read_text()
)
# Garden runs the native shim; it hands each call to the job's server.
PLUGIN = "/var/vcap/packages/grootfs_py/bin/grootfs-shim"
CONFIG = "/var/vcap/jobs/grootfs/config/grootfs_config.yml"
PRIVILEGED_CONFIG = "/var/vcap/jobs/grootfs/config/privileged_grootfs_config.yml"


def ops(name):
    return yaml.safe_load((OPS / name).read_text())


def group(manifest, name):
    return next(g for g in manifest["instance_groups"] if g["name"] == name)


def job(group_, name):
    return next(j for j in group_["jobs"] if j["name"] == name)


def assert_uses_grootfs_py(cell):
    garden = job(cell, "garden")["properties"]["garden"]
    assert garden["image_plugin"] == PLUGIN
    assert garden["image_plugin_extra_args"] == ["--config", CONFIG]
    assert garden["privileged_image_plugin"] == PLUGIN
    assert garden["privileged_image_plugin_extra_args"] == ["--config", PRIVILEGED_CONFIG]
    assert job(cell, "grootfs")["release"] == "grootfs-py"


def test_use_grootfs_py_colocates_the_job_on_every_diego_cell():
    out = apply(BASE, ops("use-grootfs-py.yml"))
    assert {"name": "grootfs-py", "version": "latest"} in out["releases"]
    cell = group(out, "diego-cell")
    assert_uses_grootfs_py(cell)
    assert "grootfs" not in job(cell, "garden")["properties"]
    # Everything else of the cell is untouched.
    assert job(cell, "rep") == job(group(BASE, "diego-cell"), "rep")
    assert group(out, "api") == group(BASE, "api")


def test_applying_an_ops_file_twice_changes_nothing_more():
    for name in ("use-grootfs-py.yml", "grootfs-py-canary-cells.yml"):
        once = apply(BASE, ops(name))
        assert apply(once, ops(name)) == once, name


def test_canary_cells_add_one_pilot_group_and_leave_diego_cell_alone():
    out = apply(BASE, ops("grootfs-py-canary-cells.yml"))
    assert group(out, "diego-cell") == group(BASE, "diego-cell")
    pilot = group(out, "diego-cell-grootfs-py")
    assert_uses_grootfs_py(pilot)
    assert pilot["instances"] == 1
    assert pilot["update"]["canaries"] == 1 and pilot["update"]["max_in_flight"] == 1
    assert job(pilot, "rep")["properties"]["diego"]["rep"]["placement_tags"] == ["grootfs-py"]
    # The pilot runs the same jobs as every other cell, plus grootfs.
    base_jobs = [j["name"] for j in group(BASE, "diego-cell")["jobs"]]
    assert sorted(j["name"] for j in pilot["jobs"]) == sorted([*base_jobs, "grootfs"])
    garden = job(pilot, "garden")["properties"]["garden"]
    base_garden = job(group(BASE, "diego-cell"), "garden")["properties"]["garden"]
    assert {k: garden[k] for k in base_garden} == base_garden


def test_both_ops_files_together_give_every_cell_grootfs_py():
    out = apply(apply(BASE, ops("grootfs-py-canary-cells.yml")), ops("use-grootfs-py.yml"))
    for name in ("diego-cell", "diego-cell-grootfs-py"):
        assert_uses_grootfs_py(group(out, name))


@pytest.mark.parametrize(
    ("op", "error"),
    [
        (
            {"type": "replace", "path": "/instance_groups/name=nope/jobs", "value": []},
            "no item with name=nope",
        ),
        ({"type": "remove", "path": "/update/missing"}, "key `missing` not found"),
        ({"type": "replace", "path": "/update/missing/deeper", "value": 1}, "not found"),
    ],
)
def test_the_evaluator_refuses_paths_that_do_not_exist(op, error):
    with pytest.raises(OpsError, match=error):
        apply(BASE, [op])


def test_the_evaluator_creates_optional_paths_and_appends():
    out = apply(
        BASE,
        [
            {"type": "replace", "path": "/a?/b/c", "value": 1},
            {"type": "replace", "path": "/releases/-", "value": {"name": "x"}},
            {"type": "remove", "path": "/instance_groups/name=api"},
        ],
    )
    assert out["a"] == {"b": {"c": 1}}
    assert out["releases"][-1] == {"name": "x"}
    assert [g["name"] for g in out["instance_groups"]] == ["diego-cell"]
