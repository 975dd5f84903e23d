"""Server-sent events: parsing miners' streams and writing the client's."""

from __future__ import annotations

from typing import Any

from engine import jsonio

DONE = b"[DONE]"


class SseData:
    """The `data` of each event of a body, as bytes, from the body's pieces as they arrive (`feed`, then
    `end` when the body ends). Multi-line data is joined with newlines (per the SSE spec). No text
    decoding: what miners send is JSON, parsed from bytes. Lines end in LF, CRLF or CR; comments (":"),
    `event:`, `id:` and `retry:` lines carry nothing used here. A piece's events come as one list, so a
    caller handles everything one read brought in one go."""

    __slots__ = ("_data", "_pending")

    def __init__(self) -> None:
        self._data: list[bytes] = []  # the data lines of the event not ended yet
        self._pending: list[bytes] = []  # the pieces of a line not ended yet: joined once, when it ends

    def feed(self, piece: bytes) -> list[bytes]:
        if b"\n" not in piece and b"\r" not in piece:
            self._pending.append(piece)
            return []
        if self._pending:
            piece = b"".join(self._pending) + piece
        lines, rest = _split_lines(piece)
        self._pending = [rest] if rest else []
        return _events(lines, self._data)

    def end(self) -> list[bytes]:
        """The end of the body ends the last event."""
        lines, _ = _split_lines(b"".join(self._pending) + b"\n\n")
        self._pending = []
        return _events(lines, self._data)


def _split_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in `buffer`, and what remains of it."""
    held = buffer.endswith(b"\r")  # maybe the first half of a CRLF: decided by the next bytes
    if held:
        buffer = buffer[:-1]
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    *lines, rest = buffer.split(b"\n")
    return lines, rest + b"\r" if held else rest


def _events(lines: list[bytes], data: list[bytes]) -> list[bytes]:
    events = []
    for line in lines:
        if line.startswith(b"data:"):
            data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        elif not line and data:
            events.append(data[0] if len(data) == 1 else b"\n".join(data))
            data.clear()
    return events


def encode_event(payload: Any) -> bytes:
    """One `data:` event, compact JSON (or the text of `[DONE]`)."""
    data = payload.encode() if isinstance(payload, str) else jsonio.dumps(payload)
    return b"data: " + data + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
