"""The one way this package runs other programs.

Argument lists only (never a shell), stdin from /dev/null, a small fixed
environment, the command line logged at debug, and a failure raised as
:class:`CommandError` with the program's exit status and last stderr line.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from grootfs_py import log
from grootfs_py.errors import CommandError

_CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
}


def run(
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run *argv* to completion and return its result, capturing output."""
    args = [os.fspath(a) for a in argv]
    log.debug("run", argv=args, cwd=cwd)
    result = subprocess.run(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**_CLEAN_ENV, **(env or {})},
        check=False,
    )
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, result.stderr)
    return result
