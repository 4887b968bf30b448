"""The model of lager's chug and Garden's relogger (tests/garden.py) against lager's rules.

Each case is a line and what Garden does with it, read from lager v3's
chug.go and guardian's relogger.go (the numeric lines are guardian's own
relogger test inputs; the pretty ones are lines the GrootFS 0.30.1 binary
wrote). The model is what the plugin's own log tests lean on, so it is
pinned here first. (Once, by hand, the model and the real chug, built with
Go from guardian's vendored lager v3.82, agreed on 1,527 lines: these cases,
their field-by-field variations and our CLI's stderr.)
"""

from __future__ import annotations

import pytest

import garden

GROOTFS_INFO = (
    '{"timestamp":"2026-11-30T10:43:33.639696375Z","level":"info","source":"grootfs",'
    '"message":"grootfs.delete.groot-deleting.starting","data":{"imageID":"img1","session":"1.1"}}'
)
GROOTFS_ERROR = (
    '{"timestamp":"2026-11-30T10:43:33.579306105Z","level":"error","source":"grootfs",'
    '"message":"grootfs.create.creating","data":{"error":"fetching image timestamp: stat '
    '/tmp/nonexist.tar: no such file or directory","session":"1"}}'
)


def numeric(log_level: object, data: str = '{"test_data":"test_value"}', stamp: str = "") -> str:
    stamp = stamp or '"1540895553.922393799"'
    return (
        f'{{"timestamp":{stamp},"source":"test","message":"relogger.test",'
        f'"log_level":{log_level},"data":{data}}}'
    )


def pretty(level: str = '"info"', data: str = '{"session":"1"}', stamp: str = "") -> str:
    stamp = stamp or '"2026-11-30T10:43:33.579306105Z"'
    return (
        f'{{"timestamp":{stamp},"level":{level},"source":"grootfs",'
        f'"message":"grootfs.create.x","data":{data}}}'
    )


# (case id, line, Garden's level for it: debug/info/error, "output" for a
# non-lager line logged as an error, "dropped", "crash")
CASES = [
    ("grootfs-binary-info", GROOTFS_INFO, "info"),
    ("grootfs-binary-error", GROOTFS_ERROR, "error"),
    ("numeric-debug", numeric(0), "debug"),
    ("numeric-info", numeric(1), "info"),
    ("numeric-error", numeric(2), "error"),
    ("numeric-fatal-is-logged-as-error", numeric(3), "error"),
    ("plain-text", "some random log line", "output"),
    ("python-traceback", "Traceback (most recent call last):", "output"),
    ("text-before-the-json-is-skipped", "garbage " + pretty(), "info"),
    ("text-after-the-json-is-ignored", pretty() + " trailing", "info"),
    ("level-wins-over-log-level", pretty().replace('"level"', '"log_level":2,"level"'), "info"),
    (
        "empty-level-falls-back-to-log-level",
        numeric(2).replace('"source"', '"level":"","source"'),
        "error",
    ),
    ("keys-match-ignoring-case", pretty().replace('"level"', '"Level"'), "info"),
    ("unknown-keys-are-ignored", pretty().replace('"source"', '"extra":[1,{}],"source"'), "info"),
    ("rfc3339-without-fraction", pretty(stamp='"2026-11-30T10:43:33Z"'), "info"),
    ("rfc3339-with-offset", pretty(stamp='"2026-11-30T10:43:33.5+01:00"'), "info"),
    ("unknown-level-name", pretty(level='"warn"'), "output"),
    ("upper-case-level-name", pretty(level='"INFO"'), "output"),
    ("level-not-a-string", pretty(level="1"), "output"),
    ("timestamp-a-number", numeric(1, stamp="1540895553.9"), "output"),
    ("timestamp-not-a-time", pretty(stamp='"yesterday"'), "output"),
    ("timestamp-with-a-space", pretty(stamp='"2026-11-30 10:43:33Z"'), "output"),
    ("timestamp-out-of-float-range", numeric(1, stamp='"1e400"'), "output"),
    ("timestamp-impossible-date", pretty(stamp='"2026-02-30T10:43:33Z"'), "output"),
    (
        "timestamp-missing",
        pretty().replace('"timestamp":"2026-11-30T10:43:33.579306105Z",', ""),
        "output",
    ),
    ("log-level-a-string", numeric('"1"'), "output"),
    ("log-level-with-a-fraction", numeric("1.0"), "output"),
    ("log-level-none-of-the-four", numeric(7), "dropped"),
    ("session-not-a-string", pretty(data='{"session":1}'), "output"),
    ("trace-not-a-string", pretty(data='{"trace":[1]}'), "output"),
    ("error-not-a-string-at-error-level", pretty(level='"error"', data='{"error":{}}'), "output"),
    ("error-not-a-string-at-info-level", pretty(data='{"error":{}}'), "info"),
    ("source-not-a-string", pretty().replace('"source":"grootfs"', '"source":5'), "output"),
    ("data-not-an-object", pretty(data="[]"), "output"),
    ("data-null-panics-the-relogger", pretty(data="null"), "crash"),
    ("data-missing-panics-the-relogger", pretty().replace(',"data":{"session":"1"}', ""), "crash"),
    ("nan-is-not-json", pretty(data='{"x":NaN}'), "output"),
    ("cut-off-json", pretty()[:40], "output"),
    ("timestamp-with-go-digit-separators", numeric(1, stamp='"1_540_895_553.9"'), "info"),
    ("timestamp-with-a-stray-separator", numeric(1, stamp='"1540895553._9"'), "output"),
    ("timestamp-hex-float", numeric(1, stamp='"0x1p-2"'), "info"),
    ("timestamp-zone-offset-24-hours", pretty(stamp='"2026-11-30T10:43:33+24:00"'), "info"),
    ("timestamp-hour-24", pretty(stamp='"2026-11-30T24:00:00Z"'), "output"),
    ("data-number-beyond-float64", pretty(data='{"n":1e999}'), "output"),
    ("unknown-key-beyond-float64", pretty().replace('"source"', '"n":1e999,"source"'), "info"),
]


@pytest.mark.parametrize(("line", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_chug_and_the_relogger_treat_the_line_as_lager_does(line, expected):
    (relogged,) = garden.relog(line)
    if expected == "output":
        assert not relogged.entry.is_lager
        assert (relogged.garden_level, relogged.message, relogged.data) == (
            "error",
            "error",
            {"output": line},
        )
    else:
        assert relogged.entry.is_lager
        assert relogged.garden_level == expected


def test_the_relogger_strips_session_and_the_error_of_error_lines_from_data():
    (relogged,) = garden.relog(GROOTFS_ERROR)
    assert relogged.message == "grootfs.create.creating"
    assert relogged.entry.session == "1"
    assert relogged.entry.error.startswith("fetching image timestamp: stat ")
    assert relogged.data == {}


def test_empty_lines_are_skipped_and_every_other_line_is_relogged():
    out = garden.relog(f"\n{GROOTFS_INFO}\n\nplain\n{numeric(0)}")
    assert [r.garden_level for r in out] == ["info", "error", "debug"]
