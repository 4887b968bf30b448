"""Fixtures of the release tests: the blobs, compiled packages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from bosh import ROOT


@pytest.fixture(scope="session")
def blobs() -> None:
    """blobs/ as config/blobs.yml records it (scripts/sync-blobs fetches what is missing)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sync-blobs")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/sync-blobs failed:\n{result.stderr[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def compiled_packages(blobs: None) -> None:
    """Every package compiled, or taken from .cache/compiled-packages when its inputs match."""
    from bosh import compiled, package_names

    for name in package_names():
        compiled(name)
