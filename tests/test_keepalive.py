"""The outbound keep-alive pool against a real HTTP server on loopback: what the server sees."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from config.settings import FanoutSettings, Settings
from engine.gateway import make_http_client
from wire.http1 import AnswerEncoded, AnswerTooLarge, GatewayLimitError
from wire.pool import MAX_ANSWER_BYTES, KeepAliveTransport, ParsedUrls, post_streaming


@dataclass
class Server:
    url: str
    client_ports: list[int] = field(default_factory=list)  # one entry per request: the connection it came on
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)  # /echo: headers and body

    @property
    def connections(self) -> int:
        return len(set(self.client_ports))


def make_app(server: Server) -> QuartTrio:
    app = QuartTrio("keepalive_test")

    @app.post("/stream")
    async def stream() -> Response:
        server.client_ports.append(request.scope["client"][1])

        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await trio.sleep(0.01)

        return Response(body(), content_type="text/event-stream")

    @app.post("/echo")
    async def echo() -> Response:
        server.client_ports.append(request.scope["client"][1])
        body = await request.get_data()
        server.seen.append(({k.lower(): v for k, v in request.headers.items()}, body))
        return Response(body[::-1], status=201)

    @app.get("/slow")
    async def slow() -> str:
        server.client_ports.append(request.scope["client"][1])
        await trio.sleep(5)
        return "late"

    return app


async def start_server(nursery: trio.Nursery, *, keep_alive_timeout: float = 30.0) -> Server:
    server = Server(url="")
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = keep_alive_timeout
    urls = await nursery.start(serve, make_app(server), config)
    server.url = urls[0]
    return server


async def read_all(http: httpx.AsyncClient, url: str) -> bytes:
    async with http.stream("POST", url, content=b"{}") as response:
        assert response.status_code == 200
        return b"".join([part async for part in response.aiter_bytes()])


async def test_sequential_requests_share_one_connection(
    nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]
) -> None:
    http, transport = client
    server = await start_server(nursery)
    with trio.fail_after(10):
        bodies = [await read_all(http, f"{server.url}/stream") for _ in range(5)]
    assert bodies == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n"] * 5
    assert server.connections == 1
    assert (transport.opened, transport.reused) == (1, 4)


async def test_concurrent_requests_open_one_connection_each_then_reuse_them(
    nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]
) -> None:
    http, transport = client
    server = await start_server(nursery)
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            for _ in range(4):
                inner.start_soon(read_all, http, f"{server.url}/stream")
        assert server.connections == 4
        assert transport.idle_count() == 4
        async with trio.open_nursery() as inner:
            for _ in range(4):
                inner.start_soon(read_all, http, f"{server.url}/stream")
    assert server.connections == 4  # no new connection for the second round
    assert transport.opened == 4


async def test_a_response_left_unread_is_not_reused(
    nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]
) -> None:
    http, transport = client
    server = await start_server(nursery)
    with trio.fail_after(10):
        async with http.stream("POST", f"{server.url}/stream", content=b"{}") as response:
            async for _ in response.aiter_bytes():
                break  # leave before the end of the body
        assert transport.idle_count() == 0
        assert await read_all(http, f"{server.url}/stream") == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert server.connections == 2


async def test_a_connection_the_server_closed_is_replaced(
    nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]
) -> None:
    http, transport = client
    accepted = 0

    async def answer_once_then_close(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await trio.sleep(0.05)
        await stream.aclose()  # an idle keep-alive connection, closed by the server

    listeners = await nursery.start(partial(trio.serve_tcp, answer_once_then_close, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        assert (await http.get(f"http://127.0.0.1:{port}/")).text == "ok"
        await trio.sleep(0.3)
        assert (await http.get(f"http://127.0.0.1:{port}/")).text == "ok"
    assert accepted == 2
    assert (transport.opened, transport.reused) == (2, 0)


async def test_errors_are_httpx_errors(
    nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]
) -> None:
    http, _ = client
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with trio.fail_after(10):
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")
        server = await start_server(nursery)
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{server.url}/slow", timeout=httpx.Timeout(5, read=0.2))


async def test_post_streaming_on_the_pool_sends_the_headers_given_and_reuses_the_connection(
    nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]
) -> None:
    http, transport = client
    server = await start_server(nursery)
    url = ParsedUrls()(f"{server.url}/echo")
    with trio.fail_after(10):
        async with post_streaming(http, url, b"hello", {"Epistula-Signature": "0xabc", "Model": "m\u00e9"},
                                  bounded=True) as response:
            assert response.status_code == 201
            assert b"".join([part async for part in response.aiter_bytes()]) == b"olleh"
        async with post_streaming(http, url, b"again", {}) as response:
            assert (response.status_code, await response.aread()) == (201, b"niaga")
    (headers, body), _ = server.seen
    assert body == b"hello"
    assert headers["host"] == url.netloc.decode() and headers["content-length"] == "5"
    assert headers["user-agent"] == "sn1-gateway" and headers["epistula-signature"] == "0xabc"
    assert headers["model"].encode("latin-1") == "m\u00e9".encode()  # sent as UTF-8
    assert server.connections == 1 and (transport.opened, transport.reused) == (1, 1)


async def test_post_streaming_on_another_transport_is_an_ordinary_httpx_request() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, content=request.content.upper())

    async with (httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http,
                post_streaming(http, httpx.URL("http://miner:9/x"), b"abc", {"A": "1"}) as response):
        assert (response.status_code, await response.aread()) == (202, b"ABC")
    assert seen[0].headers["a"] == "1" and seen[0].headers["user-agent"] == "sn1-gateway"


async def test_post_streaming_sends_accept_encoding_identity_on_the_pool(
    nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]
) -> None:
    http, _ = client
    server = await start_server(nursery)
    with trio.fail_after(10):
        async with post_streaming(http, ParsedUrls()(f"{server.url}/echo"), b"x", {}) as response:
            await response.aread()
        await http.post(f"{server.url}/echo", content=b"y")  # httpx's default asks for gzip: not here
    assert [headers["accept-encoding"] for headers, _ in server.seen] == ["identity", "identity"]


def gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * (10 * 1024 * 1024))


async def test_post_streaming_on_another_transport_is_bounded_and_never_decoded() -> None:
    seen: list[httpx.Request] = []
    answers = {
        "/big": lambda: httpx.Response(200, content=b"x" * (MAX_ANSWER_BYTES + 1)),
        "/big-unsized": lambda: httpx.Response(200, stream=Pieces([b"x" * 65536] * 17)),
        "/gzip": lambda: httpx.Response(200, stream=httpx.ByteStream(gzip_bomb()),
                                        headers={"Content-Encoding": "gzip"}),
        "/raw": lambda: httpx.Response(200, stream=httpx.ByteStream(b"\x1f\x8b not decoded"),
                                       headers={"Content-Encoding": "identity"}),
    }

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[request.url.path]()

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        for path in ("/big", "/big-unsized"):
            with pytest.raises(AnswerTooLarge):
                async with post_streaming(http, httpx.URL(f"http://miner:9{path}"), b"{}", {}) as response:
                    await response.aread()
            async with post_streaming(http, httpx.URL(f"http://miner:9{path}"), b"{}", {}) as response:
                assert len(await response.aread(max_bytes=2 * MAX_ANSWER_BYTES)) > MAX_ANSWER_BYTES
        with pytest.raises(AnswerEncoded):
            async with post_streaming(http, httpx.URL("http://miner:9/gzip"), b"{}", {}) as response:
                await response.aread()
        async with post_streaming(http, httpx.URL("http://miner:9/raw"), b"{}", {}) as response:
            assert [piece async for piece in response.aiter_bytes()] == [b"\x1f\x8b not decoded"]
    assert {request.headers["accept-encoding"] for request in seen} == {"identity"}


class Pieces(httpx.AsyncByteStream):
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


async def test_post_streaming_on_another_transport_tells_the_gateways_own_limits() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            raise httpx.ConnectError("all attempts failed", request=request) from exc

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        with pytest.raises(GatewayLimitError):
            async with post_streaming(http, httpx.URL("http://miner:9/x"), b"{}", {}):
                pass


async def test_the_gateways_pool_takes_its_connection_cap_from_the_settings() -> None:
    settings = dataclasses.replace(Settings(), fanout=FanoutSettings(max_connections=64))
    async with make_http_client(settings) as http:
        transport = http._transport_for_url(httpx.URL("http://miner:9/"))
        assert isinstance(transport, KeepAliveTransport) and transport.max_connections == 64
