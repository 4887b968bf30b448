"""A model of Garden (guardian) as a client of the image plugin, for the tests.

Built from ``shared/docs/garden-cell.md`` and, where that is silent, from
guardian's ``imageplugin`` package and the lager ``chug`` it vendors (lager
v3): what Garden runs, what it reads back, and what it does with stderr.
It is a model, not Garden: no containers, no networking, no API; it runs
the plugin exactly as Garden would and judges its output as Garden would.

- ``chug`` and ``relog``: lager's chug decides, line by line, whether stderr
  is a lager entry; Garden's relogger re-logs an entry at its own level and
  any other line as a Garden *error* ``{"output": line}``.
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
import json
import re
from dataclasses import dataclass
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
# strconv.ParseFloat's syntax (decimal and hex; no underscores without a base
# prefix, no spaces), then time.Parse(time.RFC3339Nano, ...) as the fallback.
_GO_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_GO_HEX = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?\d+\Z")
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


def _go_timestamp(text: str) -> bool:
    if _GO_SPECIAL.match(text) or _GO_HEX.match(text):
        return True
    if _GO_DECIMAL.match(text):
        return float(text) not in (float("inf"), float("-inf"))  # ParseFloat's ErrRange
    m = _RFC3339.match(text)
    if not m:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    zone_ok = m[7] is None or (int(m[7]) < 24 and int(m[8]) < 60)
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
            want is dict and not isinstance(value, dict)
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
