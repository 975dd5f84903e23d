"""One outbound HTTP/1.1 connection, written for the gateway's traffic: small requests, streamed answers.

Two layers. `ResponseParser` is the protocol without I/O, in the style of h11: `feed(bytes)`, then
`next_event()` until it says `NEED_DATA`; it holds every limit on what a peer may send (`Limits`), so
it is tested against h11 over every byte split. `Connection` is the thin I/O shell around it: one
`send_all` of the head and body per request, then each received piece fed to the parser once. The
outbound pool (`wire/pool.py`) keeps these connections.

Per answer the work is one pass over the bytes received: the head is matched once (two regular
expression scans in C, no per-line Python), the body is passed on as it comes, chunked framing
removed, everything one read brought as one piece. Miners and validators are untrusted servers:
what they can make the gateway hold is bounded by `Limits` (the head, one header line, the number of
headers, a chunk-size line, the trailers, informational heads); a body is never held, only passed
on a read at a time. Every error is an httpx exception, so the pool's callers catch one family.

What it does not do, because miners and validators do not need it: TLS (the pool sends `https://`
through httpx's own transport), request bodies that are not bytes, `Expect: 100-continue`, upgrades,
content or transfer codings other than chunked (the gateway asks for `identity`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import httpx
import trio

RACE_SLACK_S = 0.02  # beyond two round trips: how late a close may still be the idle-close race
INCOMPLETE_BODY = "peer closed connection without sending complete message body"
NO_RESPONSE = "server disconnected without sending a response"
RECEIVE_BYTES = 65536

Headers = list[tuple[bytes, bytes]]


class GatewayLimitError(httpx.TransportError):
    """The gateway's own resources ran out (open files, the outbound connection cap): not the peer's failure."""


class AnswerRefused(httpx.TransportError):
    """An answer the gateway will not take, though it may be valid HTTP: the peer's failure. The
    connection it came on is closed, never pooled."""


class AnswerTooLarge(AnswerRefused):
    """More bytes than the reader allows (`max_bytes`)."""


class AnswerEncoded(AnswerRefused):
    """A `Content-Encoding` other than identity: the gateway asks for identity and never decodes
    (a small compressed answer can expand a thousandfold)."""


# Running out of these is the gateway's own condition (open files, kernel buffers, memory).
OWN_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def own_resource_error(exc: BaseException) -> OSError | None:
    """The OSError in `exc`, its causes or its groups' members saying the gateway itself ran out of a
    resource (trio reports a failed connect as an OSError caused by a group of per-address ones)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in OWN_RESOURCE_ERRNOS:
            return item
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        for linked in (item.__cause__, item.__context__):
            if linked is not None:
                pending.append(linked)
    return None


def encode_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """The request line and headers; a CR or LF inside the target, a name or a value, or a colon in a
    name, is refused (no injection). Checked on the whole head at once: only the line ends written
    here may be in it."""
    lines = [method + b" " + target + b" HTTP/1.1", *[name + b": " + value for name, value in headers], b"\r\n"]
    head = b"\r\n".join(lines)
    breaks = len(lines)  # one CRLF between lines, and the blank line's
    if head.count(b"\r") != breaks or head.count(b"\n") != breaks or b":" in b"".join(n for n, _ in headers):
        bad = next((n for n, v in headers if b"\r" in n or b"\n" in n or b"\r" in v or b"\n" in v or b":" in n),
                   target)
        raise httpx.LocalProtocolError(f"{bad!r} in a request head holds a line break, or a colon in a name")
    return head


@dataclass(frozen=True, slots=True)
class Limits:
    """What one answer may make the parser hold or loop over. Beyond any of them the answer is a
    protocol error (`httpx.RemoteProtocolError`), the peer's failure. The defaults are far above what
    miners and validators send (heads of a few hundred bytes, no trailers, no informational heads)."""

    head_bytes: int = 32 * 1024  # one head: status line, headers and the blank line
    header_line_bytes: int = 8 * 1024  # one header line
    headers: int = 128  # header lines in one head (and trailer lines after a chunked body)
    chunk_line_bytes: int = 4096  # a chunk-size line, extensions included
    trailer_bytes: int = 16 * 1024  # everything after the last chunk
    informational: int = 8  # 1xx heads before the final one


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: Headers
    keep_alive: bool
    length: int | None  # Content-Length; None with chunked framing or a body that runs to the close
    chunked: bool
    content_encoding: bytes = b""  # the codings named, lower case; empty for none or identity only


@dataclass(frozen=True, slots=True)
class End:
    """The end of the body, with the trailers that followed a chunked one."""

    trailers: tuple[tuple[bytes, bytes], ...] = ()


class NeedData:
    """`ResponseParser.next_event` cannot go on before `feed` brings more bytes (or the close)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
END: Final = End()
Event = ResponseHead | bytes | End | NeedData

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00\n\r\x0b\x0c]*))?")
# One header line, after the CRLF that precedes it: a token, a colon, a value of visible characters
# (obs-text and most controls too, as h11 allows; never NUL, CR, LF, VT or FF) with optional spaces.
_FIELD = re.compile(rb"\r\n([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*"
                    rb"(?=\r\n|\Z)")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*")
_HEX = b"0123456789abcdefABCDEF"
_HTTP_PREFIX = b"HTTP/1."
MAX_LENGTH_DIGITS = 20

IDLE, HEAD, LENGTH, UNTIL_CLOSE, SIZE, DATA, DATA_END, TRAILERS, DONE, BROKEN = range(10)


def _header_lines(block: bytes, start: int, limits: Limits, what: str) -> Headers:
    """The header lines of `block` from `start` (each preceded by CRLF), every one valid and within
    the limits. Two scans in C: one match per line, one count of the lines."""
    if len(block) - start > limits.header_line_bytes and max(map(len, block[start:].split(b"\r\n"))) > \
            limits.header_line_bytes:
        raise httpx.RemoteProtocolError(f"a {what} line over {limits.header_line_bytes} bytes")
    fields: Headers = _FIELD.findall(block, start)
    lines = block.count(b"\r\n", start)
    if len(fields) != lines:
        bad = next((line for line in block[start:].split(b"\r\n")[1:] if not _FIELD.fullmatch(b"\r\n" + line)),
                   b"")
        raise httpx.RemoteProtocolError(f"{_malformed(bad)} response {what} line: {bad[:80]!r}")
    if lines > limits.headers:
        raise httpx.RemoteProtocolError(f"more than {limits.headers} {what} lines")
    return fields


def _malformed(line: bytes) -> str:
    """What is wrong with a line, for the two leniencies of other parsers refused here on purpose."""
    if b"\n" in line:
        return "bare LF (lines end in CRLF) in a"
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding in a"
    return "malformed"


def _bare_lf(buf: bytes | bytearray, floor: int, start: int) -> bool:
    """Whether an LF from `start` on lacks its CR (none before `floor` counts): a line end other
    parsers take (h11 does), refused here. Only the bytes not checked before are counted, so a head
    that arrives a byte at a time is not rescanned."""
    return buf.count(b"\n", start) != buf.count(b"\r\n", max(start - 1, floor))


def _content_length(value: bytes) -> bytes:
    """A Content-Length value as h11 takes it: digits, or a list of one value repeated."""
    if value.isdigit() and len(value) <= MAX_LENGTH_DIGITS:
        return value
    lengths = {part.strip() for part in value.split(b",")}
    if len(lengths) != 1:
        raise httpx.RemoteProtocolError("conflicting Content-Length headers")
    single = lengths.pop()
    if not single.isdigit() or len(single) > MAX_LENGTH_DIGITS:
        raise httpx.RemoteProtocolError(f"invalid Content-Length {value[:40]!r}")
    return single


def parse_head(block: bytes, *, method: bytes, limits: Limits = DEFAULT_LIMITS) -> ResponseHead:
    """A response head (without its blank line): status line, headers, and how the body is framed.

    Stricter than h11 on purpose: HTTP/1.0 and 1.1 only, CRLF line ends only, no obs-fold, no 101
    (nothing here asks for an upgrade), exactly one `Transfer-Encoding`, and it must be `chunked`."""
    eol = block.find(b"\r\n")
    status_line = block if eol < 0 else block[:eol]
    matched = _STATUS_LINE.fullmatch(status_line)
    if matched is None:
        problem = "bare LF (lines end in CRLF)" if b"\n" in status_line else "not an HTTP/1.1 status line"
        raise httpx.RemoteProtocolError(f"{problem}: {status_line[:80]!r}")
    minor, code, reason = matched.groups()
    status = int(code)
    if status < 100 or status == 101:
        raise httpx.RemoteProtocolError(f"status {status} where none was asked for")
    headers = _header_lines(block, eol, limits, "header") if eol >= 0 else []
    connection = content_length = transfer_encoding = encoding = b""
    codings = 0
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            value = _content_length(value)
            if content_length and content_length != value:
                raise httpx.RemoteProtocolError("conflicting Content-Length headers")
            content_length = value
        elif lower == b"transfer-encoding":
            codings += 1
            transfer_encoding = value
        elif lower == b"connection":
            connection += b"," + value
        elif lower == b"content-encoding":
            encoding += b"," + value
    if codings and (codings > 1 or transfer_encoding.lower() != b"chunked"):
        raise httpx.RemoteProtocolError(f"transfer coding other than chunked: {transfer_encoding[:40]!r}")
    keep_alive = minor == b"1" and not (
        connection and b"close" in {t.strip() for t in connection.lower().split(b",")})
    if encoding:
        named = [t for t in (t.strip() for t in encoding.lower().split(b",")) if t and t != b"identity"]
        encoding = b", ".join(named)
    reason = reason or b""
    if method == b"HEAD" or status in (204, 304) or status < 200:
        return ResponseHead(status, reason, headers, keep_alive, 0, False, encoding)
    if codings:
        return ResponseHead(status, reason, headers, keep_alive, None, True, encoding)
    if content_length:
        return ResponseHead(status, reason, headers, keep_alive, int(content_length), False, encoding)
    return ResponseHead(status, reason, headers, False, None, False, encoding)  # runs to the close


class ResponseParser:
    """Responses on one connection, from bytes, without I/O. `start(method)` once a request is sent,
    `feed(data)` with what arrives (`b""` for the peer's close), `next_event()` until `NEED_DATA`.

    Events, per response: one `ResponseHead` (informational 1xx heads are checked, counted and
    skipped), body pieces as `bytes` (everything the fed bytes hold, chunk framing removed: a huge
    chunk comes out as it arrives, never whole), then one `End`. Any violation, or anything beyond
    `limits`, raises `httpx.RemoteProtocolError`, and the parser stays broken.

    Received bytes not consumed yet are `_buf[_pos:]`: a fed piece is kept as it is when nothing is
    left over (the usual case), else appended to a bytearray, so however a peer cuts what it sends,
    no byte is copied more than a bounded number of times."""

    __slots__ = ("_buf", "_eof", "_informational", "_method", "_pos", "_remaining", "_scanned", "_state",
                 "limits")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scanned = 0  # bytes after _pos already searched for the end of a head or the trailers
        self._state = IDLE
        self._eof = False
        self._method = b"POST"
        self._remaining = 0  # of the Content-Length body, or of the current chunk
        self._informational = 0

    @property
    def pending(self) -> int:
        """Bytes received and not consumed: after an `End`, anything here was never asked for."""
        return len(self._buf) - self._pos

    @property
    def closed(self) -> bool:
        """Whether the peer's close has been fed."""
        return self._eof

    @property
    def end_received(self) -> bool:
        """Whether the bytes fed hold the body's end, so reading on to it needs no more (conservative:
        False when that would take parsing, e.g. trailers)."""
        state, rest = self._state, self._buf[self._pos:self._pos + 5]
        return (state == DONE or (state == LENGTH and self._remaining == 0)
                or (state == SIZE and rest == b"0\r\n\r\n") or (state == TRAILERS and rest[:2] == b"\r\n"))

    def start(self, method: bytes) -> None:
        """A request went out: what follows is its response (`HEAD`: one without a body)."""
        if self._state not in (IDLE, DONE):
            raise httpx.LocalProtocolError("the previous response is not read to its end")
        self._state, self._method, self._informational, self._scanned = HEAD, method, 0, 0

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            self._buf = data
        elif type(buf) is bytearray:
            del buf[:pos]
            buf += data
        else:
            self._buf = bytearray(buf[pos:]) + data
        self._pos = 0

    def next_event(self) -> Event:
        try:
            state = self._state
            if state >= SIZE and state <= TRAILERS:
                return self._chunked()
            if state == LENGTH:
                return self._length()
            if state == HEAD:
                return self._head()
            if state == UNTIL_CLOSE:
                return self._until_close()
        except httpx.RemoteProtocolError:
            self._state = BROKEN
            raise
        if state == BROKEN:
            raise httpx.RemoteProtocolError("the connection broke the protocol earlier")
        raise httpx.LocalProtocolError("no response expected: call start() after each request")

    def _take(self, start: int, stop: int) -> bytes:
        buf = self._buf
        self._pos = stop
        return buf[start:stop] if type(buf) is bytes else bytes(buf[start:stop])

    def _head(self) -> ResponseHead | NeedData:
        limits = self.limits
        while True:
            buf, pos = self._buf, self._pos
            end = buf.find(b"\r\n\r\n", pos + max(0, self._scanned - 3))
            if end < 0:  # refused as early as can be: a peer might otherwise hold the gateway till its timeout
                waiting = len(buf) - pos
                if waiting > limits.head_bytes:
                    raise httpx.RemoteProtocolError(f"response head over {limits.head_bytes} bytes")
                start = bytes(buf[pos:pos + len(_HTTP_PREFIX)])
                if not _HTTP_PREFIX.startswith(start):  # a TLS answer, garbage
                    raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {start!r}")
                if _bare_lf(buf, pos, pos + self._scanned):
                    raise httpx.RemoteProtocolError("bare LF (lines end in CRLF) in the response head")
                if self._eof:
                    raise httpx.RemoteProtocolError(NO_RESPONSE)
                self._scanned = waiting
                return NEED_DATA
            if end + 4 - pos > limits.head_bytes:
                raise httpx.RemoteProtocolError(f"response head over {limits.head_bytes} bytes")
            self._scanned = 0
            head = parse_head(self._take(pos, end + 4)[:-4], method=self._method, limits=limits)
            if head.status >= 200:
                if head.chunked:
                    self._state = SIZE
                elif head.length is None:
                    self._state = UNTIL_CLOSE
                else:
                    self._state, self._remaining = LENGTH, head.length
                return head
            self._informational += 1
            if self._informational > limits.informational:
                raise httpx.RemoteProtocolError(f"more than {limits.informational} informational responses")

    def _length(self) -> bytes | End | NeedData:
        remaining = self._remaining
        if not remaining:
            self._state = DONE
            return END
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if not available:
            if self._eof:
                raise httpx.RemoteProtocolError(INCOMPLETE_BODY)
            return NEED_DATA
        if available > remaining:
            available = remaining
        self._remaining = remaining - available
        return self._take(pos, pos + available)

    def _until_close(self) -> bytes | End | NeedData:
        if self._pos < len(self._buf):
            return self._take(self._pos, len(self._buf))
        if self._eof:
            self._state = DONE
            return END
        return NEED_DATA

    def _chunked(self) -> bytes | End | NeedData:
        """Chunked framing removed: the data of every chunk the buffer holds, as one piece."""
        buf, pos, end = self._buf, self._pos, len(self._buf)
        state, remaining = self._state, self._remaining
        parts: list[bytes | bytearray] = []
        while True:
            if state == DATA:
                if pos == end:
                    break
                stop = pos + remaining
                if stop <= end:
                    parts.append(buf[pos:stop])
                    pos, state = stop, DATA_END
                else:
                    parts.append(buf[pos:])
                    remaining -= end - pos
                    pos = end
                    break
            elif state == SIZE:
                eol = buf.find(b"\r\n", pos, pos + self.limits.chunk_line_bytes + 2)
                if eol < 0:
                    if end - pos >= self.limits.chunk_line_bytes + 2:
                        raise httpx.RemoteProtocolError("chunk size line too long")
                    break
                text = buf[pos:eol]
                if 0 < len(text) <= MAX_LENGTH_DIGITS and not text.strip(_HEX):
                    remaining = int(text, 16)
                else:  # extensions, trailing spaces, or not a size at all
                    matched = _CHUNK_LINE.fullmatch(text)
                    if matched is None:
                        raise httpx.RemoteProtocolError(f"invalid chunk size {bytes(text[:20])!r}")
                    remaining = int(matched.group(1), 16)
                pos = eol + 2
                state = DATA if remaining else TRAILERS
            elif state == DATA_END:
                if end - pos < 2:
                    if pos < end and buf[pos] != 13:
                        raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                    break
                if buf[pos] != 13 or buf[pos + 1] != 10:
                    raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = SIZE
            else:  # TRAILERS: the data before them goes out first
                if parts:
                    break
                self._pos, self._state = pos, state
                return self._trailers()
        self._pos, self._state, self._remaining = pos, state, remaining
        if parts:
            return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
        if self._eof:
            raise httpx.RemoteProtocolError(INCOMPLETE_BODY)
        return NEED_DATA

    def _trailers(self) -> End | NeedData:
        buf, pos, limits = self._buf, self._pos, self.limits
        available = len(buf) - pos
        if available >= 2 and buf[pos] == 13 and buf[pos + 1] == 10:
            self._pos, self._state = pos + 2, DONE
            return END
        end = buf.find(b"\r\n\r\n", pos + max(0, self._scanned - 3))
        if end < 0:
            if available > limits.trailer_bytes:
                raise httpx.RemoteProtocolError(f"trailers over {limits.trailer_bytes} bytes")
            if _bare_lf(buf, pos, pos + self._scanned):
                raise httpx.RemoteProtocolError("bare LF (lines end in CRLF) in the trailers")
            if self._eof:
                raise httpx.RemoteProtocolError(INCOMPLETE_BODY)
            self._scanned = available
            return NEED_DATA
        if end + 4 - pos > limits.trailer_bytes:
            raise httpx.RemoteProtocolError(f"trailers over {limits.trailer_bytes} bytes")
        self._scanned = 0
        block = b"\r\n" + self._take(pos, end + 4)[:-4]
        trailers = _header_lines(block, 0, limits, "trailer")
        if any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in trailers):
            raise httpx.RemoteProtocolError("framing headers among the trailers")
        self._state = DONE
        return End(tuple(trailers))


def send_now(stream: trio.SocketStream, data: bytes | bytearray | memoryview) -> int:
    """How much of `data` the kernel took at once: written without waiting and without a trip
    through trio's scheduler (`SocketStream.send_all` takes one per write, and its wrappers cost more
    than the write). 0 when the socket's buffer is full, or the socket is closed or shut for writing:
    the caller's `send_all` then sends the rest, waiting as trio waits and raising what trio raises."""
    sock = stream.socket
    fd = sock.fileno()
    if fd < 0 or sock.did_shutdown_SHUT_WR:
        return 0
    try:
        return os.write(fd, data)
    except OSError:  # a full buffer (BlockingIOError), or a broken connection: trio's send_all says which
        return 0


async def send_all(stream: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
    """`stream.send_all(data)`, the part the kernel takes at once written directly (`send_now`). A task
    already cancelled sends nothing, as with trio's (without a trip through the scheduler otherwise)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    sent = send_now(stream, data)
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])


async def receive_some(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """`stream.receive_some(max_bytes)`, without trio's layers around the socket (and the exception of a
    first read that would block): what the kernel holds is read at once, else the task waits until the
    socket is readable and reads then. Either way a checkpoint, as trio's: a read that needed no wait
    yields to the scheduler once it has its bytes, so a peer whose answer is all there already (a
    large one, sent at once) is read a piece at a time between the other tasks, not in one go. An
    empty result is the peer's close; a broken connection raises its OSError, a stream closed
    meanwhile `trio.ClosedResourceError`, a cancelled task `trio.Cancelled` (before anything is read)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = stream.socket
    waited = False
    while True:
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection is closed")
        try:
            data = os.read(fd, max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            waited = True
            continue
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data


def within(timeout_s: float | None) -> contextlib.AbstractContextManager[object]:
    """`trio.fail_after(timeout_s)`; None: no limit, and no cancel scope (the caller bounds the whole
    exchange; a scope per read costs as much as the read's parsing)."""
    return contextlib.nullcontext() if timeout_s is None else trio.fail_after(timeout_s)


class Connection:
    """A kept HTTP/1.1 connection: the I/O around a `ResponseParser`. One request at a time;
    `reusable` once a response ended cleanly. `on_close` runs once, however it is closed."""

    def __init__(self, stream: trio.SocketStream, connect_s: float = 0.0, *, limits: Limits = DEFAULT_LIMITS,
                 on_close: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.connect_s = connect_s  # how long the TCP handshake took: about one round trip
        self.reusable = False
        self.idle_since = trio.current_time()
        self.sent_at = 0.0
        self.requests = 0
        self.answered = False  # whether the current request has had a byte of answer
        self.received = 0  # bytes received for the current request, head and framing included
        self.parser = ResponseParser(limits)
        self._on_close = on_close

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float | None, *, limits: Limits = DEFAULT_LIMITS,
                   on_close: Callable[[], None] | None = None) -> Connection:
        """Connect. Running out of the gateway's own resources (open files, buffers, memory) is a
        `GatewayLimitError`, not a `ConnectError`: it says nothing about the peer."""
        started = trio.current_time()
        try:
            with within(timeout_s):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within {timeout_s}s") from None
        except OSError as exc:
            own = own_resource_error(exc)
            if own is not None:
                raise GatewayLimitError(f"cannot connect to {host}:{port}: the gateway is out of "
                                        f"{errno.errorcode.get(own.errno or 0, 'resources')}: "
                                        f"{own.strerror or own}") from exc
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
        return cls(stream, trio.current_time() - started, limits=limits, on_close=on_close)

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
        self.received = 0
        self.requests += 1
        try:
            with within(timeout_s):
                await send_all(self.stream, head + body)
        except trio.TooSlowError:
            raise httpx.WriteTimeout(f"request not sent within {timeout_s}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"connection broke while sending: {exc}") from exc
        finally:
            self.sent_at = trio.current_time()

    async def _receive(self, timeout_s: float | None) -> bytes:
        try:
            with within(timeout_s):
                data = await receive_some(self.stream, RECEIVE_BYTES)
        except trio.TooSlowError:
            raise httpx.ReadTimeout(f"nothing received within {timeout_s}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"connection broke while reading: {exc}") from exc
        self.received += len(data)
        return data

    async def receive_head(self, method: bytes, timeout_s: float | None) -> ResponseHead:
        """The final response head (informational 1xx ones are skipped, at most `Limits.informational`)."""
        parser = self.parser
        parser.start(method)
        while (event := parser.next_event()) is NEED_DATA:
            data = await self._receive(timeout_s)
            if data:
                self.answered = True
            parser.feed(data)
        assert type(event) is ResponseHead
        return event

    async def body(self, head: ResponseHead, timeout_s: float | None) -> AsyncGenerator[bytes, None]:
        """The body's bytes as they arrive, one piece per read (never more than a read brought, so
        nothing is held on the caller's behalf); at its clean end the connection becomes reusable."""
        parser = self.parser
        while True:
            event = parser.next_event()
            if type(event) is bytes:
                yield event
            elif event is NEED_DATA:
                parser.feed(await self._receive(timeout_s))
            else:
                break
        self.reusable = head.keep_alive and not parser.pending and not parser.closed
        self.idle_since = trio.current_time()

    def close_now(self) -> None:
        """Close without waiting: for idle connections (nothing to flush)."""
        self.reusable = False
        self.stream.socket.close()
        self._closed()

    async def aclose(self) -> None:
        self.reusable = False
        try:
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, OSError):
                await self.stream.aclose()  # gone either way
        finally:
            self._closed()

    def _closed(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def timeouts(extensions: Mapping[str, object]) -> dict[str, float | None]:
    """httpx's per-request timeouts (`connect`, `read`, `write`, `pool`) from a request's extensions."""
    given = extensions.get("timeout")
    if isinstance(given, Mapping):
        return {k: (float(v) if isinstance(v, int | float) else None) for k, v in given.items()}
    return {}
