"""One error hierarchy for the whole package.

Library code raises these; only the CLI turns them into an exit status and a
line on stdout. ``str(error)`` is the line Garden shows to the user, so
messages that the image-plugin contract fixes are spelled exactly as there.
"""

from __future__ import annotations


class GrootError(Exception):
    """Base of every error grootfs reports to its caller."""


class InvalidArgumentError(GrootError):
    """A flag, config value or positional argument is not acceptable."""


class ConfigError(GrootError):
    """The config file is missing or cannot be parsed."""


class StoreError(GrootError):
    """The store is missing, inconsistent, or an operation on it failed."""


class ImageSourceError(GrootError):
    """An image could not be found or read from its source."""


class VerificationError(ImageSourceError):
    """A blob's digest or size differs from what its manifest promised."""


class UnpackError(GrootError):
    """A layer could not be turned into a directory."""


class MountError(GrootError):
    """A mount, unmount or loop-device operation failed."""


class CommandError(GrootError):
    """An external program exited non-zero."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        detail = lines[0] if lines else "no output"
        super().__init__(f"{argv[0]} exited with status {returncode}: {detail}")
