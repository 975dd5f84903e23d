"""Inbound client connections: at most `server.max_connections` open at once, and idle keep-alive
connections closed sooner while more than half of them are in use.

Hypercorn has no connection cap, and its `serve` builds its listeners itself, from sockets, inside
`hypercorn.trio.run.worker_serve`. `serve` below is that worker loop (Hypercorn 0.18), with
Hypercorn's own pieces (`Lifespan`, `WorkerContext`, and a `TCPServer` per connection, nothing
patched), but with our listener: it takes a free slot *before* it accepts, so a connection beyond the
cap is never accepted, read or answered; it waits in the kernel's listen backlog (or, once that is
full, the kernel refuses it) until a connection closes. And its graceful period ends at a deadline
given by the caller (the gateway's one shutdown deadline) instead of `graceful_timeout` after the
trigger. Plain HTTP only, as the gateway serves (no TLS, no QUIC). Written against Hypercorn 0.18's
classes, hence the pin in pyproject.toml; tests/test_inbound.py checks the behaviour over real sockets.

Idle connections: Hypercorn closes one after `keep_alive_timeout` of idleness. Under load (more than
half the slots in use) `Connections.close_idle_when_busy` closes every connection that has no request
open and has sent or received nothing for `busy_idle_s`, including those whose longer timer started
before the load came.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ConnectionState,
    LifespanState,
    Scope,
)
from hypercorn.utils import ShutdownError, parse_socket_addr, raise_shutdown, repr_socket_addr

from wire.http1 import send_all

Peer = tuple[str, int]


class Connection(trio.abc.HalfCloseableStream):
    """An accepted socket stream holding one slot until it is closed; it notes when it last moved
    bytes and how many requests are open on it (from the ASGI scope, see `Connections.track`).

    Each connection has a Hypercorn `WorkerContext` of its own, whose `terminated` event ends its
    keep-alive wait: set when the client has gone (Hypercorn would otherwise keep a closed
    connection, and its socket, until its keep-alive timer ran out), when it is idle under load, and
    at shutdown.
    """

    def __init__(self, stream: trio.SocketStream, owner: Connections, peer: Peer | None) -> None:
        self._stream = stream
        self._owner = owner
        self.socket = stream.socket  # Hypercorn's TCPServer reads the addresses from it
        self.peer = peer
        self.context = WorkerContext(None)
        self.requests = 0
        self.last_active = trio.current_time()
        self.head_started_at: float | None = None  # bytes of a request head arrived, its request not begun
        self._released = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Hypercorn writes a response in three calls (head, body, end; the end of a response with a
        Content-Length is empty). What the kernel takes at once is written without a trip through the
        scheduler (`wire.http1.send_all`), an empty write costs nothing; the rest goes as trio sends it."""
        if not data:
            if self.socket.fileno() < 0:
                raise trio.ClosedResourceError("the connection is closed")
            return
        await send_all(self._stream, data)
        self.last_active = trio.current_time()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        self.last_active = trio.current_time()
        if data and self.requests == 0 and self.head_started_at is None:
            self.head_started_at = self.last_active
        if not data:  # the client has gone (or half-closed: Hypercorn takes that as gone too)
            await self.context.terminated.set()
            if self.requests == 0:
                self.release()
        return data

    async def end(self) -> None:
        """Close it now if idle, else once the answer in flight is sent (as Hypercorn's shutdown does)."""
        await self.context.terminated.set()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        self.release()
        await self._stream.aclose()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner.released(self)


class Connections:
    """The slots for client connections, and the connections holding them."""

    name = "connections"  # as it reports on /health/ready

    def __init__(self, cap: int, *, busy_idle_s: float, head_timeout_s: float = 10.0) -> None:
        self.cap = cap
        self.busy_idle_s = busy_idle_s
        self.head_timeout_s = head_timeout_s
        self._free = trio.Semaphore(cap)
        self._busy = trio.Event()  # set when more than half the slots are taken
        self.open: dict[int, Connection] = {}
        self._by_peer: dict[Peer, Connection] = {}
        self.accepted = 0
        self.waited = 0  # accepts that had to wait for a slot
        self.closed_idle_busy = 0  # idle connections closed early under load
        self.closed_slow_head = 0  # connections whose request head did not arrive within head_timeout_s

    @property
    def in_use(self) -> int:
        return len(self.open)

    @property
    def busy(self) -> bool:
        return 2 * self.in_use > self.cap

    async def take_slot(self) -> None:
        if self._free.value == 0:
            self.waited += 1
        await self._free.acquire()

    def give_back_slot(self) -> None:
        self._free.release()

    def adopt(self, stream: trio.SocketStream) -> Connection:
        """Wrap a freshly accepted stream (its slot already taken)."""
        try:
            peer = parse_socket_addr(stream.socket.family, stream.socket.getpeername())
        except OSError:  # the client has gone already
            peer = None
        connection = Connection(stream, self, peer)
        self.open[id(connection)] = connection
        if peer is not None:
            self._by_peer[peer] = connection
        self.accepted += 1
        if self.busy:
            self._busy.set()
        return connection

    def released(self, connection: Connection) -> None:
        del self.open[id(connection)]
        if connection.peer is not None and self._by_peer.get(connection.peer) is connection:
            del self._by_peer[connection.peer]
        self._free.release()

    def track(self, app: ASGIFramework) -> ASGIFramework:
        """`app`, counting the requests open on each connection (found by the scope's client address,
        which Hypercorn takes from the same socket)."""

        async def tracked(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
            client = scope.get("client") if scope["type"] == "http" else None
            connection = self._by_peer.get(client) if client else None
            if connection is None:
                await app(scope, receive, send)
                return
            connection.requests += 1
            connection.head_started_at = None
            try:
                await app(scope, receive, send)
            finally:
                connection.requests -= 1
                connection.last_active = trio.current_time()

        return tracked

    async def close_idle_when_busy(self) -> None:
        """While more than half the slots are taken, close connections idle for `busy_idle_s`."""
        tick = min(1.0, self.busy_idle_s / 4)
        while True:
            await self._busy.wait()
            while self.busy:
                cutoff = trio.current_time() - self.busy_idle_s
                idle = [c for c in self.open.values() if c.requests == 0 and c.last_active <= cutoff]
                for connection in idle:
                    self.closed_idle_busy += 1
                    await connection.end()
                    await trio.aclose_forcefully(connection)  # also if Hypercorn's keep-alive watch is not armed
                await trio.sleep(tick)
            self._busy = trio.Event()

    async def close_slow_heads(self) -> None:
        """Close connections whose request head has been arriving for longer than `head_timeout_s`: a
        client sending a byte every few seconds (slowloris) keeps a connection active but never asks
        anything, and would hold its slot for ever."""
        tick = min(1.0, self.head_timeout_s / 4)
        while True:
            await trio.sleep(tick)
            cutoff = trio.current_time() - self.head_timeout_s
            slow = [c for c in self.open.values()
                    if c.requests == 0 and c.head_started_at is not None and c.head_started_at <= cutoff]
            for connection in slow:
                self.closed_slow_head += 1
                await connection.end()
                await trio.aclose_forcefully(connection)

    async def end_all(self) -> None:
        for connection in list(self.open.values()):
            await connection.end()

    def health(self) -> dict[str, Any]:
        return {
            "open": self.in_use,
            "max": self.cap,
            "busy": self.busy,
            "accepted": self.accepted,
            "waited_for_a_slot": self.waited,
            "closed_idle_under_load": self.closed_idle_busy,
            "closed_slow_head": self.closed_slow_head,
        }


class SlotListener(trio.abc.Listener[Connection]):
    """A listener that accepts only while a slot is free."""

    def __init__(self, listener: trio.SocketListener, connections: Connections) -> None:
        self._listener = listener
        self._connections = connections

    async def accept(self) -> Connection:
        await self._connections.take_slot()
        try:
            stream = await self._listener.accept()
        except BaseException:
            self._connections.give_back_slot()
            raise
        return self._connections.adopt(stream)

    async def aclose(self) -> None:
        await self._listener.aclose()


async def serve(
    app: ASGIFramework,
    config: HypercornConfig,
    connections: Connections,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    drain_deadline: Callable[[], float],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` as `hypercorn.trio.serve` does, through `connections`' slots.

    After `shutdown_trigger` returns, listening stops, idle connections are closed, and requests in
    flight may finish until `drain_deadline()` (a trio time, read once the trigger has fired).
    """
    wrapped = ASGIWrapper(connections.track(app))
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)

    def handler(state: ConnectionState, connection: Connection) -> TCPServer:
        return TCPServer(wrapped, config, connection.context, state, connection)  # type: ignore[arg-type]

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        lifespan_nursery.start_soon(connections.close_idle_when_busy)
        lifespan_nursery.start_soon(connections.close_slow_heads)

        async with trio.open_nursery() as server_nursery:
            listeners: list[SlotListener] = []
            binds: list[str] = []
            for sock in config.create_sockets().insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(SlotListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), connections))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(partial(
                        trio.serve_listeners, partial(handler, ConnectionState(lifespan_state.copy())), listeners,
                        handler_nursery=server_nursery,
                    ))
            except BaseExceptionGroup as error:
                _, others = error.split(ShutdownError)
                if others is not None:
                    raise others from None
            finally:
                deadline = drain_deadline()  # infinite only when the server stops without a shutdown
                server_nursery.cancel_scope.deadline = (
                    deadline if math.isfinite(deadline) else trio.current_time() + config.graceful_timeout)
                await connections.end_all()  # idle connections close now, busy ones after their answer

        with trio.move_on_at(drain_deadline()):
            await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
