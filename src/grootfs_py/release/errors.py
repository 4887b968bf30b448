"""The release's one error kind, so pre-start reports it as a single clear line."""

from __future__ import annotations

from grootfs_py.errors import GrootError


class ReleaseError(GrootError):
    """A job property is invalid or the cell cannot be prepared."""
