"""KeepAliveTransport: the outbound connection pool, with O(1) work per request.

Each origin keeps a stack of idle HTTP/1.1 connections (`wire/http1.py`); a request pops the most
recently used one (checking only that one: not expired, not closed by the server), and a response,
once its body is read to the end and closed, pushes its connection back. httpx's default pool
(httpcore's) re-examined every pooled connection on every request and response, and its h11 parser
cost more CPU than the rest of a miner request; both showed in profiles of the gateway.

Plain `http://` with a bytes body only (miners and validators); anything else goes through httpx's
own transport.

Peers are untrusted, so what they answer is bounded here whatever the caller does: every request
asks for `Accept-Encoding: identity` and an answer in any other `Content-Encoding` is refused
(`AnswerEncoded`), nothing is ever decoded; an answer read whole stops at `max_bytes`
(`AnswerTooLarge`, default `MAX_ANSWER_BYTES`); streamed pieces are never more than one read. The
open connections (idle and in use, every origin) are capped (`max_connections`): at the cap the
gateway's own limit is a `GatewayLimitError`, which callers do not count against the peer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Protocol

import httpx
import trio

from wire.http1 import (
    AnswerEncoded,
    AnswerTooLarge,
    Connection,
    GatewayLimitError,
    Headers,
    ResponseHead,
    encode_head,
    own_resource_error,
    timeouts,
)

log = logging.getLogger("sn1_gateway.pool")

Origin = tuple[str, int]
USER_AGENT = "sn1-gateway"
USER_AGENT_BYTES = USER_AGENT.encode()
IDENTITY = (b"Accept-Encoding", b"identity")
MAX_ANSWER_BYTES = 1 << 20  # what an answer read whole may hold unless the reader says otherwise
DEFAULT_MAX_CONNECTIONS = 8192  # `fanout.max_connections` documents the choice


class ParsedUrls:
    """Parsed URLs by their text, for the few endpoints asked again and again (miners, validators):
    parsing one costs as much as the rest of building a request. Bounded: cleared when full."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._parsed: dict[str, httpx.URL] = {}

    def __call__(self, text: str) -> httpx.URL:
        url = self._parsed.get(text)
        if url is None:
            if len(self._parsed) >= self.limit:
                self._parsed.clear()
            url = self._parsed[text] = httpx.URL(text)
        return url


class StreamedResponse(Protocol):
    """What callers of `post_streaming` read: the status, then the body as it comes (pieces of at most
    one read each: a caller that streams counts the bytes itself) or whole, at most `max_bytes`
    (more raises `AnswerTooLarge` and closes the connection). Never decoded."""

    @property
    def status_code(self) -> int: ...

    @property
    def wire_bytes(self) -> int:
        """The bytes the peer has sent of this answer so far, framing included: what its bounds count
        (one byte of data a chunk, with 4 KiB of chunk extensions, is 4 KiB read)."""
        ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    @property
    def end_received(self) -> bool:
        """Whether the rest of the body, up to its end, has arrived already (reading it takes no wait);
        False when that is not known."""
        ...

    async def aread(self, max_bytes: int = MAX_ANSWER_BYTES) -> bytes: ...


async def read_within(pieces: AsyncIterator[bytes], max_bytes: int, declared: int | None) -> bytes:
    """Every piece joined, refused as soon as they go over `max_bytes` (before a byte is read when
    the declared Content-Length already does)."""
    if declared is not None and declared > max_bytes:
        raise AnswerTooLarge(f"answer of {declared} bytes, over the {max_bytes} allowed")
    parts: list[bytes] = []
    size = 0
    async for part in pieces:
        size += len(part)
        if size > max_bytes:
            raise AnswerTooLarge(f"answer over the {max_bytes} bytes allowed")
        parts.append(part)
    return b"".join(parts)


def refuse_encoding(headers: httpx.Headers) -> None:
    """An answer in a Content-Encoding other than identity is refused, never decoded."""
    named = [t for t in (t.strip().lower() for t in headers.get("content-encoding", "").split(",")) if t]
    if any(t != "identity" for t in named):
        raise AnswerEncoded(f"answer in Content-Encoding {', '.join(named)[:40]!r}; identity was asked for")


class PlainResponse:
    """An httpx response from another transport (tests, `https://`), read as a pooled one is: the
    raw stream (httpx's `aiter_bytes` would decode gzip and deflate), bounded by `max_bytes`."""

    __slots__ = ("_response", "end_received", "status_code", "wire_bytes")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.wire_bytes = 0  # what the transport passed on (it hides any framing)
        self.end_received = False  # not known through another transport

    async def aiter_bytes(self) -> AsyncGenerator[bytes, None]:
        stream = self._response.stream
        if not isinstance(stream, httpx.AsyncByteStream):
            raise TypeError("an async transport answered with a sync stream")
        async for part in stream:
            self.wire_bytes += len(part)
            yield part

    async def aread(self, max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
        length = self._response.headers.get("content-length", "")
        declared = int(length) if length.isdigit() and len(length) <= 20 else None
        async with aclosing(self.aiter_bytes()) as pieces:
            return await read_within(pieces, max_bytes, declared)

    async def aclose(self) -> None:
        await self._response.aclose()


def post_streaming(http: httpx.AsyncClient, url: httpx.URL, body: bytes, headers: Mapping[str, str],
                   *, bounded: bool = False) -> AbstractAsyncContextManager[StreamedResponse]:
    """`http.stream("POST", url, ...)` for the gateway's own traffic, with the client's timeouts.

    On the gateway's pool (`KeepAliveTransport`) the request goes straight to a pooled connection:
    no httpx request or response objects, none of the client's per-request layers (cookies, auth,
    redirects, event hooks, default headers), which in profiles cost as much as the connection
    itself. Any other transport (tests, `https://`) gets an ordinary httpx request.

    `bounded`: the caller puts a deadline on the whole exchange, so reads and writes need none of
    their own (one cancel scope per read showed in profiles too); connecting keeps its timeout.

    Either way the request asks for `Accept-Encoding: identity`, an encoded answer is refused
    (`AnswerEncoded`), nothing is decoded, and `aread` is bounded (`MAX_ANSWER_BYTES` by default)."""
    return _Post(http, url, body, headers, bounded)


class _Post:
    """One `post_streaming` exchange, as a plain async context manager: a generator-based one cost a
    tenth of a miner exchange in the gateway's profile (several per request)."""

    __slots__ = ("_answer", "_body", "_bounded", "_headers", "_http", "_pooled", "_url")

    def __init__(self, http: httpx.AsyncClient, url: httpx.URL, body: bytes, headers: Mapping[str, str],
                 bounded: bool) -> None:
        self._http, self._url, self._body, self._headers, self._bounded = http, url, body, headers, bounded
        self._pooled: PooledResponse | None = None
        self._answer: httpx.Response | None = None

    async def __aenter__(self) -> StreamedResponse:
        http, url, body, headers = self._http, self._url, self._body, self._headers
        timeout = http.timeout.as_dict()
        if self._bounded:
            timeout = {**timeout, "read": None, "write": None}
        transport = http._transport_for_url(url)  # httpx has no public accessor for it
        if isinstance(transport, KeepAliveTransport) and url.scheme == "http":
            fields = [(b"Host", url.netloc), (b"User-Agent", USER_AGENT_BYTES),
                      (b"Content-Length", str(len(body)).encode()), IDENTITY]
            fields += [(name.encode(), value.encode()) for name, value in headers.items()]
            self._pooled = await transport.exchange(url, b"POST", fields, body, timeout)
            return self._pooled
        request = httpx.Request("POST", url, content=body,
                                headers={"User-Agent": USER_AGENT, **headers, "Accept-Encoding": "identity"},
                                extensions={"timeout": timeout})
        try:
            answer = await transport.handle_async_request(request)
        except httpx.ConnectError as exc:
            if own_resource_error(exc) is None:
                raise
            raise GatewayLimitError(f"cannot connect to {url.host}: the gateway is out of resources: {exc}") from exc
        answer.request = request
        try:
            refuse_encoding(answer.headers)
        except BaseException:
            await answer.aclose()
            raise
        self._answer = answer
        return PlainResponse(answer)

    async def __aexit__(self, *_: object) -> None:
        if self._pooled is not None:
            await self._pooled.aclose()
        elif self._answer is not None:
            await self._answer.aclose()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """The pool. At most `max_connections` connections are open at once, idle and in use together,
    over every origin (each holds a file descriptor and buffers; without a cap, a burst of slow
    miners could take every open file the process has, inbound clients' included).

    At the cap a new connection first takes the place of the idle one unused longest (of any
    origin); when none is idle, the request fails at once with `GatewayLimitError` rather than wait
    for a slot. Waiting would buy little and cost much: a slot frees only when some exchange ends,
    and miners' answers last seconds, so a waiter would spend its client's first-token budget on a
    miner it may never reach, while the rest of its fan-out goes on without it; the waiters would
    be one more queue to bound; and overload would show as latency instead of as a count. The cap
    is sized far above a normal load (`fanout.max_connections`), so reaching it means overload,
    where shedding at once is the answer, and callers do not count it against the peer."""

    name = "outbound"  # as it reports on /health/ready

    def __init__(self, *, keepalive_expiry_s: float = 60.0, max_idle_per_origin: int = 256,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.keepalive_expiry_s = keepalive_expiry_s
        self.max_idle_per_origin = max_idle_per_origin
        self.max_connections = max_connections
        self._idle: dict[Origin, list[Connection]] = {}
        self._other = httpx.AsyncHTTPTransport(trust_env=False)
        self._next_sweep = 0.0
        self._connections = 0  # connections open or being opened, idle and in use
        self.opened = 0  # connections made so far
        self.reused = 0  # requests sent on a kept connection
        self.refused_at_cap = 0  # requests refused with every connection in use
        self.replaced_at_cap = 0  # idle connections closed at the cap to make room
        warn_if_open_files_below(max_connections)

    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    def open_count(self) -> int:
        """Connections open (or opening), idle and in use."""
        return self._connections

    def health(self) -> dict[str, int]:
        return {"open": self._connections, "idle": self.idle_count(), "max_connections": self.max_connections,
                "opened": self.opened, "reused": self.reused, "refused_at_cap": self.refused_at_cap,
                "replaced_at_cap": self.replaced_at_cap}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http" or not isinstance(request.stream, httpx.ByteStream):
            request.headers["Accept-Encoding"] = "identity"
            answer = await self._other.handle_async_request(request)
            try:
                refuse_encoding(answer.headers)
            except AnswerEncoded:
                await answer.aclose()
                raise
            return answer
        headers = [(n, v) for n, v in request.headers.raw if n.lower() != b"accept-encoding"]
        headers.append(IDENTITY)
        pooled = await self.exchange(url, request.method.encode(), headers, request.content,
                                     timeouts(request.extensions))
        return httpx.Response(
            status_code=pooled.status_code,
            headers=pooled.head.headers,
            stream=pooled,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": pooled.head.reason},
        )

    async def exchange(self, url: httpx.URL, method: bytes, headers: Headers, body: bytes,
                       limits: Mapping[str, float | None]) -> PooledResponse:
        """Send one request on a pooled (or new) connection and read the response head. `headers` are
        sent as they are (Host, Content-Length and Accept-Encoding included); `limits` are httpx's
        timeout names. An answer in a Content-Encoding other than identity is refused here."""
        origin = (url.host, url.port or 80)
        head = encode_head(method, url.raw_path, headers)
        connection = self._take(origin)
        fresh = connection is None
        if connection is None:
            connection = await self._open(origin, limits.get("connect"))
        try:
            try:
                await connection.send(head, body, limits.get("write"))
                response_head = await connection.receive_head(method, limits.get("read"))
            except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
                if fresh or not connection.closed_on_arrival():
                    raise
                # A kept connection the server closed as the request went out: once more, on a new one.
                await connection.aclose()
                connection = await self._open(origin, limits.get("connect"))
                await connection.send(head, body, limits.get("write"))
                response_head = await connection.receive_head(method, limits.get("read"))
            if response_head.content_encoding:
                raise AnswerEncoded(f"answer in Content-Encoding {response_head.content_encoding[:40]!r}; "
                                    "identity was asked for")
        except BaseException:
            await connection.aclose()
            raise
        return PooledResponse(self, origin, connection, response_head, limits.get("read"))

    def _take(self, origin: Origin) -> Connection | None:
        stack = self._idle.get(origin)
        now = trio.current_time()
        while stack:
            connection = stack.pop()
            if connection.usable(now, self.keepalive_expiry_s):
                self.reused += 1
                return connection
            connection.close_now()  # idle, expired or closed by the server: nothing to flush
        return None

    async def _open(self, origin: Origin, timeout_s: float | None) -> Connection:
        if self._connections >= self.max_connections and not self._replace_idle():
            self.refused_at_cap += 1
            raise GatewayLimitError(f"{self.max_connections} outbound connections open, all in use "
                                    "(fanout.max_connections)")
        self._connections += 1
        self.opened += 1
        try:
            return await Connection.open(origin[0], origin[1], timeout_s, on_close=self._closed_one)
        except BaseException:
            self._connections -= 1  # no connection was made
            raise

    def _closed_one(self) -> None:
        self._connections -= 1

    def _replace_idle(self) -> bool:
        """At the cap: close the idle connection unused longest, of any origin (O(origins), and only
        at the cap). False when none is idle."""
        stacks = [stack for stack in self._idle.values() if stack]
        if not stacks:
            return False
        min(stacks, key=lambda stack: stack[0].idle_since).pop(0).close_now()
        self.replaced_at_cap += 1
        return True

    async def _release(self, origin: Origin, connection: Connection) -> None:
        """A response was closed: keep its connection if it ended cleanly, else close it."""
        now = trio.current_time()
        if now >= self._next_sweep:
            self._sweep(now)
        stack = self._idle.setdefault(origin, [])
        if connection.reusable and len(stack) < self.max_idle_per_origin:
            stack.append(connection)
        else:
            await connection.aclose()

    def _sweep(self, now: float) -> None:
        """Close idle connections that expired or that their server closed, for every origin (also
        those no request goes to any more), oldest first: at most every quarter of the expiry."""
        self._next_sweep = now + self.keepalive_expiry_s / 4
        for origin in list(self._idle):
            stack = self._idle[origin]
            while stack and not stack[0].usable(now, self.keepalive_expiry_s):
                stack.pop(0).close_now()
            if not stack:
                del self._idle[origin]

    async def aclose(self) -> None:
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for connection in stack:
                await connection.aclose()
        await self._other.aclose()


def warn_if_open_files_below(max_connections: int) -> None:
    """Say so at start when the process may open fewer files than the cap allows connections
    (`sn1-gateway serve` lifts the soft limit to the hard one first): beyond the limit, connecting
    fails with `GatewayLimitError` (EMFILE) before the cap is reached."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections:
        log.warning("the open-files limit (%d) is below fanout.max_connections (%d): outbound connections "
                    "beyond it fail as the gateway's own limit", soft, max_connections)


class PooledResponse(httpx.AsyncByteStream):
    """A response on a pooled connection: its head, and its body (also as an httpx response's stream,
    bounded by `MAX_ANSWER_BYTES` there: httpx reads a whole answer on `.post()`). Closing it hands
    the connection back to the pool when it can be reused."""

    __slots__ = ("_closed", "_connection", "_origin", "_read_timeout_s", "_transport", "head", "status_code")

    def __init__(self, transport: KeepAliveTransport, origin: Origin, connection: Connection,
                 head: ResponseHead, read_timeout_s: float | None) -> None:
        self._transport = transport
        self._origin = origin
        self._connection = connection
        self.head = head
        self.status_code = head.status
        self._read_timeout_s = read_timeout_s
        self._closed = False

    @property
    def wire_bytes(self) -> int:
        return self._connection.received

    @property
    def end_received(self) -> bool:
        return self._connection.parser.end_received

    def aiter_bytes(self) -> AsyncGenerator[bytes, None]:
        return self._connection.body(self.head, self._read_timeout_s)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async with aclosing(self.aiter_bytes()) as pieces:
            async for part in pieces:
                size += len(part)
                if size > MAX_ANSWER_BYTES:
                    self._connection.reusable = False
                    raise AnswerTooLarge(f"answer over the {MAX_ANSWER_BYTES} bytes allowed")
                yield part

    async def aread(self, max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
        """The whole body, at most `max_bytes`; more raises `AnswerTooLarge`, and the connection is
        closed (its unread rest would otherwise be the next answer's start)."""
        try:
            async with aclosing(self.aiter_bytes()) as pieces:
                return await read_within(pieces, max_bytes, self.head.length)
        except AnswerTooLarge:
            self._connection.reusable = False
            raise

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._transport._release(self._origin, self._connection)
