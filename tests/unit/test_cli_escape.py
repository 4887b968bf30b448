"""cli.escape: what could break or forge a stdout line is shown, the rest is kept."""

import pytest

from grootfs_py.cli import escape

CASES = [
    ("plain line, é and ünïcode, NBSP\u00a0ok", "plain line, é and ünïcode, NBSP\u00a0ok"),
    ("a\nb", "a\\nb"),
    ("cr\r\nlf", "cr\\r\\nlf"),
    ("tab\there", "tab\\there"),
    ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
    ("nul\x00del\x7f", "nul\\x00del\\x7f"),
    ("c1 \x85 \x9b", "c1 \\x85 \\x9b"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
    ("caf\udce9", "caf\\xe9"),  # an undecodable byte, as surrogateescape holds it
    ("lone \ud800", "lone \\ud800"),
    ("already \\n escaped", "already \\n escaped"),
]


@pytest.mark.parametrize(("text", "shown"), CASES)
def test_escape_shows_control_characters_and_keeps_the_rest(text, shown):
    assert escape(text) == shown


@pytest.mark.parametrize("code", [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0xD800])
def test_every_line_breaking_or_control_character_is_escaped(code):
    shown = escape(f"x{chr(code)}y")
    assert shown.isprintable()
    assert len(shown.splitlines()) == 1
    shown.encode("utf-8")
