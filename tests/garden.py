"""A model of Garden (guardian) as a client of the image plugin, for the tests.

Built from ``shared/docs/garden-cell.md`` and, where that is silent, from
guardian's ``imageplugin`` package and the lager ``chug`` it vendors (lager
v3): what Garden runs, what it reads back, and what it does with stderr.
It is a model, not Garden: no containers, no networking, no API; it runs
the plugin exactly as Garden would and judges its output as Garden would.

- ``chug`` and ``relog``: lager's chug decides, line by line, whether stderr
  is a lager entry; Garden's relogger re-logs an entry at its own level and
  any other line as a Garden *error* ``{"output": line}``. (Garden hands chug
  each chunk a pipe read returns; the model takes the whole stderr, so a
  line split between two reads, in a burst of more than 32 KiB, is not
  modelled.)
- ``Garden``: create / destroy / stats / capacity with Garden's argv, its
  unprivileged-then-privileged delete, the stats fallback, the fields it
  parses from stdout and the error text an operator sees.
- ``write_image_layout``: the OCI layout Garden writes for a
  ``preloaded+layer:`` rootfs before it calls ``create oci:///...``.

Run as a script (``garden.py write-layout DEPOT HANDLE ROOTFS``) it writes
that layout, so a caller whose files live in another mount namespace (the
simulated cell) writes it there through the same runner as the plugin's.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------
# lager's chug, and Garden's relogger
# --------------------------------------------------------------------------

LAGER_LEVELS = {0: "debug", 1: "info", 2: "error", 3: "fatal"}
_LEVEL_NAMES = {name: number for number, name in LAGER_LEVELS.items()}
# chug decodes each line into a struct with these JSON fields (Go's
# encoding/json: unknown keys ignored, keys matched case-insensitively).
_FIELDS = {
    "timestamp": str,
    "level": str,
    "log_level": int,
    "source": str,
    "message": str,
    "data": dict,
}
_INT64 = (-(2**63), 2**63 - 1)
# strconv.ParseFloat's syntax (decimal and hex, "_" only between digits or
# after a base prefix, no spaces), then time.Parse(time.RFC3339Nano, ...).
_D = r"\d(?:_?\d)*"
_H = r"[0-9a-fA-F](?:_?[0-9a-fA-F])*"
_GO_DECIMAL = re.compile(rf"[+-]?(?:{_D}\.?(?:{_D})?|\.{_D})(?:[eE][+-]?{_D})?\Z")
_GO_HEX = re.compile(rf"[+-]?0[xX]_?(?:{_H}\.?(?:{_H})?|\.{_H})[pP][+-]?{_D}\Z")
_GO_SPECIAL = re.compile(r"(?i:[+-]?inf(?:inity)?|nan)\Z")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:[.,]\d+)?(?:Z|[+-](\d{2}):(\d{2}))\Z"
)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object's members in order (Go assigns them in order: the last duplicate wins)."""


class _Fraction(float):
    """A JSON number written with a fraction or exponent (Go will not put it in an int)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_Pairs, parse_float=_Fraction, parse_constant=_reject_constant
)


def _go_fold(name: str) -> str:
    # encoding/json matches keys to fields ignoring case, with Unicode's simple
    # folds (the long s and the Kelvin sign fold into ASCII letters).
    return name.translate({0x17F: "s", 0x212A: "k"}).lower()


def _as_dict(value: Any) -> Any:
    if isinstance(value, _Pairs):
        return {k: _as_dict(v) for k, v in value}
    if isinstance(value, list):
        return [_as_dict(v) for v in value]
    return value


def _go_float64(value: Any) -> bool:
    """Whether every number in *value* fits a float64, as Go decodes numbers in interface{}."""
    if isinstance(value, dict):
        return all(_go_float64(v) for v in value.values())
    if isinstance(value, list):
        return all(_go_float64(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False
    return True


def _go_timestamp(text: str) -> bool:
    if _GO_SPECIAL.match(text) or _GO_HEX.match(text):
        return True
    if _GO_DECIMAL.match(text):
        return math.isfinite(float(text.replace("_", "")))  # else ParseFloat's ErrRange
    m = _RFC3339.match(text)
    if not m:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    zone_ok = m[7] is None or (int(m[7]) <= 24 and int(m[8]) <= 60)  # Go's bounds, inclusive
    return (
        1 <= month <= 12
        and 1 <= day <= calendar.monthrange(year or 2000, month)[1]
        and hour < 24
        and minute < 60
        and second < 60
        and zone_ok
    )


@dataclass(frozen=True)
class ChugEntry:
    raw: str
    is_lager: bool
    level: int = 0
    message: str = ""
    source: str = ""
    session: str = ""
    error: str | None = None
    data: dict[str, Any] | None = None


def chug(raw: str) -> ChugEntry:
    """What lager's chug makes of one line (without its newline)."""
    not_lager = ChugEntry(raw, False)
    start = raw.find("{")
    if start < 0:
        return not_lager
    try:
        pairs, _ = _DECODER.raw_decode(raw[start:])  # trailing text is ignored, as by Go's Decoder
    except ValueError:
        return not_lager
    fields: dict[str, Any] = {}
    for key, value in pairs:
        name = _go_fold(key)
        if name not in _FIELDS:
            continue
        value = _as_dict(value)
        want = _FIELDS[name]
        if value is None:  # JSON null leaves a Go field as it was
            continue
        if want is int:
            if type(value) is not int or not _INT64[0] <= value <= _INT64[1]:
                return not_lager
        elif (want is str and not isinstance(value, str)) or (
            want is dict and not (isinstance(value, dict) and _go_float64(value))
        ):
            return not_lager
        fields[name] = value
    data = fields.get("data")
    probe = data or {}
    for key in ("trace", "session"):
        if key in probe and not isinstance(probe[key], str):
            return not_lager
    if fields.get("level"):
        if fields["level"] not in _LEVEL_NAMES:
            return not_lager
        level = _LEVEL_NAMES[fields["level"]]
    else:
        level = fields.get("log_level", 0)
    error = None
    if level in (2, 3) and "error" in probe:
        if not isinstance(probe["error"], str):
            return not_lager
        error = probe["error"]
    if not _go_timestamp(fields.get("timestamp", "")):
        return not_lager
    if data is not None:
        data = {k: v for k, v in data.items() if k not in ("trace", "session")}
        if level in (2, 3):
            data.pop("error", None)
    return ChugEntry(
        raw,
        True,
        level=level,
        message=fields.get("message", ""),
        source=fields.get("source", ""),
        session=probe.get("session", ""),
        error=error,
        data=data,
    )


@dataclass(frozen=True)
class Relogged:
    """One line as Garden's logger writes it: ``garden_level`` is Garden's own call.

    ``debug``/``info``/``error`` for a lager entry at that level (fatal is
    logged as error); ``error`` with message ``error`` and ``{"output": line}``
    for anything else; ``dropped`` for an entry whose log_level is none of
    lager's four (no case matches it); ``crash`` for an entry without a
    ``data`` object, which Garden's relogger writes ``original_timestamp``
    into (a nil Go map: the process panics).
    """

    garden_level: str
    message: str
    data: dict[str, Any]
    entry: ChugEntry


def relog(stderr: str) -> list[Relogged]:
    """Garden's relogger over a plugin's whole stderr."""
    out = []
    for line in stderr.split("\n"):
        if not line:
            continue
        entry = chug(line)
        if not entry.is_lager:
            out.append(Relogged("error", "error", {"output": line}, entry))
        elif entry.data is None:
            out.append(Relogged("crash", entry.message, {}, entry))
        elif entry.level not in LAGER_LEVELS:
            out.append(Relogged("dropped", entry.message, entry.data, entry))
        else:
            garden_level = {0: "debug", 1: "info"}.get(entry.level, "error")
            out.append(Relogged(garden_level, entry.message, entry.data, entry))
    return out


# --------------------------------------------------------------------------
# Garden's image-plugin client
# --------------------------------------------------------------------------

PRELOADED_PLUS_LAYER = "preloaded+layer:"
Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


class GardenError(Exception):
    """A Garden API error: the text an operator (and Diego) sees."""


def local_runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


@dataclass(frozen=True)
class PluginCall:
    """One run of the plugin: its argv, exit status, stdout, and stderr as Garden re-logged it."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    relogged: list[Relogged]

    @property
    def command(self) -> str:
        # After Garden's extra args (--config FILE).
        return self.argv[3]


@dataclass(frozen=True)
class RuntimeSpec:
    """What Garden takes from create's stdout (a runtime-spec; it reads three fields)."""

    root_path: str
    env: list[str]
    mounts: list[dict[str, Any]]


@dataclass(frozen=True)
class Container:
    handle: str
    privileged: bool
    rootfs: str
    spec: RuntimeSpec


def _go_uint64(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _is_mount(m: Any) -> bool:
    return isinstance(m, dict) and all(
        isinstance(m.get(k, ""), str) for k in ("destination", "type", "source")
    )


def parse_create_output(stdout: str) -> RuntimeSpec:
    """create's stdout as guardian decodes it into a runtime-spec (nil fields made empty)."""
    try:
        spec = json.loads(stdout)
    except ValueError as exc:
        raise GardenError(f"parsing image plugin create: {stdout}: {exc}") from None
    if not isinstance(spec, dict):
        raise GardenError(f"parsing image plugin create: {stdout}: not a JSON object")
    root = spec.get("root") or {}
    process = spec.get("process") or {}
    mounts = spec.get("mounts") or []
    path = root.get("path", "") if isinstance(root, dict) else None
    env = (process.get("env") or []) if isinstance(process, dict) else None
    if (
        not isinstance(path, str)
        or not isinstance(env, list)
        or not all(isinstance(e, str) for e in env)
        or not isinstance(mounts, list)
        or not all(_is_mount(m) for m in mounts)
    ):
        raise GardenError(f"parsing image plugin create: {stdout}: wrong field types")
    return RuntimeSpec(root_path=path, env=env, mounts=mounts)


def parse_stats_output(stdout: str) -> tuple[int, int]:
    """stats' stdout as guardian decodes it: map[string]map[string]uint64, two fields read."""
    try:
        stats = json.loads(stdout)
    except ValueError as exc:
        raise GardenError(f"parsing stats: {stdout}: {exc}") from None
    # Every value must fit the Go type, not only the two Garden reads.
    if not isinstance(stats, dict) or not all(
        v is None or (isinstance(v, dict) and all(n is None or _go_uint64(n) for n in v.values()))
        for v in stats.values()
    ):
        raise GardenError(f"parsing stats: {stdout}: not a map of maps of uint64")
    usage = stats.get("disk_usage") or {}
    return usage.get("total_bytes_used") or 0, usage.get("exclusive_bytes_used") or 0


@dataclass
class Garden:
    """Garden's side of the image plugin, per garden-cell.md.

    ``plugin`` is the plugin binary (Garden's ``image_plugin`` and
    ``privileged_image_plugin`` are one binary here, as in garden-runc-release
    with GrootFS); ``configs`` are the unprivileged and privileged store
    configs, passed as the extra args ``--config FILE``; ``depot`` is where
    Garden writes a two-layer app's OCI layout. ``run`` runs one argv to
    completion (the simulated cell passes one that enters its namespace).
    """

    plugin: str
    unprivileged_config: str
    privileged_config: str
    depot: str
    run: Runner = local_runner
    calls: list[PluginCall] = field(default_factory=list)
    containers: dict[str, Container] = field(default_factory=dict)

    def _config(self, privileged: bool) -> str:
        return self.privileged_config if privileged else self.unprivileged_config

    def _call(self, config: str, *args: str) -> PluginCall:
        argv = [self.plugin, "--config", config, *args]
        result = self.run(argv)
        call = PluginCall(
            argv, result.returncode, result.stdout, result.stderr, relog(result.stderr)
        )
        self.calls.append(call)
        crashed = [r.entry.raw for r in call.relogged if r.garden_level == "crash"]
        if crashed:
            raise GardenError(
                f"garden's relogger panics on a lager line without data: {crashed[0]}"
            )
        return call

    @staticmethod
    def _failed(action: str, call: PluginCall) -> GardenError:
        # errors.Wrap(exitErr, "running image plugin <action>: <stdout>")
        return GardenError(
            f"running image plugin {action}: {call.stdout}: exit status {call.returncode}"
        )

    def create_argv(
        self,
        rootfs: str,
        handle: str,
        *,
        disk_limit: int = 0,
        exclusive: bool = False,
        username: str = "",
        password: str = "",
    ) -> list[str]:
        """The arguments after ``--config FILE`` (guardian's DefaultCommandCreator)."""
        args = ["create"]
        if disk_limit > 0:
            args += ["--disk-limit-size-bytes", str(disk_limit)]
            if exclusive:
                args.append("--exclude-image-from-quota")
        if username:
            args += ["--username", username]
        if password:
            args += ["--password", password]
        return [*args, rootfs.replace("#", ":", 1), handle]

    def create(
        self,
        handle: str,
        rootfs: str,
        *,
        privileged: bool = False,
        disk_limit: int = 0,
        exclusive: bool = False,
        username: str = "",
        password: str = "",
    ) -> Container:
        plugin_rootfs = rootfs
        try:
            if rootfs.startswith(PRELOADED_PLUS_LAYER):
                plugin_rootfs = self.write_layout(handle, rootfs)
            args = self.create_argv(
                plugin_rootfs,
                handle,
                disk_limit=disk_limit,
                exclusive=exclusive,
                username=username,
                password=password,
            )
            call = self._call(self._config(privileged), *args)
            if call.returncode != 0:
                raise self._failed("create", call)
            spec = parse_create_output(call.stdout)
        except GardenError:
            # Garden destroys what a failed create may have left (both stores);
            # a failure there is only logged, the create's error is the one returned.
            with contextlib.suppress(GardenError):
                self._destroy(handle)
            raise
        container = Container(handle, privileged, rootfs, spec)
        self.containers[handle] = container
        return container

    def write_layout(self, handle: str, rootfs: str) -> str:
        """Write the OCI layout for a ``preloaded+layer:`` rootfs; the URL create gets."""
        result = self.run(
            [sys.executable, os.path.abspath(__file__), "write-layout", self.depot, handle, rootfs]
        )
        if result.returncode != 0:
            raise GardenError(f"creating image spec: {result.stderr.strip()}")
        return result.stdout.strip()

    def _destroy(self, handle: str) -> None:
        # Unprivileged store first, then the privileged one; the first failure stops it.
        for config in (self.unprivileged_config, self.privileged_config):
            call = self._call(config, "delete", handle)
            if call.returncode != 0:
                raise self._failed("destroy", call)
        self.run(["rm", "-rf", os.path.join(self.depot, handle)])

    def destroy(self, handle: str) -> None:
        self._destroy(handle)
        self.containers.pop(handle, None)

    def stats(self, handle: str) -> tuple[int, int]:
        """(total_bytes_used, exclusive_bytes_used) as Garden's bulk metrics get them.

        The unprivileged store first; when that fails (a privileged container
        is not in it) the privileged one.
        """
        call = self._call(self.unprivileged_config, "stats", handle)
        if call.returncode != 0:
            call = self._call(self.privileged_config, "stats", handle)
            if call.returncode != 0:
                raise self._failed("metrics", call)
        return parse_stats_output(call.stdout)

    def capacity(self) -> int:
        """The unprivileged store's capacity (the only one Garden asks)."""
        call = self._call(self.unprivileged_config, "capacity")
        if call.returncode != 0:
            raise self._failed("capacity", call)
        try:
            capacity = json.loads(call.stdout)
        except ValueError as exc:
            raise GardenError(f"parsing capacity: {call.stdout}: {exc}") from None
        if not isinstance(capacity, dict) or not all(_go_uint64(v) for v in capacity.values()):
            raise GardenError(f"parsing capacity: {call.stdout}: not a map of uint64")
        return int(capacity.get("capacity", 0))

    def relogged(self) -> list[Relogged]:
        return [r for call in self.calls for r in call.relogged]


# --------------------------------------------------------------------------
# The layout Garden writes for preloaded+layer: rootfs URLs
# --------------------------------------------------------------------------


def write_image_layout(depot: str, handle: str, rootfs: str) -> str:
    """Write ``<depot>/<handle>/image`` for *rootfs*; return the ``oci://`` URL Garden passes."""
    import gardenlayout

    image = gardenlayout.write_from_rootfs_url(os.path.join(depot, handle, "image"), rootfs)
    return image.url


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 4 and argv[0] == "write-layout":
        print(write_image_layout(*argv[1:]))
        return 0
    print("usage: garden.py write-layout DEPOT HANDLE ROOTFS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
