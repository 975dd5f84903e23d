"""The load generator: a minimal HTTP/1.1 keep-alive client on trio sockets.

It must cost far less than what it measures, so it does no header parsing beyond what framing needs
(status, Content-Length, chunked encoding), builds each request's bytes once per target (or signs them
per request for a miner), and finds tokens in SSE events with one regular expression instead of
parsing JSON. Concurrency is the number of keep-alive connections, each issuing requests in a loop
until a shared request count or a deadline is reached.
"""

from __future__ import annotations

import re
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

READ_SIZE = 65536
MAX_HEAD = 65536
# A text delta: `"content":"x...` (compact or not), never `"content":[` (logprobs) or `"content":""`.
_TOKEN = re.compile(rb'"content":\s?"[^"]')
_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]"


class ProtocolError(Exception):
    """The server's answer could not be framed as HTTP/1.1."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, default_path: str = "/") -> Endpoint:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http://host:port URL, not {url!r}")
        return cls(parts.hostname, parts.port or 80, parts.path or default_path)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def request_bytes(endpoint: Endpoint, body: bytes, headers: dict[str, str]) -> bytes:
    """One POST, ready to write; `Content-Length` framing, keep-alive."""
    lines = [f"POST {endpoint.path} HTTP/1.1", f"Host: {endpoint.host}:{endpoint.port}",
             f"Content-Length: {len(body)}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(slots=True)
class Exchange:
    """What one request/response pair showed the client."""

    status: int = 0
    first_token: float | None = None  # perf_counter time of the first content token
    last_token: float | None = None
    tokens: int = 0
    done: bool = False  # the SSE stream ended with [DONE]
    body_bytes: int = 0
    close: bool = False  # the server will close the connection
    body: bytes | None = None  # the whole body, when asked for (`keep_body`)


class SseScanner:
    """Counts content tokens in an SSE body as it arrives, and notes when the first and last came."""

    __slots__ = ("_pending", "exchange", "on_first_token")

    def __init__(self, exchange: Exchange, on_first_token: Callable[[], None] | None = None) -> None:
        self.exchange = exchange
        self.on_first_token = on_first_token
        self._pending = b""

    def feed(self, data: bytes) -> None:
        buffer = self._pending + data if self._pending else data
        start = 0
        now = 0.0
        while (end := buffer.find(_EVENT_END, start)) >= 0:
            event = buffer[start:end]
            start = end + 2
            if _TOKEN.search(event) is not None:
                now = now or time.perf_counter()
                if self.exchange.first_token is None:
                    self.exchange.first_token = now
                    if self.on_first_token is not None:
                        self.on_first_token()
                self.exchange.last_token = now
                self.exchange.tokens += 1
            elif event.startswith(_DONE):
                self.exchange.done = True
        self._pending = buffer[start:]


class Connection:
    """One keep-alive connection; `exchange` sends a request and reads its whole answer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def open(cls, endpoint: Endpoint) -> Connection:
        stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(stream)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.stream.aclose()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(READ_SIZE)
        if not data:
            raise ProtocolError("connection closed by the server")
        self._buffer += data

    async def _take_until(self, marker: bytes, limit: int = MAX_HEAD) -> bytes:
        while (at := self._buffer.find(marker)) < 0:
            if len(self._buffer) > limit:
                raise ProtocolError(f"no {marker!r} within {limit} bytes")
            await self._fill()
        out = bytes(self._buffer[:at])
        del self._buffer[: at + len(marker)]
        return out

    async def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def exchange(self, request: bytes, *, scan: bool,
                       on_first_token: Callable[[], None] | None = None, keep_body: bool = False) -> Exchange:
        """Send one request, read the answer to its end; with `scan`, count SSE tokens as they come;
        with `keep_body`, keep the body (small answers only: it is held whole)."""
        result = Exchange()
        kept: list[bytes] | None = [] if keep_body else None
        scanner = SseScanner(result, on_first_token) if scan else None
        await self.stream.send_all(request)
        head = await self._take_until(b"\r\n\r\n")
        status_line, _, header_block = head.partition(b"\r\n")
        try:
            result.status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"bad status line {status_line[:80]!r}") from None
        length: int | None = None
        chunked = False
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                result.close = b"close" in value.lower()
        if chunked:
            while True:
                size_line = await self._take_until(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    await self._take_until(b"\r\n")  # no trailers are expected
                    break
                data = await self._take(size + 2)
                result.body_bytes += size
                if kept is not None:
                    kept.append(data[:size])
                if scanner is not None:
                    scanner.feed(data[:size])
        elif length is not None:
            remaining = length
            while remaining > 0:
                if not self._buffer:
                    await self._fill()
                piece = bytes(self._buffer[:remaining])
                del self._buffer[: len(piece)]
                remaining -= len(piece)
                result.body_bytes += len(piece)
                if kept is not None:
                    kept.append(piece)
                if scanner is not None:
                    scanner.feed(piece)
        else:
            raise ProtocolError("an answer without Content-Length or chunked framing")
        if kept is not None:
            result.body = b"".join(kept)
        return result


@dataclass
class LoadResult:
    """Everything one load phase measured, raw; `bench.report` turns it into figures."""

    concurrency: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    ttfts: list[float] = field(default_factory=list)  # seconds to the first content token
    token_rates: list[float] = field(default_factory=list)  # tokens/s per stream, request to last token
    tokens: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the load generator's own CPU (user + system) during the phase
    started_at: float = 0.0  # time.perf_counter() when the measured interval began

    @property
    def completed(self) -> int:
        return len(self.latencies)


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


RequestFactory = Callable[[], bytes]


async def run_load(
    endpoint: Endpoint,
    make_request: RequestFactory,
    *,
    concurrency: int,
    max_requests: int,
    duration_s: float,
    stream: bool,
    request_timeout_s: float = 30.0,
    warmup: int = 1,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> LoadResult:
    """`concurrency` connections issue requests until `max_requests` are done or `duration_s` passes.

    Each connection first sends `warmup` requests that are not measured (connection set-up, the
    server's first-use costs). A request that fails or times out is counted as an error and its
    connection is replaced. `on_start` and `on_stop` run when the measured interval starts and ends
    (to sample other processes over the same interval).
    """
    result = LoadResult(concurrency=concurrency)
    issued = 0
    deadline = 0.0

    def claim() -> bool:
        nonlocal issued
        if issued >= max_requests or time.perf_counter() >= deadline:
            return False
        issued += 1
        return True

    async def one(conn: Connection, record: bool) -> Connection | None:
        start = time.perf_counter()
        try:
            with trio.fail_after(request_timeout_s):
                exchange = await conn.exchange(make_request(), scan=stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, ValueError,
                trio.TooSlowError):
            if record:
                result.errors += 1
            await conn.aclose()
            return None
        end = time.perf_counter()
        if record:
            result.statuses[exchange.status] = result.statuses.get(exchange.status, 0) + 1
            if exchange.status != 200:
                result.errors += 1
            else:
                result.latencies.append(end - start)
                result.tokens += exchange.tokens
                if exchange.first_token is not None:
                    result.ttfts.append(exchange.first_token - start)
                    # tokens over the stream's life up to its last token (first-token wait included):
                    # a miner that answers at once would make a first-to-last rate meaningless
                    span = (exchange.last_token or end) - start
                    if span > 0:
                        result.token_rates.append(exchange.tokens / span)
        if exchange.close:
            await conn.aclose()
            return None
        return conn

    warm = 0
    all_warm = trio.Event()
    ready = trio.Event()

    async def worker(conn: Connection | None) -> None:
        nonlocal warm
        for _ in range(warmup):
            try:
                conn = conn or await Connection.open(endpoint)
            except OSError:
                break  # the measured loop counts connection failures
            conn = await one(conn, record=False)
        warm += 1
        if warm == concurrency:
            all_warm.set()
        await ready.wait()
        try:
            while claim():
                if conn is None:
                    try:
                        conn = await Connection.open(endpoint)
                    except OSError:
                        result.errors += 1
                        await trio.sleep(0.01)
                        continue
                conn = await one(conn, record=True)
        finally:
            if conn is not None:
                await conn.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            conn = await Connection.open(endpoint)
            nursery.start_soon(worker, conn)
            if i % 50 == 49:
                await trio.sleep(0.01)  # stay inside the server's listen backlog
        await all_warm.wait()  # the clock starts once every connection has warmed up
        if on_start is not None:
            on_start()
        cpu0 = cpu_seconds()
        started = result.started_at = time.perf_counter()
        deadline = started + duration_s
        ready.set()
    result.wall_s = time.perf_counter() - started
    result.cpu_s = cpu_seconds() - cpu0
    if on_stop is not None:
        on_stop()
    return result



@dataclass
class HeldStreams:
    """The open-streams phase: how many streams were open at once when `sample` ran, and its value."""

    wanted: int
    opened: int = 0  # streams that had received their first token when sampled
    finished: int = 0  # streams that then ran to [DONE]
    errors: int = 0
    sample: float | None = None
    open_s: float = 0.0  # how long it took until they were all open (or the wait gave up)


async def hold_streams(
    endpoint: Endpoint,
    make_request: RequestFactory,
    *,
    streams: int,
    sample: Callable[[], float],
    open_timeout_s: float,
    request_timeout_s: float = 120.0,
) -> HeldStreams:
    """Start `streams` streaming requests at once, call `sample()` while they are all open, then let
    them finish. Each stream counts as open from its first content token."""
    held = HeldStreams(wanted=streams)
    open_count = 0
    all_open = trio.Event()

    def opened() -> None:
        nonlocal open_count
        open_count += 1
        if open_count == streams:
            all_open.set()

    async def one(conn: Connection) -> None:
        try:
            with trio.fail_after(request_timeout_s):
                exchange = await conn.exchange(make_request(), scan=True, on_first_token=opened)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, ValueError,
                trio.TooSlowError):
            held.errors += 1
            return
        finally:
            await conn.aclose()
        if exchange.status == 200 and exchange.done:
            held.finished += 1
        else:
            held.errors += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(streams):
            try:
                conn = await Connection.open(endpoint)
            except OSError:
                held.errors += 1
                continue
            nursery.start_soon(one, conn)
            if i % 50 == 49:
                await trio.sleep(0.02)  # stay inside the server's listen backlog
        with trio.move_on_after(open_timeout_s):
            await all_open.wait()
        held.open_s = time.perf_counter() - started
        held.opened = open_count
        held.sample = sample()
    return held
