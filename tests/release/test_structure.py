"""The release's structure: what create-release and the director would refuse."""

import re
import tomllib

import pytest
import yaml
from bosh import ROOT, job_spec, package, package_names, resolve_files

JOBS = sorted(p.name for p in (ROOT / "jobs").iterdir())
BLOBS = yaml.safe_load((ROOT / "config" / "blobs.yml").read_text())
# Templates read properties by their quoted full names (p('grootfs.x') or a
# checking helper such as boolean('grootfs.x')).
PROPERTY_NAME = re.compile(r"""['"](grootfs\.[a-z0-9_.]+)['"]""")


def test_final_name_is_grootfs_py():
    assert yaml.safe_load((ROOT / "config" / "final.yml").read_text())["name"] == "grootfs-py"


@pytest.mark.parametrize("name", JOBS)
def test_every_template_a_job_spec_names_exists(name):
    spec = job_spec(name)
    assert spec["name"] == name
    assert (ROOT / "jobs" / name / "monit").exists()
    templates = ROOT / "jobs" / name / "templates"
    named = set(spec["templates"])
    assert {str(p.relative_to(templates)) for p in templates.rglob("*") if p.is_file()} == named
    assert len(set(spec["templates"].values())) == len(named), "two templates render to one path"
    for package_name in spec["packages"]:
        assert package_name in package_names()


@pytest.mark.parametrize("name", JOBS)
def test_every_property_a_template_reads_is_declared_and_documented(name):
    spec = job_spec(name)
    declared = spec["properties"]
    read = set()
    for source in spec["templates"]:
        read |= set(
            PROPERTY_NAME.findall((ROOT / "jobs" / name / "templates" / source).read_text())
        )
    assert read - set(declared) == set()
    assert set(declared) - read == set(), "declared properties no template reads"
    for prop, definition in declared.items():
        assert definition.get("description"), prop
        assert "default" in definition, prop


def glob_regex(pattern):
    escaped = re.escape(pattern)
    return escaped.replace(r"\*\*/\*", ".*").replace(r"\*", "[^/]*")


@pytest.mark.parametrize("name", package_names())
def test_package_globs_match_files_in_src_or_blobs_yml(name):
    spec = package(name)
    assert (spec.dir / "packaging").exists()
    for pattern in spec.files:
        in_src = list((ROOT / "src").glob(pattern))
        in_blobs = [b for b in BLOBS if re.fullmatch(glob_regex(pattern), b)]
        assert in_src or in_blobs, (
            f"{name}: `{pattern}` matches nothing in src/ or config/blobs.yml"
        )


def test_package_dependencies_exist_and_form_no_cycle():
    names = package_names()
    state: dict[str, str] = {}

    def visit(n, trail):
        assert n in names, f"unknown package {n} ({' -> '.join(trail)})"
        if state.get(n) == "done":
            return
        assert state.get(n) != "visiting", f"dependency cycle: {' -> '.join([*trail, n])}"
        state[n] = "visiting"
        for dep in package(n).dependencies:
            visit(dep, [*trail, n])
        state[n] = "done"

    for n in names:
        visit(n, [])


def test_the_wheel_blobs_are_the_projects_runtime_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("_", "-") for d in deps}
    wheels = {
        b.split("/")[1].split("-")[0].lower().replace("_", "-")
        for b in BLOBS
        if b.startswith("grootfs-wheels/")
    }
    # Only what the dependencies themselves need may be added.
    transitive = {"markupsafe"}
    assert wanted <= wheels, f"no wheel blob for {wanted - wheels}: run scripts/sync-blobs --record"
    assert wheels - wanted <= transitive


def test_blobs_yml_records_sizes_and_sha256():
    for name, entry in BLOBS.items():
        assert isinstance(entry["size"], int) and entry["size"] > 0, name
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", entry["sha"]), name


def test_package_files_resolve_when_blobs_are_synced(blobs):
    for name in package_names():
        files = resolve_files(package(name))
        assert files, name
        assert not [f for f in files if "__pycache__" in f], name
