"""The outbound HTTP/1.1 connection against raw servers on loopback: framing, reuse, and every way an
answer can go wrong, each an httpx error."""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import resource
import sys

import httpx
import pytest
import trio
import trio.lowlevel

from tests.raw_servers import RawServer, start
from wire.http1 import (
    RECEIVE_BYTES,
    AnswerEncoded,
    AnswerTooLarge,
    GatewayLimitError,
    encode_head,
    parse_head,
    receive_some,
    send_all,
    send_now,
)
from wire.pool import MAX_ANSWER_BYTES, KeepAliveTransport, post_streaming


async def serve_responses(nursery: trio.Nursery, *responses: bytes, byte_by_byte: bool = False) -> RawServer:
    """A server answering the n-th request on a connection with responses[n] (the last one repeats)."""

    async def handler(stream: trio.SocketStream, _: int) -> None:
        pending: list[bytes] = []
        i = 0
        while await server.read_request(stream, pending) is not None:
            response = responses[min(i, len(responses) - 1)]
            i += 1
            if byte_by_byte:
                for k in range(len(response)):
                    await stream.send_all(response[k:k + 1])
                    await trio.lowlevel.checkpoint()
            else:
                await stream.send_all(response)

    server = await start(nursery, handler)
    return server


async def serve_once_then_close(nursery: trio.Nursery, response: bytes) -> RawServer:
    async def answer_then_close(stream: trio.SocketStream, _: int) -> None:
        await server.read_request(stream, [])
        await stream.send_all(response)
        await stream.aclose()

    server = await start(nursery, answer_then_close)
    return server


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
           b"7;ext=1\r\ndata: 1\r\n9\r\n\n\ndata: 2\r\n0\r\nTrailer: x\r\n\r\n")


async def post(http: httpx.AsyncClient, server: RawServer, body: bytes = b'{"q": 1}') -> httpx.Response:
    return await http.post(f"http://127.0.0.1:{server.port}/v1/x?y=1", content=body)


async def test_a_chunked_answer_cut_at_every_byte_is_whole_and_the_connection_kept(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client
    server = await serve_responses(nursery, CHUNKED, byte_by_byte=True)
    with trio.fail_after(10):
        for _ in range(3):
            response = await post(http, server)
            assert response.status_code == 200 and response.content == b"data: 1\n\ndata: 2"
            assert response.headers["content-type"] == "text/event-stream"
    assert (server.accepted, transport.opened, transport.reused) == (1, 1, 2)
    assert server.requests[0] == (b"POST /v1/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port
                                  + server.requests[0].split(b"\r\n", 2)[2])
    assert server.requests[0].endswith(b'\r\n\r\n{"q": 1}')


async def test_a_content_length_answer_keeps_the_connection(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client
    server = await serve_responses(nursery, b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello")
    with trio.fail_after(10):
        for _ in range(2):
            response = await post(http, server)
            assert (response.status_code, response.text, response.reason_phrase) == (201, "hello", "Created")
    assert server.accepted == 1 and transport.reused == 1


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\n\r\nuntil the close",  # no framing: the body runs to the close
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 15\r\n\r\nuntil the close",
    b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\nuntil the close",
])
async def test_answers_that_end_the_connection_are_not_reused(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport], response: bytes) -> None:
    http, transport = client

    server = await serve_once_then_close(nursery, response)
    with trio.fail_after(10):
        for _ in range(2):
            assert (await post(http, server)).text == "until the close"
    assert server.accepted == 2 and transport.reused == 0 and transport.idle_count() == 0


async def test_informational_answers_are_skipped(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, _ = client
    server = await serve_responses(
        nursery, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    with trio.fail_after(10):
        assert (await post(http, server)).text == "ok"


@pytest.mark.parametrize(("response", "message"), [
    (b"ICY 200 OK\r\n\r\n", "not an HTTP/1.1 status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "conflicting Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX\r\n", "chunk data not followed by CRLF"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", "without sending complete message body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nhalf", "without sending complete message body"),
    (b"", "server disconnected without sending a response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nxxxxxxxx\r\n0\r\n\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x8\r\nxxxxxxxx\r\n0\r\n\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "invalid Content-Length"),
])
async def test_broken_answers_are_protocol_errors(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport], response: bytes,
        message: str) -> None:
    http, transport = client

    server = await serve_once_then_close(nursery, response)
    with trio.fail_after(10), pytest.raises(httpx.RemoteProtocolError, match=message):
        await post(http, server)
    assert transport.idle_count() == transport.open_count() == 0


async def test_a_kept_connection_closed_as_the_request_goes_out_is_retried_once_on_a_new_one(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client

    async def first_connection_drops_its_second_request(stream: trio.SocketStream, n: int) -> None:
        pending: list[bytes] = []
        answered = 0
        while await server.read_request(stream, pending) is not None:
            if n == 1 and answered == 1:
                await stream.aclose()  # the race the readability check cannot see
                return
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            answered += 1

    server = await start(nursery, first_connection_drops_its_second_request)
    with trio.fail_after(10):
        assert (await post(http, server)).text == "ok"
        assert (await post(http, server)).text == "ok"
    assert server.accepted == 2 and len(server.requests) == 3
    assert (transport.opened, transport.reused) == (2, 1)


async def test_a_fresh_connection_is_not_retried(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, _ = client

    async def drop(stream: trio.SocketStream, _: int) -> None:
        await server.read_request(stream, [])
        await stream.aclose()

    server = await start(nursery, drop)
    with trio.fail_after(10), pytest.raises(httpx.RemoteProtocolError):
        await post(http, server)
    assert server.accepted == 1


async def test_a_body_that_stalls_is_a_read_timeout(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, _ = client

    async def stall(stream: trio.SocketStream, _: int) -> None:
        await server.read_request(stream, [])
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
        await trio.sleep_forever()

    server = await start(nursery, stall)
    with trio.fail_after(10), pytest.raises(httpx.ReadTimeout):
        await http.post(f"http://127.0.0.1:{server.port}/", content=b"x", timeout=httpx.Timeout(5, read=0.2))


def test_header_values_cannot_inject_lines() -> None:
    with pytest.raises(httpx.LocalProtocolError):
        encode_head(b"POST", b"/", [(b"X-Seed", b"1\r\nX-Evil: 1")])
    with pytest.raises(httpx.LocalProtocolError):
        encode_head(b"POST", b"/", [(b"X-Seed: 1\nX", b"1")])
    for headers in ([(b"X:Y", b"1")], [(b"X", b"a\rb")], [(b"Host", b"h"), (b"X", b"1\n")]):
        with pytest.raises(httpx.LocalProtocolError):
            encode_head(b"POST", b"/", headers)
    with pytest.raises(httpx.LocalProtocolError):
        encode_head(b"POST", b"/a\r\nX-Evil: 1", [(b"Host", b"h")])
    assert encode_head(b"GET", b"/a", [(b"Host", b"h")]) == b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"


def test_what_frames_a_body() -> None:
    head = parse_head(b"HTTP/1.1 204 No Content\r\nContent-Length: 9", method=b"POST")
    assert head.length == 0 and head.keep_alive
    head = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 4", method=b"POST")
    assert head.chunked and head.length is None
    head = parse_head(b"HTTP/1.1 200 OK", method=b"POST")
    assert not head.chunked and head.length is None and not head.keep_alive  # runs to the close
    for coding in (b"gzip, chunked", b"gzip", b"identity"):  # passed on, they would hand compressed bytes on
        with pytest.raises(httpx.RemoteProtocolError, match="transfer coding other than chunked"):
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding, method=b"POST")
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Keep-Alive, Close", method=b"GET")
    assert not head.keep_alive


async def test_a_request_the_server_worked_on_before_closing_is_not_sent_again(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, _ = client

    async def work_then_close_on_the_second(stream: trio.SocketStream, _: int) -> None:
        pending: list[bytes] = []
        await server.read_request(stream, pending)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await server.read_request(stream, pending)
        await trio.sleep(0.3)  # works on it, then dies
        await stream.aclose()

    server = await start(nursery, work_then_close_on_the_second)
    with trio.fail_after(10):
        assert (await post(http, server)).text == "ok"
        with pytest.raises(httpx.RemoteProtocolError):
            await post(http, server)
    assert len(server.requests) == 2 and server.accepted == 1


async def test_idle_connections_are_swept_even_for_origins_not_asked_again(
        nursery: trio.Nursery) -> None:
    transport = KeepAliveTransport(keepalive_expiry_s=0.2)
    async with httpx.AsyncClient(transport=transport, timeout=5) as http:
        first = await serve_responses(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        second = await serve_responses(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        with trio.fail_after(10):
            await post(http, first)
            assert transport.idle_count() == 1
            await trio.sleep(0.3)
            await post(http, second)  # the first origin's connection has expired: closed now
        assert transport.idle_count() == 1


async def test_many_tiny_chunks_come_out_whole_and_batched_by_read(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client
    body = b"".join(b"1\r\n%c\r\n" % (65 + i % 26) for i in range(20_000)) + b"0\r\n\r\n"
    server = await serve_responses(nursery, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    with trio.fail_after(30):
        async with http.stream("POST", f"http://127.0.0.1:{server.port}/", content=b"x") as response:
            pieces = [piece async for piece in response.aiter_raw()]
    assert b"".join(pieces) == bytes(65 + i % 26 for i in range(20_000))
    assert len(pieces) < 200  # one piece per read, not one per chunk
    assert transport.idle_count() == 1


# -- what a hostile server can make the gateway hold ------------------------------------------------


async def test_endless_informational_heads_are_refused(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client

    async def endless_1xx(stream: trio.SocketStream, _: int) -> None:
        await server.read_request(stream, [])
        while True:
            await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")

    server = await start(nursery, endless_1xx)
    with trio.fail_after(5), pytest.raises(httpx.RemoteProtocolError, match="more than 8 informational"):
        await post(http, server)
    assert transport.open_count() == 0


async def test_endless_trailers_are_refused(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client

    async def endless_trailers(stream: trio.SocketStream, _: int) -> None:
        await server.read_request(stream, [])
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        while True:
            await stream.send_all(b"X-Trailer: again\r\n" * 100)

    server = await start(nursery, endless_trailers)
    with trio.fail_after(5), pytest.raises(httpx.RemoteProtocolError, match="trailer"):
        await post(http, server)
    assert transport.open_count() == 0


HUGE = 16 * 1024 * 1024


@pytest.mark.parametrize("framing", ["one huge chunk", "until the close"])
async def test_a_huge_body_comes_in_pieces_of_one_read(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport], framing: str) -> None:
    """A streaming caller counts bytes itself: the transport hands each read on, holding nothing back."""
    http, _ = client

    async def huge(stream: trio.SocketStream, _: int) -> None:
        await server.read_request(stream, [])
        if framing == "one huge chunk":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % HUGE)
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n")
        for _ in range(HUGE // 65536):
            await stream.send_all(b"x" * 65536)
        if framing == "one huge chunk":
            await stream.send_all(b"\r\n0\r\n\r\n")
        await stream.aclose()

    server = await start(nursery, huge)
    largest = total = 0
    with trio.fail_after(20):
        async with post_streaming(http, httpx.URL(f"http://127.0.0.1:{server.port}/"), b"{}", {},
                                  bounded=True) as response:
            async for piece in response.aiter_bytes():
                largest, total = max(largest, len(piece)), total + len(piece)
    assert total == HUGE and largest <= RECEIVE_BYTES


async def serve_body(nursery: trio.Nursery, head: bytes, body: bytes) -> RawServer:
    """Answers every request with `head` and `body`, then waits for the next request."""

    async def answer(stream: trio.SocketStream, _: int) -> None:
        pending: list[bytes] = []
        while await server.read_request(stream, pending) is not None:
            await stream.send_all(head + body)

    server = await start(nursery, answer)
    return server


@pytest.mark.parametrize(("head", "body"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER_BYTES + 1), b"x" * (MAX_ANSWER_BYTES + 1)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
     (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 17 + b"0\r\n\r\n"),  # no length said: refused on the way
    (b"HTTP/1.1 200 OK\r\n\r\n", b"x" * (MAX_ANSWER_BYTES + 1)),
])
async def test_an_answer_read_whole_is_capped_and_its_connection_closed(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport], head: bytes,
        body: bytes) -> None:
    http, transport = client
    server = await serve_body(nursery, head, body)
    url = httpx.URL(f"http://127.0.0.1:{server.port}/")
    with trio.fail_after(10):
        for _ in range(2):
            with pytest.raises(AnswerTooLarge) as refused:
                async with post_streaming(http, url, b"{}", {}, bounded=True) as response:
                    await response.aread()  # the default cap: callers that name none are bounded too
            assert isinstance(refused.value, httpx.HTTPError)  # counted as the peer's failure
            assert transport.open_count() == transport.idle_count() == 0  # closed, not pooled
        with pytest.raises(AnswerTooLarge):
            await post(http, server)  # httpx's own API on the pool reads whole answers: capped too
    assert server.accepted == 3


async def test_max_bytes_is_the_readers_and_a_refused_answer_costs_its_connection(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client
    server = await serve_body(nursery, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                              b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    url = httpx.URL(f"http://127.0.0.1:{server.port}/")
    with trio.fail_after(10):
        async with post_streaming(http, url, b"{}", {}) as response:
            assert await response.aread(max_bytes=6) == b"abcdef"
        assert transport.idle_count() == 1
        async with post_streaming(http, url, b"{}", {}) as response:
            with pytest.raises(AnswerTooLarge):
                await response.aread(max_bytes=5)
        assert transport.open_count() == 0
        async with post_streaming(http, url, b"{}", {}) as response:
            assert await response.aread(max_bytes=6) == b"abcdef"
    assert server.accepted == 2 and transport.reused == 1


async def test_every_request_asks_for_identity_and_an_encoded_answer_is_refused(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client
    bomb = gzip.compress(b"\0" * (10 * 1024 * 1024))
    server = await serve_body(nursery, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                              % len(bomb), bomb)
    url = httpx.URL(f"http://127.0.0.1:{server.port}/availability")
    with trio.fail_after(10):
        with pytest.raises(AnswerEncoded, match="gzip"):
            async with post_streaming(http, url, b"{}", {"Content-Type": "application/json"}) as response:
                await response.aread()
        assert transport.open_count() == 0
        with pytest.raises(AnswerEncoded):
            await post(http, server)  # httpx would decode it: it never gets the chance
    assert transport.open_count() == 0
    for request in server.requests:
        head = request.split(b"\r\n\r\n")[0].lower()
        assert head.count(b"accept-encoding") == 1 and b"\r\naccept-encoding: identity" in head


async def test_an_identity_content_encoding_is_taken(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, _ = client
    server = await serve_body(nursery, b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 2\r\n\r\n",
                              b"ok")
    with trio.fail_after(10):
        assert (await post(http, server)).text == "ok"


# -- the gateway's own limits ----------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's descriptors in /proc")
async def test_running_out_of_open_files_is_the_gateways_limit_not_the_peers(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client
    server = await serve_responses(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
    try:
        with contextlib.suppress(OSError):
            while True:  # the gaps below the limit too: now no descriptor is left
                held.append(os.open(os.devnull, os.O_RDONLY))
        with trio.fail_after(5), pytest.raises(GatewayLimitError, match="EMFILE") as refused:
            await post(http, server)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert isinstance(refused.value, httpx.TransportError) and not isinstance(refused.value, httpx.ConnectError)
    assert transport.open_count() == 0
    with trio.fail_after(5):
        assert (await post(http, server)).text == "ok"


class Exhausted(trio.abc.SocketFactory):
    def __init__(self, code: int) -> None:
        self.code = code

    def socket(self, family: object = None, type: object = None, proto: object = None) -> trio.socket.SocketType:
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize(("code", "error"), [
    (errno.EMFILE, GatewayLimitError), (errno.ENFILE, GatewayLimitError), (errno.ENOBUFS, GatewayLimitError),
    (errno.ENOMEM, GatewayLimitError), (errno.EACCES, httpx.ConnectError), (errno.ENETUNREACH, httpx.ConnectError),
])
async def test_which_connect_failures_are_the_gateways_own(
        client: tuple[httpx.AsyncClient, KeepAliveTransport], code: int, error: type[Exception]) -> None:
    http, transport = client
    trio.socket.set_custom_socket_factory(Exhausted(code))
    try:
        with trio.fail_after(5), pytest.raises(error) as raised:
            await http.post("http://127.0.0.1:9/", content=b"{}")
    finally:
        trio.socket.set_custom_socket_factory(None)
    assert isinstance(raised.value, GatewayLimitError) == (error is GatewayLimitError)
    assert transport.open_count() == 0


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_at_the_connection_cap_the_longest_idle_connection_makes_room(nursery: trio.Nursery) -> None:
    transport = KeepAliveTransport(max_connections=2)
    async with httpx.AsyncClient(transport=transport, timeout=5) as http:
        first, second = await serve_responses(nursery, OK), await serve_responses(nursery, OK)
        with trio.fail_after(10):
            async with trio.open_nursery() as both:
                for _ in range(2):
                    both.start_soon(post, http, first)
            assert transport.idle_count() == transport.open_count() == 2
            assert (await post(http, second)).text == "ok"
        assert transport.open_count() == 2 and transport.replaced_at_cap == 1 and transport.refused_at_cap == 0
        assert (first.accepted, second.accepted) == (2, 1)


async def test_at_the_connection_cap_with_every_connection_in_use_a_request_fails_at_once(
        nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def hold(stream: trio.SocketStream, _: int) -> None:
        pending: list[bytes] = []
        while await held.read_request(stream, pending) is not None:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            await release.wait()
            await stream.send_all(b"ok")

    held = await start(nursery, hold)
    other = await serve_responses(nursery, OK)
    transport = KeepAliveTransport(max_connections=2)
    async with httpx.AsyncClient(transport=transport, timeout=5) as http, contextlib.AsyncExitStack() as stack:
        url = httpx.URL(f"http://127.0.0.1:{held.port}/")
        with trio.fail_after(10):
            streams = [await stack.enter_async_context(post_streaming(http, url, b"{}", {})) for _ in range(2)]
        started = trio.current_time()
        with trio.fail_after(10), pytest.raises(GatewayLimitError, match=r"fanout\.max_connections") as refused:
            await post(http, other)
        assert trio.current_time() - started < 0.5  # at once: no wait for a slot
        assert isinstance(refused.value, httpx.TransportError)
        assert (transport.refused_at_cap, other.accepted, transport.open_count()) == (1, 0, 2)
        release.set()
        with trio.fail_after(10):
            assert [await response.aread() for response in streams] == [b"ok", b"ok"]
            await stack.aclose()
            assert (await post(http, other)).text == "ok"  # one idle connection made room
    assert transport.replaced_at_cap == 1


async def test_a_cancelled_exchange_gives_its_connection_back_to_the_count(
        nursery: trio.Nursery, client: tuple[httpx.AsyncClient, KeepAliveTransport]) -> None:
    http, transport = client

    async def stall(stream: trio.SocketStream, _: int) -> None:
        await server.read_request(stream, [])
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
        await trio.sleep_forever()

    server = await start(nursery, stall)
    url = httpx.URL(f"http://127.0.0.1:{server.port}/")
    with trio.move_on_after(0.2) as scope:
        async with post_streaming(http, url, b"{}", {}, bounded=True) as response:
            await response.aread()
    assert scope.cancelled_caught
    assert transport.open_count() == transport.idle_count() == 0


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_a_write_larger_than_the_socket_buffer_arrives_whole_and_in_order() -> None:
    """What the kernel takes at once is written directly; the rest goes as trio sends it, waiting."""
    data = os.urandom(4 << 20)
    sender, receiver = await socket_pair()
    assert 0 < send_now(sender, data) < len(data)  # more than the buffer holds: a short write
    for stream in (sender, receiver):
        await stream.aclose()
    sender, receiver = await socket_pair()
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(data):
            got.extend(await receiver.receive_some(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await send_all(sender, data)
    assert bytes(got) == data
    for stream in (sender, receiver):
        await stream.aclose()


async def test_writes_to_a_closed_or_broken_connection_raise_what_trio_raises() -> None:
    sender, receiver = await socket_pair()
    await sender.aclose()
    assert send_now(sender, b"x") == 0
    with pytest.raises(trio.ClosedResourceError):
        await send_all(sender, b"x")
    sender, receiver = await socket_pair()
    await receiver.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first write may still be taken by the kernel
            await send_all(sender, b"x" * 65536)
    await sender.aclose()
    sender, receiver = await socket_pair()
    await sender.send_eof()
    assert send_now(sender, b"x") == 0
    with pytest.raises(trio.ClosedResourceError):
        await send_all(sender, b"x")
    await sender.aclose()
    await receiver.aclose()


async def test_a_request_in_a_cancelled_scope_is_not_sent() -> None:
    """As with trio's `send_all`: a fan-out cut short before a miner was asked, or a shutdown cancelling a
    delivery, sends nothing (the peer never sees a signed request nobody will read)."""
    sender, receiver = await socket_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_all(sender, b"POST / HTTP/1.1\r\n\r\n")
    assert scope.cancelled_caught
    with trio.move_on_after(0.05) as waiting:
        await receiver.receive_some(100)
    assert waiting.cancelled_caught  # nothing arrived
    for stream in (sender, receiver):
        await stream.aclose()


async def test_a_read_takes_what_arrived_at_once_waits_for_the_rest_and_says_what_went_wrong() -> None:
    """`receive_some` as trio's: bytes when they are there, a wait until they come, b"" at the peer's
    close, the OSError of a broken connection, ClosedResourceError for a stream closed meanwhile."""
    sender, receiver = await socket_pair()
    await sender.send_all(b"already here")
    assert await receive_some(receiver, 5) == b"alrea"  # never more than asked for
    assert await receive_some(receiver, 100) == b"dy here"
    got: list[bytes] = []

    async def read_one() -> None:
        got.append(await receive_some(receiver, 100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_one)
        await trio.sleep(0.05)
        assert not got  # waiting, not spinning
        await sender.send_all(b"later")
    assert got == [b"later"]
    await sender.aclose()
    assert await receive_some(receiver, 100) == b""  # the peer's close
    await receiver.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(receiver, 100)

    sender, receiver = await socket_pair()
    await receiver.send_all(b"never read")
    await sender.aclose()  # closed with bytes unread: the connection is reset
    with pytest.raises(ConnectionResetError):
        await receive_some(receiver, 100)
    await receiver.aclose()

    sender, receiver = await socket_pair()

    async def read_until_closed() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await receive_some(receiver, 100)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_until_closed)
        await trio.sleep(0.05)
        await receiver.aclose()  # another task closes the stream under the waiting read
    await sender.aclose()


async def test_a_read_in_a_cancelled_scope_takes_nothing() -> None:
    """Even with bytes waiting: they stay for the next reader, as with trio's `receive_some`."""
    sender, receiver = await socket_pair()
    await sender.send_all(b"kept")
    with trio.CancelScope() as scope:
        scope.cancel()
        await receive_some(receiver, 100)
    assert scope.cancelled_caught
    assert await receive_some(receiver, 100) == b"kept"
    for stream in (sender, receiver):
        await stream.aclose()


async def test_reading_an_answer_that_is_all_there_lets_the_other_tasks_run_between_reads() -> None:
    """A peer that sent a large answer at once is read a piece at a time between the other tasks, as
    trio's `receive_some` does: each read that needed no wait still yields to the scheduler."""
    sender, receiver = await socket_pair()
    await sender.send_all(b"x" * (8 * 4096))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.01)
        ran = []
        for _ in range(8):
            before = ticks
            assert await receive_some(receiver, 4096) == b"x" * 4096
            ran.append(ticks - before)
        nursery.cancel_scope.cancel()
    # once a read, give or take the order of each batch of runnable tasks (never at all without it)
    assert sum(ran) >= 4, f"the other task ran {ran} times during each read"
    for stream in (sender, receiver):
        await stream.aclose()
