"""Job properties: checked in Python with the same rules and messages as the ERB template."""

import json

import pytest
from bosh import ROOT, job_spec

from grootfs_py.release import properties
from grootfs_py.release.errors import ReleaseError

CASES = json.loads((ROOT / "spec" / "fixtures" / "invalid_properties.json").read_text())


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: json.dumps(c["properties"])[:60])
def test_bad_values_are_refused_with_the_templates_message(case):
    with pytest.raises(ReleaseError) as err:
        properties.validate(flatten(case["properties"]))
    assert str(err.value) == case["error"]


def test_the_rules_cover_exactly_the_job_specs_properties_and_defaults():
    declared = job_spec("grootfs")["properties"]
    assert sorted(properties.RULES) == sorted(declared)
    for name, (_, default) in properties.RULES.items():
        assert declared[name]["default"] == default, name


def test_defaults_are_valid_and_typed():
    p = properties.validate({})
    assert p["grootfs.clean.schedule"] == "*/30 * * * *"
    assert p.sizing().reserved_space_for_other_jobs_in_mb == 15360


def test_a_schedule_is_normalised():
    assert (
        properties.validate({"grootfs.clean.schedule": " 0  2 * * 1-5 "})["grootfs.clean.schedule"]
        == "0 2 * * 1-5"
    )


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / "release.json").write_text("{not json")
    with pytest.raises(ReleaseError, match=r"job properties .*release.json: not JSON"):
        properties.load(str(tmp_path / "release.json"))


def test_deeply_nested_properties_are_a_clear_error(tmp_path):
    (tmp_path / "release.json").write_text("[" * 100_000)
    with pytest.raises(ReleaseError, match=r"release.json: nested deeper than 100 levels"):
        properties.load(str(tmp_path / "release.json"))
