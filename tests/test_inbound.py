"""Inbound connections over real sockets: the cap (`server.max_connections`) and the shorter keep-alive
idle timeout while more than half of it is in use (`server.keep_alive_busy_s`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
from quart import Response
from quart_trio import QuartTrio

from config.settings import ServerSettings, Settings
from engine.gateway import Gateway, run
from web.errors import json_response
from web.inbound import Connections

REQUEST = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"


class Client:
    """One raw keep-alive HTTP/1.1 connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send_request(self) -> None:
        await self.stream.send_all(REQUEST)

    async def read_response(self) -> bytes:
        """The next response (headers and a Content-Length body); b"" once the server closed."""
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some()
            if not data:
                return b""
            self.buffer += data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            data = await self.stream.receive_some()
            if not data:
                return b""
            rest += data
        self.buffer = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]

    async def ask(self) -> bytes:
        await self.send_request()
        return await self.read_response()

    async def closed_by_server(self) -> bool:
        try:
            return await self.stream.receive_some() == b""
        except trio.BrokenResourceError:  # a reset counts as closed too
            return True


@pytest.fixture
async def serve(gateway_settings: Settings, nursery: trio.Nursery) -> AsyncIterator[Any]:
    gateways: list[Gateway] = []
    clients: list[Client] = []

    async def start(app_hook: Callable[[QuartTrio], None] | None = None, **server: Any) -> tuple[Gateway, Any]:
        settings = dataclasses.replace(gateway_settings, server=ServerSettings(port=0, **server))
        gateway: Gateway = await nursery.start(lambda task_status: run(settings, app_hook=app_hook,
                                                                         task_status=task_status))
        gateways.append(gateway)
        port = int(gateway.url.rsplit(":", 1)[1])

        async def connect() -> Client:
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            clients.append(client)
            return client

        return gateway, connect

    yield start
    for client in clients:
        await client.stream.aclose()
    for gateway in gateways:
        gateway.shutdown()
        with trio.fail_after(10):
            await gateway.wait_stopped()


async def test_connections_beyond_the_cap_wait_until_one_closes(serve: Any) -> None:
    with trio.fail_after(20):
        gateway, connect = await serve(max_connections=4, keep_alive_timeout_s=60.0, keep_alive_busy_s=60.0)
        first = [await connect() for _ in range(4)]
        for client in first:
            assert (await client.ask()).startswith(b"HTTP/1.1 200")  # each stays open, idle
        extra = [await connect() for _ in range(2)]  # the kernel completes the handshake: it waits in the backlog
        for client in extra:
            await client.send_request()
        with trio.move_on_after(0.5) as waited:
            await extra[0].read_response()
        assert waited.cancelled_caught, "a connection beyond the cap was served"
        stats = gateway.services.readiness()["connections"]
        assert (stats["open"], stats["max"]) == (4, 4) and stats["waited_for_a_slot"] >= 1

        await first[0].stream.aclose()  # a slot frees: one waiting connection is taken, and answered
        answered = await extra[0].read_response()
        assert answered.startswith(b"HTTP/1.1 200")
        with trio.move_on_after(0.3) as still_waiting:
            await extra[1].read_response()
        assert still_waiting.cancelled_caught

        await first[1].stream.aclose()
        assert (await extra[1].read_response()).startswith(b"HTTP/1.1 200")
        # The server never stopped serving the connections it holds.
        assert (await first[2].ask()).startswith(b"HTTP/1.1 200")
        async with httpx.AsyncClient() as http:  # and /health/ready says so
            await first[3].stream.aclose()
            report = (await http.get(f"{gateway.url}/health/ready")).json()
        assert report["connections"]["max"] == 4 and report["connections"]["accepted"] == 7


async def test_idle_connections_close_sooner_when_more_than_half_the_cap_is_open(serve: Any) -> None:
    with trio.fail_after(20):
        gateway, connect = await serve(max_connections=4, keep_alive_timeout_s=60.0, keep_alive_busy_s=0.3)
        early = await connect()
        assert (await early.ask()).startswith(b"HTTP/1.1 200")
        await trio.sleep(1.0)  # one of four: not under load, the 60 s keep-alive applies
        assert (await early.ask()).startswith(b"HTTP/1.1 200")

        second = await connect()
        assert (await second.ask()).startswith(b"HTTP/1.1 200")
        await trio.sleep(1.0)  # two of four is half, not more than half
        assert (await early.ask()).startswith(b"HTTP/1.1 200")

        await trio.sleep(0.5)
        third = await connect()  # three of four: connections idle for 0.3 s are closed, the early one too,
        assert (await third.ask()).startswith(b"HTTP/1.1 200")  # until no more than half are open
        started = trio.current_time()
        for client in (early, second):
            assert await client.closed_by_server()
        assert trio.current_time() - started < 2.0
        stats = gateway.services.readiness()["connections"]
        assert (stats["open"], stats["closed_idle_under_load"]) == (1, 2)

        # Load gone: the connection left, and a new one, keep the long timeout again.
        after = await connect()
        assert (await after.ask()).startswith(b"HTTP/1.1 200")
        await trio.sleep(1.0)
        assert (await after.ask()).startswith(b"HTTP/1.1 200")
        assert (await third.ask()).startswith(b"HTTP/1.1 200")


async def test_a_request_in_flight_is_not_idle_under_load(serve: Any) -> None:
    """Under load only idle connections are closed: a slow answer on a busy one is not cut."""
    release, entered = trio.Event(), trio.Event()

    def install(app: QuartTrio) -> None:
        @app.get("/test/slow")
        async def slow() -> Response:
            entered.set()
            await release.wait()
            return json_response({"finished": True})

    with trio.fail_after(20):
        _, connect = await serve(app_hook=install, max_connections=2, keep_alive_timeout_s=60.0,
                                 keep_alive_busy_s=0.2)
        busy, idle = await connect(), await connect()  # two of two: under load
        assert (await idle.ask()).startswith(b"HTTP/1.1 200")
        await busy.stream.send_all(b"GET /test/slow HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await entered.wait()
        assert await idle.closed_by_server()
        await trio.sleep(0.6)  # silent for longer than keep_alive_busy_s, but answering
        release.set()
        assert (await busy.read_response()).endswith(b'{"finished":true}')


async def test_a_request_head_trickling_in_is_cut_and_its_slot_freed(serve: Any) -> None:
    """Slowloris: a byte every now and then keeps a connection active but never asks anything. Its head
    must arrive within server.request_head_timeout_s, or the connection is closed and the slot freed."""
    with trio.fail_after(20):
        gateway, connect = await serve(max_connections=1, request_head_timeout_s=1.0)
        slow = await connect()
        started = trio.current_time()
        closed = False
        for byte in REQUEST[:-2]:  # never the blank line that ends the head
            try:
                await slow.stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                closed = True
                break
            with trio.move_on_after(0.3):
                closed = await slow.closed_by_server()
            if closed:
                break
        assert closed and trio.current_time() - started < 3.0
        assert gateway.services.readiness()["connections"]["closed_slow_head"] == 1
        honest = await connect()  # the one slot is free again
        assert (await honest.ask()).startswith(b"HTTP/1.1 200")
        await trio.sleep(1.5)  # an idle keep-alive connection, without a head on its way, is not cut
        assert (await honest.ask()).startswith(b"HTTP/1.1 200")


async def test_a_response_written_in_pieces_arrives_whole_and_writes_after_the_close_raise() -> None:
    """Hypercorn writes a response as head, body and an end that is empty with a Content-Length: the
    bytes arrive in order, the empty end writes nothing, and any write after the close says so."""
    a, b = trio.socket.socketpair()
    ours, theirs = trio.SocketStream(a), trio.SocketStream(b)
    connection = Connections(4, busy_idle_s=1.0).adopt(ours)
    body = b"x" * (3 << 20)  # more than a socket buffer: part waits for the reader
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(head) + len(body):
            got.extend(await theirs.receive_some(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        for piece in (head, body, b""):
            await connection.send_all(piece)
    assert bytes(got) == head + body
    await connection.aclose()
    for piece in (b"", b"more"):
        with pytest.raises(trio.ClosedResourceError):
            await connection.send_all(piece)
    await theirs.aclose()
