"""Server-sent events: parsing miners' streams and writing the client's."""

from __future__ import annotations

from typing import Any

from wire import jsonio

DONE = b"[DONE]"
MAX_EVENT_BYTES = 64 * 1024  # one line, and one event's data, from a miner


class SseTooLarge(ValueError):
    """A line or an event longer than the parser's limit: the sender's fault."""


class SseData:
    """The `data` of each event of a body, as bytes, from the body's pieces as they arrive (`feed`, then
    `end` when the body ends). Multi-line data is joined with newlines (per the SSE spec). No text
    decoding: what miners send is JSON, parsed from bytes. Lines end in LF, CRLF or CR; comments (":"),
    `event:`, `id:` and `retry:` lines carry nothing used here. A piece's events come as one list, so a
    caller handles everything one read brought in one go.

    Bounded: a line, or the data of one event, longer than `max_event_bytes` raises `SseTooLarge` as
    soon as it is seen (a line that never ends is not held until it does)."""

    __slots__ = ("_data", "_data_bytes", "_limit", "_pending", "_pending_bytes")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._data: list[bytes] = []  # the data lines of the event not ended yet
        self._data_bytes = 0  # their length once joined (the newlines between them included)
        self._pending: list[bytes] = []  # the pieces of a line not ended yet: joined once, when it ends
        self._pending_bytes = 0
        self._limit = max_event_bytes

    def feed(self, piece: bytes) -> list[bytes]:
        if b"\n" not in piece and b"\r" not in piece:
            self._pending.append(piece)
            self._pending_bytes += len(piece)
            if self._pending_bytes > self._limit:
                raise SseTooLarge(f"an event stream line over {self._limit} bytes")
            return []
        if self._pending:
            piece = b"".join(self._pending) + piece
        events: list[bytes] = []
        if not self._data and b"\r" not in piece:
            events, piece = self._single_lines(piece)
        lines, rest = _split_lines(piece)
        self._pending = [rest] if rest else []
        self._pending_bytes = len(rest)
        return events + self._events(lines) if events else self._events(lines)

    def _single_lines(self, piece: bytes) -> tuple[list[bytes], bytes]:
        """The usual stream, taken whole: events of one `data: ` line each, ended by a blank line, LF
        only (what miners send, a token an event), and what follows the last blank line, for the line
        parser. No events, and the whole piece, when it holds anything else before its last blank line
        (a comment, a field, data over several lines, a line over the limit)."""
        body, ended, rest = piece.rpartition(b"\n\n")
        if not ended or not body.startswith(b"data: "):
            return [], piece
        events = body[6:].split(b"\n\ndata: ")
        if body.count(b"\n") != 2 * (len(events) - 1):
            return [], piece  # a line other than a `data: ` one, or an event of several lines
        if max(map(len, events)) > self._limit - 6:
            return [], piece  # the line parser says which line is over the limit
        return events, rest

    def end(self) -> list[bytes]:
        """The end of the body ends the last event."""
        lines, _ = _split_lines(b"".join(self._pending) + b"\n\n")
        self._pending = []
        self._pending_bytes = 0
        return self._events(lines)

    def _events(self, lines: list[bytes]) -> list[bytes]:
        """The events these lines end. An event's size is kept as its lines come (each line once),
        empty `data:` lines included: they add a newline each."""
        events = []
        data, limit = self._data, self._limit
        for line in lines:
            if len(line) > limit:
                raise SseTooLarge(f"an event stream line over {limit} bytes")
            if line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._data_bytes += len(value) + (1 if data else 0)
                if self._data_bytes > limit:
                    raise SseTooLarge(f"an event over {limit} bytes")
                data.append(value)
            elif not line and data:
                events.append(data[0] if len(data) == 1 else b"\n".join(data))
                data.clear()
                self._data_bytes = 0
        return events


def _split_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in `buffer`, and what remains of it."""
    held = buffer.endswith(b"\r")  # maybe the first half of a CRLF: decided by the next bytes
    if held:
        buffer = buffer[:-1]
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    *lines, rest = buffer.split(b"\n")
    return lines, rest + b"\r" if held else rest


def encode_event(payload: Any) -> bytes:
    """One `data:` event, compact JSON (or the text of `[DONE]`)."""
    data = payload.encode() if isinstance(payload, str) else jsonio.dumps(payload)
    return b"data: " + data + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
