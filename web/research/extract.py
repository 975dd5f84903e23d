"""Finding the JSON a model wrote inside its answer.

Models wrap their JSON in prose or in a fenced block, and sometimes write something that looks like
JSON before the real thing (`[1]` in a sentence). So the value taken is the first one that both parses
and has the shape the step asked for: the first fenced block first, then every `{` or `[` in the text in
order. Parsing is strict (`wire.jsonio.loads_bounded`: no NaN, bounded depth), and the work is bounded:
at most `MAX_SCAN_CHARS` of the answer are looked at, and at most `MAX_CANDIDATES` starting points tried.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

from wire import jsonio

MAX_SCAN_CHARS = 100_000  # a step's JSON answer is a few kilobytes; the rest of a long answer is ignored
MAX_CANDIDATES = 64  # `{` / `[` positions tried before giving up
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\r?\n?(.*?)```", re.DOTALL)
_OPENERS = re.compile(r"[{\[]")

T = TypeVar("T")


class Malformed(ValueError):
    """A step's answer holds no usable value; the message says why (it is shown to the model when the
    step is asked again, and to the client when the run gives up)."""


def candidates(text: str) -> Iterator[str]:
    """The texts that may hold the JSON, in the order they are tried (not yet parsed strictly)."""
    text = text[:MAX_SCAN_CHARS]
    fenced = _FENCE.search(text)
    if fenced is not None:
        yield fenced.group(1).strip()
    decoder = json.JSONDecoder()
    for tried, opener in enumerate(_OPENERS.finditer(text)):
        if tried >= MAX_CANDIDATES:
            return
        start = opener.start()
        try:
            _, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):  # RecursionError: nesting past the interpreter's limit
            continue
        yield text[start:end]


def extract(text: str, shape: Callable[[object], T]) -> T:
    """The first candidate that parses and that `shape` accepts (`shape` raises Malformed otherwise)."""
    first_error: Malformed | None = None
    for candidate in candidates(text):
        try:
            value = jsonio.loads_bounded(candidate)
        except ValueError:
            continue
        try:
            return shape(value)
        except Malformed as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    raise Malformed("the answer holds no valid JSON")
