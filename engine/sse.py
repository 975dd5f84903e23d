"""Server-sent events: parsing miners' streams and writing the client's."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Any

from engine import jsonio

DONE = b"[DONE]"


async def iter_sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The `data` of each event of a body, as bytes; multi-line data is joined with newlines (per the
    SSE spec). No text decoding: what miners send is JSON, parsed from bytes. Lines end in LF, CRLF
    or CR; comments (":"), `event:`, `id:` and `retry:` lines carry nothing used here."""
    data: list[bytes] = []
    pending: list[bytes] = []  # the pieces of a line not ended yet: joined once, when it ends
    async for chunk in chunks:
        if b"\n" not in chunk and b"\r" not in chunk:
            pending.append(chunk)
            continue
        lines, rest = _split_lines(b"".join(pending) + chunk)
        pending = [rest]
        for event in _events(lines, data):
            yield event
    lines, _ = _split_lines(b"".join(pending) + b"\n\n")  # the end of the body ends the last event
    for event in _events(lines, data):
        yield event


def _split_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in `buffer`, and what remains of it."""
    held = buffer.endswith(b"\r")  # maybe the first half of a CRLF: decided by the next bytes
    if held:
        buffer = buffer[:-1]
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    *lines, rest = buffer.split(b"\n")
    return lines, rest + b"\r" if held else rest


def _events(lines: list[bytes], data: list[bytes]) -> Iterator[bytes]:
    for line in lines:
        if line.startswith(b"data:"):
            data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        elif not line and data:
            yield b"\n".join(data)
            data.clear()


def encode_event(payload: Any) -> bytes:
    """One `data:` event, compact JSON (or the text of `[DONE]`)."""
    data = payload.encode() if isinstance(payload, str) else jsonio.dumps(payload)
    return b"data: " + data + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
