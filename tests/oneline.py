"""The output rule every command keeps, checked the same way by tests and the fuzzers.

A failure exits 1 with exactly one line on stdout, free of control
characters, and no traceback anywhere (stdout or stderr).
"""

from __future__ import annotations

import re

# What cli.escape() turns into visible escapes: C0, DEL, C1, U+2028/9, surrogates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def problems(returncode: int, stdout: str, stderr: str) -> list[str]:
    """What is wrong with one run's output, each as ``kind: detail`` (empty: it keeps the rule)."""
    found = []
    if "Traceback (most recent call last)" in stdout + stderr:
        found.append("traceback: on stdout or stderr")
    if returncode not in (0, 1):
        found.append(f"exit-status: {returncode}")
    if returncode == 1:
        if not stdout.endswith("\n") or stdout.count("\n") != 1:
            found.append(f"multi-line: not exactly one line on stdout: {stdout!r}")
        elif _CONTROL.search(stdout[:-1]):
            found.append(f"control-character: on stdout: {stdout!r}")
        if stdout.startswith("internal error"):
            found.append(f"internal-error: {stdout!r}")
    return found


def failure_line(returncode: int, stdout: str, stderr: str) -> str:
    """The one line of a failed command; assert it keeps the rule."""
    assert returncode == 1, f"exit {returncode}: stdout {stdout!r} stderr {stderr[-2000:]!r}"
    wrong = problems(returncode, stdout, stderr)
    assert not wrong, wrong
    return stdout[:-1]
