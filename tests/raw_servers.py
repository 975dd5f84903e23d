"""Raw HTTP servers on loopback, for tests of the outbound client against every kind of answer."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from functools import partial

import trio

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


class RawServer:
    """Serves each connection with `handler(stream, n)`, n counting connections from 1."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        with contextlib.suppress(trio.BrokenResourceError):
            await self.handler(stream, self.accepted)

    async def read_request(self, stream: trio.SocketStream, pending: list[bytes]) -> bytes | None:
        """One request (head and Content-Length body); None when the client closed."""
        data = pending.pop() if pending else b""
        while b"\r\n\r\n" not in data:
            more = await stream.receive_some(65536)
            if not more:
                return None
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            rest += await stream.receive_some(65536)
        pending.append(rest[length:])
        self.requests.append(head + b"\r\n\r\n" + rest[:length])
        return head


async def start(nursery: trio.Nursery, handler: Handler) -> RawServer:
    server = RawServer(handler)
    listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server
