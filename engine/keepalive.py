"""KeepAliveTransport: the outbound connection pool, with O(1) work per request.

httpx's default pool (httpcore's) re-examines every pooled connection on every request and on every
response close, with a readability syscall per idle connection and a count of idle connections per
idle connection (quadratic). With a kept connection per concurrent miner stream, that scan cost more
than opening a new connection per request. Here each origin keeps a stack of idle HTTP/1.1
connections; a request pops the most recently used one (checking only that one), and a response, once
closed, pushes its connection back if it can be reused. Plain `http://` only (miners and
validators); other schemes go through httpx's own transport.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpcore
import httpx
import trio

# httpcore's errors and the httpx ones callers catch, most specific first.
_ERRORS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)

Origin = tuple[bytes, int]


@contextlib.contextmanager
def httpx_errors() -> Iterator[None]:
    """httpcore's exceptions become the httpx ones callers catch."""
    try:
        yield
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
            httpcore.UnsupportedProtocol) as exc:
        for source, target in _ERRORS:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class KeepAliveTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, keepalive_expiry_s: float = 60.0, max_idle_per_origin: int = 256) -> None:
        self.keepalive_expiry_s = keepalive_expiry_s
        self.max_idle_per_origin = max_idle_per_origin
        self._idle: dict[Origin, list[httpcore.AsyncHTTPConnection]] = {}
        self._other = httpx.AsyncHTTPTransport(trust_env=False)
        self.opened = 0  # connections made so far
        self.reused = 0  # requests sent on a kept connection

    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            return await self._other.handle_async_request(request)
        port = url.port or 80
        origin = (url.raw_host, port)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        connection = await self._take(origin)
        try:
            with httpx_errors():
                try:
                    response = await connection.handle_async_request(core_request)
                except httpcore.ConnectionNotAvailable:
                    # the server closed it between our check and our request: once more, on a new one
                    await _close_quietly(connection)
                    connection = self._new(origin)
                    response = await connection.handle_async_request(core_request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await _close_quietly(connection)
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_PooledStream(self, origin, connection, response.stream),
            extensions=response.extensions,
        )

    async def _take(self, origin: Origin) -> httpcore.AsyncHTTPConnection:
        stack = self._idle.get(origin)
        while stack:
            connection = stack.pop()
            if connection.is_idle() and not connection.has_expired():
                self.reused += 1
                return connection
            await _close_quietly(connection)
        return self._new(origin)

    def _new(self, origin: Origin) -> httpcore.AsyncHTTPConnection:
        self.opened += 1
        host, port = origin
        return httpcore.AsyncHTTPConnection(
            origin=httpcore.Origin(b"http", host, port), keepalive_expiry=self.keepalive_expiry_s,
        )

    async def _release(self, origin: Origin, connection: httpcore.AsyncHTTPConnection) -> None:
        """A response was closed: keep its connection if it ended cleanly (httpcore closed it otherwise)."""
        if not connection.is_idle():
            return
        stack = self._idle.setdefault(origin, [])
        if len(stack) < self.max_idle_per_origin:
            stack.append(connection)
            return
        with trio.CancelScope(shield=True):
            await _close_quietly(connection)

    async def aclose(self) -> None:
        stacks, self._idle = self._idle, {}
        with trio.CancelScope(shield=True):
            for stack in stacks.values():
                for connection in stack:
                    await _close_quietly(connection)
        await self._other.aclose()


class _PooledStream(httpx.AsyncByteStream):
    """A response body; closing it hands the connection back to the pool when it can be reused."""

    def __init__(self, transport: KeepAliveTransport, origin: Origin, connection: httpcore.AsyncHTTPConnection,
                 stream: Any) -> None:
        self._transport = transport
        self._origin = origin
        self._connection = connection
        self._stream = stream
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with httpx_errors():
                await self._stream.aclose()
        finally:
            await self._transport._release(self._origin, self._connection)


async def _close_quietly(connection: httpcore.AsyncHTTPConnection) -> None:
    with contextlib.suppress(httpcore.NetworkError, OSError):
        await connection.aclose()  # the connection is gone either way
