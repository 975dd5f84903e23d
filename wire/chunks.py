"""A miner's OpenAI chat chunk: its text, finish_reason and choice, and the usage counts it reports."""

from __future__ import annotations

from typing import Any

from wire import jsonio
from wire.sse import DONE

MAX_USAGE_TOKENS = 2**31 - 1

# One event of a miner's stream, read: its data as received, the chunk, its text (empty when none),
# finish_reason and choice (`content_of`).
ReadChunk = tuple[bytes, dict[str, Any], str, str | None, dict[str, Any] | None]


class NotAChunk(ValueError):
    """An event whose data is not a JSON object (or nests deeper than allowed)."""


def read_events(events: list[bytes]) -> tuple[list[ReadChunk], bool]:
    """The chunks of one read's events, up to `[DONE]`, and whether `[DONE]` came (what follows it is
    not read). The first event that is not a chunk raises `NotAChunk`, before any is taken: a read is
    taken whole or not at all. One loop for them all, as `jsonio.loads_bounded` and the chunk checks
    would do it per event: the calls cost a third of the reading (17 events of a usual answer, five
    answers a request)."""
    read: list[ReadChunk] = []
    loads, not_openers, max_depth = jsonio.loads, jsonio.NOT_OPENERS, jsonio.MAX_DEPTH
    for data in events:
        if data == DONE:
            return read, True
        try:
            chunk = loads(data)
            if len(data.translate(None, not_openers)) > max_depth:
                jsonio.check_depth(chunk, max_depth)
        except ValueError:
            raise NotAChunk("not valid JSON (or nested too deep)") from None
        if not isinstance(chunk, dict):
            raise NotAChunk("not a JSON object")
        # `content_of`, written out: the usual chunk (a delta with its text) without a call or a tuple
        choices = chunk.get("choices")
        if type(choices) is list and choices and type(choice := choices[0]) is dict \
                and type(delta := choice.get("delta")) is dict and type(text := delta.get("content")) is str:
            finish = choice.get("finish_reason")
            read.append((data, chunk, text, finish if type(finish) is str else None, choice))
        else:
            read.append((data, chunk, *content_of(chunk)))
    return read, False


def content_of(chunk: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None]:
    """The text delta, finish_reason and choice of an OpenAI chat chunk (empty text when there is none)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None, None
    choice = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        delta = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = delta.get("content") if isinstance(delta, dict) else None
    finish = choice.get("finish_reason")
    return (text if isinstance(text, str) else ""), (finish if isinstance(finish, str) else None), choice


def usage_counts(value: Any) -> dict[str, int] | None:
    """A miner's `usage`, kept only when each count is a plausible non-negative integer."""
    if not isinstance(value, dict):
        return None
    counts = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        count = value.get(name)
        if count is None:
            continue
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_USAGE_TOKENS:
            return None
        counts[name] = count
    return counts or None
