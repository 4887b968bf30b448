"""Load JSON that someone else wrote: bounded in size and in nesting depth.

Image indexes, manifests, configs, token answers and config files come from
outside. ``json.loads`` recurses once per nesting level, so a document of
100,000 nested arrays ends in ``RecursionError``, and it parses whatever
size it is handed. Every such document goes through :func:`loads`, which
checks both bounds first and says which one was exceeded.
"""

from __future__ import annotations

import json
import re
from typing import Any

from grootfs_py.errors import GrootError, ImageSourceError

# Image JSON nests a few levels (index > manifest > descriptor > annotations);
# 100 is far beyond any real document and far below the interpreter's limit.
MAX_DEPTH = 100

# A string (its escapes skipped whole) or a bracket: brackets inside strings don't nest.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def too_deep(text: str) -> bool:
    """Whether the arrays and objects of the JSON *text* nest deeper than MAX_DEPTH."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False  # the common case, at C speed: not enough brackets to nest that deep
    level = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            level += 1
            if level > MAX_DEPTH:
                return True
        elif token in ("]", "}"):
            level -= 1
    return False


def loads(
    data: bytes | str,
    what: str,
    *,
    max_bytes: int,
    error: type[GrootError] = ImageSourceError,
) -> Any:
    """The JSON value in *data*; raise *error* ``invalid <what>: <why>`` for what is not."""
    if len(data) > max_bytes:
        raise error(f"invalid {what}: larger than {max_bytes} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode(json.detect_encoding(data))
        except (UnicodeDecodeError, LookupError):
            raise error(f"invalid {what}: not JSON") from None
    else:
        text = data
    if too_deep(text):
        raise error(f"invalid {what}: nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError:
        raise error(f"invalid {what}: not JSON") from None
    except RecursionError:  # only if called already deep in the stack
        raise error(f"invalid {what}: nested deeper than {MAX_DEPTH} levels") from None
