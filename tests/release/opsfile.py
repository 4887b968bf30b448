"""A small evaluator of BOSH ops files (go-patch ``replace`` and ``remove``).

Enough of the semantics ``bosh int -o`` applies to check this release's ops
files without the bosh CLI: paths of map keys, array indexes, ``-`` (append)
and ``key=value`` (the array item whose key has that value); ``?`` after a
token makes it optional: on replace, missing maps and items are created,
on remove, a missing target is no error. Anything else is an error, as in bosh.
"""

from __future__ import annotations

import copy
from typing import Any


class OpsError(Exception):
    pass


def _tokens(path: str) -> list[str]:
    if not path.startswith("/"):
        raise OpsError(f"path `{path}` must start with /")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _split(token: str) -> tuple[str, bool]:
    return (token[:-1], True) if token.endswith("?") else (token, False)


def _find(node: list[Any], key: str, value: str) -> int | None:
    for i, item in enumerate(node):
        if isinstance(item, dict) and str(item.get(key)) == value:
            return i
    return None


def apply(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("type"), op.get("path", "")
        if kind == "replace":
            doc = _replace(doc, _tokens(path), copy.deepcopy(op["value"]), path)
        elif kind == "remove":
            _remove(doc, _tokens(path), path)
        else:
            raise OpsError(f"unknown operation type `{kind}`")
    return doc


def _replace(node: Any, tokens: list[str], value: Any, path: str) -> Any:
    if tokens == [""]:
        return value
    token, optional = _split(tokens[0])
    last = len(tokens) == 1
    # After an optional token, every later token is optional too (go-patch).
    rest = [t if t.endswith("?") or not optional else t + "?" for t in tokens[1:]]
    if isinstance(node, dict):
        if token not in node:
            if not optional:
                raise OpsError(f"{path}: key `{token}` not found")
            node[token] = None if last else ({} if "=" not in rest[0] else [])
        node[token] = value if last else _replace(node[token], rest, value, path)
        return node
    if isinstance(node, list):
        if token == "-":
            if not last:
                node.append({} if "=" not in rest[0] else [])
                node[-1] = _replace(node[-1], rest, value, path)
            else:
                node.append(value)
            return node
        if "=" in token:
            key, want = token.split("=", 1)
            index = _find(node, key, want)
            if index is None:
                if not optional:
                    raise OpsError(f"{path}: no item with {key}={want}")
                node.append(value if last else {key: want})
                if last:
                    return node
                index = len(node) - 1
        else:
            index = int(token)
            if not -len(node) <= index < len(node):
                raise OpsError(f"{path}: index {index} out of range")
        node[index] = value if last else _replace(node[index], rest, value, path)
        return node
    raise OpsError(f"{path}: cannot descend into `{token}` of a {type(node).__name__}")


def _remove(node: Any, tokens: list[str], path: str) -> None:
    for i, raw in enumerate(tokens):
        token, optional = _split(raw)
        last = i == len(tokens) - 1
        if isinstance(node, dict):
            if token not in node:
                if optional:
                    return
                raise OpsError(f"{path}: key `{token}` not found")
            if last:
                del node[token]
                return
            node = node[token]
        elif isinstance(node, list):
            if "=" in token:
                key, want = token.split("=", 1)
                index = _find(node, key, want)
                if index is None:
                    if optional:
                        return
                    raise OpsError(f"{path}: no item with {key}={want}")
            else:
                index = int(token)
            if last:
                del node[index]
                return
            node = node[index]
        else:
            raise OpsError(f"{path}: cannot descend into `{token}`")
