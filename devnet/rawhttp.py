"""A minimal HTTP/1.1 keep-alive server on trio sockets, for simulated peers that must cost next to nothing.

The benchmark measures the gateway; miners and a validator served by Quart-Trio on Hypercorn cost
about as much per exchange as the gateway itself, so on a small machine they, not the gateway, set
the pace. This server frames only what the gateway sends (a request head, a `Content-Length` body)
and answers either whole (`Content-Length`) or streamed (chunked). Every read is bounded: the head in
size, the body in size, and an idle connection in time.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("sn1_gateway.devnet.raw")

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
IDLE_TIMEOUT_S = 75.0
READ_SIZE = 65536
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large",
           422: "Unprocessable Entity", 500: "Internal Server Error"}


class BadRequest(Exception):
    """The peer's bytes are not a request this server frames; the connection is closed."""


class StreamStopped(Exception):
    """Raised by a handler to drop the connection mid-answer (no terminating chunk)."""


@dataclass(frozen=True, slots=True)
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


class Responder:
    """How a handler answers: `send` a whole body, or `start` a chunked stream, `chunk` pieces, `end`."""

    __slots__ = ("_connection", "finished", "started")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.started = False
        self.finished = False

    async def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        self.started = self.finished = True
        await self._connection.stream.send_all(head + body)

    async def start(self, status: int = 200, content_type: str = "text/event-stream", first: bytes = b"") -> None:
        """The head of a chunked answer (and its first piece in the same write, when given)."""
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
                "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n").encode("latin-1")
        self.started = True
        await self._connection.stream.send_all(head + (_chunk(first) if first else b""))

    async def chunk(self, data: bytes) -> None:
        if data:
            await self._connection.stream.send_all(_chunk(data))

    async def end(self, last: bytes = b"") -> None:
        self.finished = True
        await self._connection.stream.send_all((_chunk(last) if last else b"") + b"0\r\n\r\n")

    async def wait_closed(self) -> None:
        """Until the peer closes the connection (a miner that hangs holds nothing but this task)."""
        await self._connection.wait_closed()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


Handler = Callable[[RawRequest, Responder], Awaitable[None]]


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> bool:
        with trio.move_on_after(IDLE_TIMEOUT_S):
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                return False
            self.buffer += data
            return True
        return False

    async def next_request(self) -> RawRequest | None:
        """The next request, or None when the peer closed (or stayed idle) between requests."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise BadRequest("request head too large")
            if not await self._fill():
                if self.buffer:
                    raise BadRequest("connection closed inside a request head")
                return None
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        request_line, *lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(f"bad request line {request_line[:80]!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise BadRequest("chunked request bodies are not framed here")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise BadRequest("body too large")
        while len(self.buffer) < length:
            if not await self._fill():
                raise BadRequest("connection closed inside a request body")
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return RawRequest(parts[0], parts[1].split("?", 1)[0], headers, body)

    async def wait_closed(self) -> None:
        while True:
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                return
            if len(self.buffer) < MAX_HEAD_BYTES:  # a pipelined request would wait behind the hang
                self.buffer += data


class RawServer:
    """Serves `handler` on `host:port` (0 picks a free port) until cancelled; hands back "host:port"."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0, name: str = "raw") -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.name = name
        self.connections = 0  # open right now
        self.requests = 0

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host, backlog=4096)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.address)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(stream)
        self.connections += 1
        try:
            while True:
                request = await connection.next_request()
                if request is None:
                    return
                self.requests += 1
                responder = Responder(connection)
                await self.handler(request, responder)
                if not responder.finished:  # a handler that left an answer unfinished: nothing more fits
                    return
        except StreamStopped:
            return
        except BadRequest as exc:
            log.debug("%s: %s", self.name, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the peer left
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
