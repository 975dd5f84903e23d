"""Server-sent events: parsing miners' streams and writing the client's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

DONE = "[DONE]"


async def iter_sse_data(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """Yield the `data` of each event; multi-line data is joined with newlines (per the SSE spec)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # comments (":"), `event:`, `id:` and `retry:` lines carry nothing we use
    if data:
        yield "\n".join(data)


def encode_event(payload: Any) -> bytes:
    """One `data:` event, compact JSON (or the text of `[DONE]`)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE_EVENT = encode_event(DONE)
