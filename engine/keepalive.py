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

import httpx
import trio

from engine.http1 import Connection, ResponseHead, encode_head, timeouts

Origin = tuple[str, int]
USER_AGENT = "sn1-gateway"


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


@asynccontextmanager
async def post_streaming(http: httpx.AsyncClient, url: httpx.URL | str, body: bytes, headers: Mapping[str, str],
                         *, bounded: bool = False) -> AsyncIterator[httpx.Response]:
    """`http.stream("POST", url, ...)` for the gateway's own traffic, sent straight to the client's
    transport with the client's timeouts. The client's per-request layers (cookies, auth, redirects,
    event hooks, base URL and default headers) are never used by this traffic, and in profiles they
    cost as much as the connection itself.

    `bounded`: the caller puts a deadline on the whole exchange, so reads and writes need none of
    their own (one cancel scope per read showed in profiles too); connecting keeps its timeout."""
    timeout = http.timeout.as_dict()
    if bounded:
        timeout = {**timeout, "read": None, "write": None}
    request = httpx.Request("POST", url, content=body, headers={"User-Agent": USER_AGENT, **headers},
                            extensions={"timeout": timeout})
    transport = http._transport_for_url(request.url)  # httpx has no public accessor for it
    response = await transport.handle_async_request(request)
    response.request = request
    try:
        yield response
    finally:
        await response.aclose()


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
        origin = (url.host, url.port or 80)
        limits = timeouts(request.extensions)
        method = request.method.encode()
        head = encode_head(method, url.raw_path, request.headers.raw)
        body = request.content
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
        return httpx.Response(
            status_code=response_head.status,
            headers=response_head.headers,
            stream=_PooledBody(self, origin, connection, response_head, limits.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response_head.reason},
        )

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


class _PooledBody(httpx.AsyncByteStream):
    """A response body; closing it hands the connection back to the pool when it can be reused."""

    def __init__(self, transport: KeepAliveTransport, origin: Origin, connection: Connection,
                 head: ResponseHead, read_timeout_s: float | None) -> None:
        self._transport = transport
        self._origin = origin
        self._connection = connection
        self._head = head
        self._read_timeout_s = read_timeout_s
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._connection.body(self._head, self._read_timeout_s):
            yield part

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._transport._release(self._origin, self._connection)
