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
MAX_CHUNK_LINE_BYTES = 4096
RECEIVE_BYTES = 65536

Headers = list[tuple[bytes, bytes]]


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
        if not content_length.isdigit():
            raise httpx.RemoteProtocolError(f"invalid Content-Length {content_length[:40]!r}")
        return ResponseHead(status, reason, headers, keep_alive, int(content_length), False)
    return ResponseHead(status, reason, headers, False, None, False)


def within(timeout_s: float | None) -> contextlib.AbstractContextManager[object]:
    """`trio.fail_after(timeout_s)`; None: no limit, and no cancel scope (the caller bounds the whole
    exchange; a scope per read costs as much as the read's parsing)."""
    return contextlib.nullcontext() if timeout_s is None else trio.fail_after(timeout_s)


class Connection:
    """A kept HTTP/1.1 connection. One request at a time; `reusable` once a response ended cleanly."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reusable = False
        self.idle_since = trio.current_time()
        self.requests = 0
        self.answered = False  # whether the current request has had a byte of answer
        self._buffer = b""

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float | None) -> Connection:
        try:
            with within(timeout_s):
                return cls(await trio.open_tcp_stream(host, port))
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within {timeout_s}s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc

    def usable(self, now: float, expiry_s: float) -> bool:
        """Whether this idle connection can carry another request: not expired, and the server has
        neither closed it nor sent anything unasked (either makes its socket readable)."""
        return self.reusable and now - self.idle_since < expiry_s and not self.stream.socket.is_readable()

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

    async def _receive(self, timeout_s: float | None) -> bytes:
        try:
            with within(timeout_s):
                return await self.stream.receive_some(RECEIVE_BYTES)
        except trio.TooSlowError:
            raise httpx.ReadTimeout(f"nothing received within {timeout_s}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"connection broke while reading: {exc}") from exc

    async def receive_head(self, method: bytes, timeout_s: float | None) -> ResponseHead:
        """The next final response head (informational 1xx ones are skipped)."""
        while True:
            while (end := self._buffer.find(b"\r\n\r\n")) < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
                data = await self._receive(timeout_s)
                if not data:
                    raise httpx.RemoteProtocolError("server disconnected without sending a response")
                self.answered = True
                self._buffer += data
            head = parse_head(self._buffer[:end], method=method)
            self._buffer = self._buffer[end + 4:]
            if not 100 <= head.status < 200:
                return head

    async def body(self, head: ResponseHead, timeout_s: float | None) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; at its clean end the connection becomes reusable."""
        if head.chunked:
            async for part in self._chunked(timeout_s):
                yield part
        elif head.length is not None:
            async for part in self._exactly(head.length, timeout_s):
                yield part
        else:
            if self._buffer:
                part, self._buffer = self._buffer, b""
                yield part
            while data := await self._receive(timeout_s):
                yield data
            return  # the close ends the body: nothing to reuse
        self.reusable = head.keep_alive and not self._buffer
        self.idle_since = trio.current_time()

    async def _more(self, timeout_s: float | None) -> None:
        """More of the body into the buffer; the peer closing first is a protocol error."""
        data = await self._receive(timeout_s)
        if not data:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        self._buffer += data

    async def _exactly(self, size: int, timeout_s: float | None) -> AsyncIterator[bytes]:
        while size:
            if not self._buffer:
                await self._more(timeout_s)
            part, self._buffer = self._buffer[:size], self._buffer[size:]
            size -= len(part)
            yield part

    async def _line(self, timeout_s: float | None) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_CHUNK_LINE_BYTES:
                raise httpx.RemoteProtocolError("chunk header line too long")
            await self._more(timeout_s)
        line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
        return line

    async def _chunked(self, timeout_s: float | None) -> AsyncIterator[bytes]:
        while True:
            size_text = (await self._line(timeout_s)).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"invalid chunk size {size_text[:20]!r}") from None
            if size == 0:
                while await self._line(timeout_s):  # trailers, up to the blank line
                    pass
                return
            async for part in self._exactly(size, timeout_s):
                yield part
            if await self._line(timeout_s):
                raise httpx.RemoteProtocolError("chunk data not followed by CRLF")

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
