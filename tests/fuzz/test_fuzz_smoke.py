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


@pytest.mark.parametrize("target", ["tar", "image-json", "reference", "config", "json-bounds"])
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
        os.path.join(HERE, "corpus", target),
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
