"""KeepAliveTransport: the outbound connection pool, with O(1) work per request.

Each origin keeps a stack of idle HTTP/1.1 connections (`engine/http1.py`); a request pops the most
recently used one (checking only that one: not expired, not closed by the server), and a response,
once its body is read to the end and closed, pushes its connection back. httpx's default pool
(httpcore's) re-examined every pooled connection on every request and response, and its h11 parser
cost more CPU than the rest of a miner request; both showed in profiles of the gateway.

Plain `http://` with a bytes body only (miners and validators); anything else goes through httpx's
own transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Protocol

import httpx
import trio

from engine.http1 import Connection, Headers, ResponseHead, encode_head, timeouts

Origin = tuple[str, int]
USER_AGENT = "sn1-gateway"
USER_AGENT_BYTES = USER_AGENT.encode()


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
    """What callers of `post_streaming` read: the status, then the body as it comes or whole."""

    @property
    def status_code(self) -> int: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...


@asynccontextmanager
async def post_streaming(http: httpx.AsyncClient, url: httpx.URL, body: bytes, headers: Mapping[str, str],
                         *, bounded: bool = False) -> AsyncIterator[StreamedResponse]:
    """`http.stream("POST", url, ...)` for the gateway's own traffic, with the client's timeouts.

    On the gateway's pool (`KeepAliveTransport`) the request goes straight to a pooled connection:
    no httpx request or response objects, none of the client's per-request layers (cookies, auth,
    redirects, event hooks, default headers), which in profiles cost as much as the connection
    itself. Any other transport (tests, `https://`) gets an ordinary httpx request.

    `bounded`: the caller puts a deadline on the whole exchange, so reads and writes need none of
    their own (one cancel scope per read showed in profiles too); connecting keeps its timeout."""
    timeout = http.timeout.as_dict()
    if bounded:
        timeout = {**timeout, "read": None, "write": None}
    transport = http._transport_for_url(url)  # httpx has no public accessor for it
    if isinstance(transport, KeepAliveTransport) and url.scheme == "http":
        fields = [(b"Host", url.netloc), (b"User-Agent", USER_AGENT_BYTES),
                  (b"Content-Length", str(len(body)).encode())]
        fields += [(name.encode(), value.encode()) for name, value in headers.items()]
        pooled = await transport.exchange(url, b"POST", fields, body, timeout)
        try:
            yield pooled
        finally:
            await pooled.aclose()
        return
    request = httpx.Request("POST", url, content=body, headers={"User-Agent": USER_AGENT, **headers},
                            extensions={"timeout": timeout})
    plain = await transport.handle_async_request(request)
    plain.request = request
    try:
        yield plain
    finally:
        await plain.aclose()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, keepalive_expiry_s: float = 60.0, max_idle_per_origin: int = 256) -> None:
        self.keepalive_expiry_s = keepalive_expiry_s
        self.max_idle_per_origin = max_idle_per_origin
        self._idle: dict[Origin, list[Connection]] = {}
        self._other = httpx.AsyncHTTPTransport(trust_env=False)
        self._next_sweep = 0.0
        self.opened = 0  # connections made so far
        self.reused = 0  # requests sent on a kept connection

    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http" or not isinstance(request.stream, httpx.ByteStream):
            return await self._other.handle_async_request(request)
        pooled = await self.exchange(url, request.method.encode(), request.headers.raw, request.content,
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
        sent as they are (Host and Content-Length included); `limits` are httpx's timeout names."""
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
            connection.stream.socket.close()  # idle, expired or closed by the server: nothing to flush
        return None

    async def _open(self, origin: Origin, timeout_s: float | None) -> Connection:
        self.opened += 1
        return await Connection.open(origin[0], origin[1], timeout_s)

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
                stack.pop(0).stream.socket.close()
            if not stack:
                del self._idle[origin]

    async def aclose(self) -> None:
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for connection in stack:
                await connection.aclose()
        await self._other.aclose()


class PooledResponse(httpx.AsyncByteStream):
    """A response on a pooled connection: its head, and its body (also as an httpx response's stream).
    Closing it hands the connection back to the pool when it can be reused."""

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

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._connection.body(self.head, self._read_timeout_s)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.aiter_bytes():
            yield part

    async def aread(self) -> bytes:
        return b"".join([part async for part in self.aiter_bytes()])

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._transport._release(self._origin, self._connection)
