"""One outbound HTTP/1.1 connection, written for the gateway's traffic: small requests, streamed answers.

The outbound pool (`engine/keepalive.py`) keeps these. Per request the work is one `send_all` of the
head and body, then one pass over the bytes received: the head is split once, the body is passed on as
it comes (with chunked framing removed). Everything the pool's callers catch is an httpx exception.

What it does not do, because miners and validators do not need it: TLS (the pool sends `https://`
through httpx's own transport), request bodies that are not bytes, `Expect: 100-continue`, upgrades.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx
import trio

MAX_HEAD_BYTES = 64 * 1024
RACE_SLACK_S = 0.02  # beyond two round trips: how late a close may still be the idle-close race
INCOMPLETE_BODY = "peer closed connection without sending complete message body"
MAX_CHUNK_LINE_BYTES = 4096
RECEIVE_BYTES = 65536

Headers = list[tuple[bytes, bytes]]


class GatewayLimitError(httpx.TransportError):
    """The gateway's own resources ran out (open files, the outbound connection cap): not the peer's failure."""


def encode_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """The request line and headers; a CR or LF inside a name or value is refused (no injection)."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    for name, value in headers:
        if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value or b":" in name:
            raise httpx.LocalProtocolError(f"header {name!r} holds a line break or a colon in its name")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: Headers
    keep_alive: bool
    length: int | None  # Content-Length; None with chunked framing or a body that runs to the close
    chunked: bool


def parse_head(block: bytes, *, method: bytes) -> ResponseHead:
    """A response head (without its blank line): status line, headers, and how the body is framed."""
    status_line, *lines = block.split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
    headers: Headers = []
    connection = transfer_encoding = content_length = b""
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise httpx.RemoteProtocolError(f"malformed response header line: {line[:80]!r}")
        value = value.strip(b" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == b"connection":
            connection += b"," + value.lower()
        elif lower == b"transfer-encoding":
            transfer_encoding += b"," + value.lower()
        elif lower == b"content-length":
            if content_length and content_length != value:
                raise httpx.RemoteProtocolError("conflicting Content-Length headers")
            content_length = value
    status = int(code)
    keep_alive = version == b"HTTP/1.1" and b"close" not in {t.strip() for t in connection.split(b",")}
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return ResponseHead(status, reason, headers, keep_alive, 0, False)
    if transfer_encoding:
        if transfer_encoding.rsplit(b",", 1)[-1].strip() != b"chunked":
            return ResponseHead(status, reason, headers, False, None, False)  # runs to the close
        return ResponseHead(status, reason, headers, keep_alive, None, True)
    if content_length:
        if not content_length.isdigit() or len(content_length) > 18:
            raise httpx.RemoteProtocolError(f"invalid Content-Length {content_length[:40]!r}")
        return ResponseHead(status, reason, headers, keep_alive, int(content_length), False)
    return ResponseHead(status, reason, headers, False, None, False)


def within(timeout_s: float | None) -> contextlib.AbstractContextManager[object]:
    """`trio.fail_after(timeout_s)`; None: no limit, and no cancel scope (the caller bounds the whole
    exchange; a scope per read costs as much as the read's parsing)."""
    return contextlib.nullcontext() if timeout_s is None else trio.fail_after(timeout_s)


def chunk_size(line: bytes) -> int:
    """The size on a chunk's first line (extensions after ";" ignored): hex digits only."""
    text = line.split(b";", 1)[0].strip(b" \t")
    if not text or len(text) > 16 or text.strip(b"0123456789abcdefABCDEF"):
        raise httpx.RemoteProtocolError(f"invalid chunk size {text[:20]!r}")
    return int(text, 16)


class Connection:
    """A kept HTTP/1.1 connection. One request at a time; `reusable` once a response ended cleanly."""

    def __init__(self, stream: trio.SocketStream, connect_s: float = 0.0) -> None:
        self.stream = stream
        self.connect_s = connect_s  # how long the TCP handshake took: about one round trip
        self.reusable = False
        self.idle_since = trio.current_time()
        self.sent_at = 0.0
        self.requests = 0
        self.answered = False  # whether the current request has had a byte of answer
        # Received bytes not yet consumed are self._buf[self._pos:]; appends are amortised O(1) and
        # nothing is copied twice, however the peer cuts what it sends.
        self._buf = bytearray()
        self._pos = 0

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float | None) -> Connection:
        started = trio.current_time()
        try:
            with within(timeout_s):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within {timeout_s}s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
        return cls(stream, trio.current_time() - started)

    def usable(self, now: float, expiry_s: float) -> bool:
        """Whether this idle connection can carry another request: not expired, and the server has
        neither closed it nor sent anything unasked (either makes its socket readable)."""
        return self.reusable and now - self.idle_since < expiry_s and not self.stream.socket.is_readable()

    def closed_on_arrival(self) -> bool:
        """Whether the request just sent met a connection the server had closed while it was idle: no
        byte of answer, and the close came within about a round trip of the send. Later, the server
        may have worked on the request; it is then not sent again."""
        return not self.answered and trio.current_time() - self.sent_at <= 2 * self.connect_s + RACE_SLACK_S

    async def send(self, head: bytes, body: bytes, timeout_s: float | None) -> None:
        self.reusable = False
        self.answered = False
        self.requests += 1
        try:
            with within(timeout_s):
                await self.stream.send_all(head + body)
        except trio.TooSlowError:
            raise httpx.WriteTimeout(f"request not sent within {timeout_s}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"connection broke while sending: {exc}") from exc
        finally:
            self.sent_at = trio.current_time()

    async def _receive(self, timeout_s: float | None) -> bytes:
        try:
            with within(timeout_s):
                return await self.stream.receive_some(RECEIVE_BYTES)
        except trio.TooSlowError:
            raise httpx.ReadTimeout(f"nothing received within {timeout_s}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"connection broke while reading: {exc}") from exc

    async def _fill(self, timeout_s: float | None, closed: str) -> None:
        """Append what arrives next; the peer closing first is a protocol error saying `closed`."""
        data = await self._receive(timeout_s)
        if not data:
            raise httpx.RemoteProtocolError(closed)
        if self._pos:  # drop what was consumed: moves only the few bytes not consumed yet
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def _find(self, marker: bytes, scanned: int) -> int:
        """The offset of `marker` in the unconsumed bytes, not looking again at the first `scanned`."""
        found = self._buf.find(marker, self._pos + max(0, scanned - len(marker) + 1))
        return -1 if found < 0 else found - self._pos

    def _take(self, size: int) -> bytes:
        part = bytes(self._buf[self._pos:self._pos + size])
        self._pos += len(part)
        return part

    async def receive_head(self, method: bytes, timeout_s: float | None) -> ResponseHead:
        """The next final response head (informational 1xx ones are skipped)."""
        while True:
            scanned = 0
            while (end := self._find(b"\r\n\r\n", scanned)) < 0:
                scanned = len(self._buf) - self._pos
                if scanned > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
                await self._fill(timeout_s, "server disconnected without sending a response")
                self.answered = True
            head = parse_head(self._take(end + 4)[:-4], method=method)
            if not 100 <= head.status < 200:
                return head

    async def body(self, head: ResponseHead, timeout_s: float | None) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, one piece per read; at its clean end the connection
        becomes reusable."""
        if head.chunked:
            async for part in self._chunked(timeout_s):
                yield part
        elif head.length is not None:
            remaining = head.length
            while remaining:
                if self._pos == len(self._buf):
                    await self._fill(timeout_s, INCOMPLETE_BODY)
                part = self._take(remaining)
                remaining -= len(part)
                yield part
        else:
            if self._pos < len(self._buf):
                yield self._take(len(self._buf))
            while data := await self._receive(timeout_s):
                yield data
            return  # the close ends the body: nothing to reuse
        self.reusable = head.keep_alive and self._pos == len(self._buf)
        self.idle_since = trio.current_time()

    def _line(self) -> bytes | None:
        """A whole line from the buffer (without its CRLF), or None until one has arrived."""
        end = self._find(b"\r\n", 0)
        if end < 0:
            if len(self._buf) - self._pos > MAX_CHUNK_LINE_BYTES:
                raise httpx.RemoteProtocolError("chunk header line too long")
            return None
        return self._take(end + 2)[:-2]

    async def _chunked(self, timeout_s: float | None) -> AsyncIterator[bytes]:
        """Chunked framing removed; what one read brings is passed on as one piece."""
        size_line, data, data_end, trailers = range(4)
        state, remaining = size_line, 0
        parts: list[bytes] = []
        while True:
            while True:  # as far as the buffered bytes go
                if state == data:
                    if self._pos == len(self._buf):
                        break
                    part = self._take(remaining)
                    parts.append(part)
                    remaining -= len(part)
                    if not remaining:
                        state = data_end
                    continue
                line = self._line()
                if line is None:
                    break
                if state == size_line:
                    remaining = chunk_size(line)
                    state = data if remaining else trailers
                elif state == data_end:
                    if line:
                        raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                    state = size_line
                elif not line:  # the blank line after the trailers ends the body
                    if parts:
                        yield b"".join(parts)
                    return
            if parts:
                yield b"".join(parts)
                parts = []
            await self._fill(timeout_s, INCOMPLETE_BODY)

    async def aclose(self) -> None:
        self.reusable = False
        with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, OSError):
            await self.stream.aclose()  # gone either way


def timeouts(extensions: Mapping[str, object]) -> dict[str, float | None]:
    """httpx's per-request timeouts (`connect`, `read`, `write`, `pool`) from a request's extensions."""
    given = extensions.get("timeout")
    if isinstance(given, Mapping):
        return {k: (float(v) if isinstance(v, int | float) else None) for k, v in given.items()}
    return {}
