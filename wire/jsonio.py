"""JSON on the hot path: orjson where it can, the standard library where orjson refuses.

Every miner chunk is parsed and every scoring payload and JSON response encoded here; orjson does
both several times faster than `json`. Parsing is strict: NaN, lone surrogates and integers beyond 64 bits fail like any
invalid chunk. Encoding falls back to `json` for what orjson refuses (lone surrogates, huge integers);
NaN and infinities do not come in from outside (every input is parsed strictly, client bodies too:
`web/body.py` refuses NaN, Infinity and numbers beyond a float's range); one the gateway computed itself
is written as null, never as the invalid `NaN`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_DEPTH = 32  # how deep what a peer sends may nest (OpenAI chunks and requests nest about 8 deep)
NOT_OPENERS = bytes(set(range(256)) - set(b"{["))  # `bytes.translate` deletes these: the brackets are left


class TooDeep(ValueError):
    """JSON nested deeper than allowed: refused like any invalid JSON."""


def loads(data: bytes | str) -> Any:
    """Strict JSON; anything else raises ValueError."""
    return orjson.loads(data)


def loads_bounded(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON nested at most `max_depth` deep (a scalar is depth 0); anything else raises
    ValueError (`TooDeep` for the nesting). A text with no more brackets than `max_depth` cannot nest
    deeper, so the usual case costs two byte counts; only bracket-rich texts are walked."""
    value = orjson.loads(data)  # orjson itself refuses nesting beyond 1024 (ValueError)
    if isinstance(data, bytes):
        openers = len(data.translate(None, NOT_OPENERS))  # one pass (two counts took twice as long)
    else:
        openers = data.count("{") + data.count("[")
    if openers > max_depth:
        check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise `TooDeep` when containers in `value` nest deeper than `max_depth` (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= max_depth:
            raise TooDeep(f"JSON nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON. A value that is not JSON at all (a set, an object) raises TypeError."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass  # lone surrogates or huge integers: the standard library writes them (escaped)
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
