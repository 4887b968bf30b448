"""The short seeded fuzz pass of `make test`: every target, a few seconds each.

`make fuzz` runs the same targets for minutes; this pass keeps them working
(the harness, the seeds, atheris) and catches a regression that the seeds
reach quickly. A finding fails the test with its traceback or output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = 3000


@pytest.mark.parametrize(
    "target", ["tar", "unpack", "image-json", "reference", "config", "json-bounds"]
)
def test_coverage_guided_target_finds_nothing(tmp_path, target):
    corpus, findings = tmp_path / "corpus", tmp_path / "findings"
    corpus.mkdir()
    argv = [
        sys.executable,
        os.path.join(HERE, "guided.py"),
        target,
        str(findings),
        f"-runs={RUNS}",
        "-seed=1",
        "-timeout=10",
        "-print_final_stats=1",
        str(corpus),
        os.path.join(HERE, "corpus", "tar" if target == "unpack" else target),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    reports = sorted(findings.glob("*.txt")) if findings.exists() else []
    assert not reports, reports[0].read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", result.stderr)
    assert executed and int(executed[-1]) >= RUNS


def test_whole_creates_on_a_real_store_find_nothing(require_root):
    argv = [sys.executable, os.path.join(HERE, "creates.py"), "--runs", "150", "--seed", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["executions"] == 150
    assert summary["findings"] == {}
    assert summary["created"] > 0 and summary["refused"] > 0


def test_the_unpack_sandbox_leaves_only_scratch_and_the_named_directories_writable(
    tmp_path, require_root
):
    # In a child: the namespace it enters is its own, the test's process keeps its mounts.
    script = (
        "import os, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import sandbox\n"
        f"scratch = sandbox.enter([{str(tmp_path / 'out')!r}])\n"
        "open(os.path.join(scratch, 'x'), 'w').close()\n"
        f"open({str(tmp_path / 'out' / 'y')!r}, 'w').close()\n"
        f"for path in ('/tmp/grootfs-escape', {str(tmp_path / 'z')!r}, '/etc/grootfs-escape'):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "    except OSError as exc:\n"
        "        print(exc.strerror)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Read-only file system"] * 3
    assert (tmp_path / "out" / "y").exists()
    assert not (tmp_path / "z").exists()
