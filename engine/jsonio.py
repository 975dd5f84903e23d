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


def loads(data: bytes | str) -> Any:
    """Strict JSON; anything else raises ValueError."""
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON. A value that is not JSON at all (a set, an object) raises TypeError."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass  # lone surrogates or huge integers: the standard library writes them (escaped)
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
