"""The job's properties as pre-start reads them (``config/release.json``), checked.

The job spec declares them; ``release.json.erb`` writes every one under its
full name and refuses the same bad values with the same messages at render
time (``spec/fixtures/invalid_properties.json`` holds the cases both sides
are tested with). Checking again here catches a job directory rendered by
an older template and gives pre-start one place to read typed values from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from grootfs_py.release.errors import ReleaseError
from grootfs_py.release.sizing import SizingInput

LOG_LEVELS = ("debug", "info", "error", "fatal")
# Job properties and store configs are a few KiB; bound what is read all the same.
MAX_JSON_BYTES = 8 << 20
_CRON_FIELD = re.compile(r"^[0-9*/,-]+$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ReleaseError(f"{name} must be true or false, not `{value}`")
    return value


def _int_at_least(low: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ReleaseError(f"{name} must be a whole number >= {low}, not `{value}`")
        return value

    return check


def _percent(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 5 <= value <= 95:
        raise ReleaseError(f"{name} must be a whole number from 5 to 95, not `{value}`")
    return value


def _log_level(name: str, value: Any) -> str:
    if value not in LOG_LEVELS:
        raise ReleaseError(f"{name} must be one of {', '.join(LOG_LEVELS)}, not `{value}`")
    return str(value)


def _schedule(name: str, value: Any) -> str:
    fields = value.split() if isinstance(value, str) else []
    if "\n" in str(value) or len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise ReleaseError(f"{name} must be five cron fields such as `*/30 * * * *`, not `{value}`")
    return " ".join(fields)


def _registries(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ReleaseError(f"{name} must be a list of host or host:port, not `{value}`")
    for entry in value:
        if not isinstance(entry, str) or not _HOST_PORT.match(entry):
            raise ReleaseError(f"{name} entries must be host or host:port, not `{entry}`")
    return tuple(value)


def _port(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ReleaseError(f"{name} must be a port number from 1 to 65535, not `{value}`")
    return value


def _removed_metrics_endpoint(name: str, value: Any) -> None:
    if value is not None:
        raise ReleaseError(
            f"{name} was removed: metrics go to the loggregator agent at "
            "127.0.0.1:<grootfs.dropsonde_port> (default 3457); set that port instead"
        )


def _pem(name: str, value: Any) -> str:
    if value != "" and not (isinstance(value, str) and value.lstrip().startswith("-----BEGIN")):
        raise ReleaseError(f"{name} must be empty or a PEM block")
    return str(value)


# Property name -> (check, default). The defaults are the job spec's; the
# spec tests check that the two agree.
RULES: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "grootfs.log_level": (_log_level, "info"),
    "grootfs.insecure_docker_registry_list": (_registries, []),
    "grootfs.skip_mount": (_bool, False),
    "grootfs.volatile_rootfs": (_bool, True),
    "grootfs.reserved_space_for_other_jobs_in_mb": (_int_at_least(-1), 15360),
    "grootfs.routine_gc": (_bool, False),
    "grootfs.graph_cleanup_threshold_in_mb": (_int_at_least(-1), -1),
    "grootfs.privileged_store_percent": (_percent, 20),
    "grootfs.experimental_direct_io": (_bool, False),
    "grootfs.require_quota": (_bool, True),
    "grootfs.dropsonde_port": (_port, 3457),
    "grootfs.metrics_endpoint": (_removed_metrics_endpoint, None),
    "grootfs.tls.cert": (_pem, ""),
    "grootfs.tls.key": (_pem, ""),
    "grootfs.tls.ca_cert": (_pem, ""),
    "grootfs.clean.schedule": (_schedule, "*/30 * * * *"),
    "grootfs.clean.threshold_in_mb": (_int_at_least(-1), -1),
    "grootfs.clean.deadline_in_seconds": (_int_at_least(10), 1800),
}


@dataclass(frozen=True)
class JobProperties:
    values: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def sizing(self) -> SizingInput:
        return SizingInput(
            reserved_space_for_other_jobs_in_mb=self["grootfs.reserved_space_for_other_jobs_in_mb"],
            routine_gc=self["grootfs.routine_gc"],
            graph_cleanup_threshold_in_mb=self["grootfs.graph_cleanup_threshold_in_mb"],
            privileged_store_percent=self["grootfs.privileged_store_percent"],
        )


def validate(raw: Mapping[str, Any]) -> JobProperties:
    """Check every known property (missing ones take the spec's default)."""
    values: dict[str, Any] = {}
    for name, (check, default) in RULES.items():
        values[name] = check(name, raw.get(name, default))
    if bool(values["grootfs.tls.cert"]) != bool(values["grootfs.tls.key"]):
        raise ReleaseError("grootfs.tls.cert and grootfs.tls.key must be set together")
    return JobProperties(values)


def read_json_object(path: str, what: str = "") -> dict[str, Any]:
    """The JSON object in *path*; a missing file or other JSON is a ReleaseError."""
    from grootfs_py import jsonload

    where = f"{what} {path}" if what else path
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise ReleaseError(f"read {where}: {exc.strerror}") from None
    data = jsonload.loads(raw, f"{where}", max_bytes=MAX_JSON_BYTES, error=ReleaseError)
    if not isinstance(data, dict):
        raise ReleaseError(f"read {where}: not a JSON object")
    return data


def load(path: str) -> JobProperties:
    return validate(read_json_object(path, "job properties"))
