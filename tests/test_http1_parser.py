"""The I/O-free response parser (`wire.http1.ResponseParser`) against h11, the parser httpx uses:
for any response, valid or corrupted, cut anywhere, both give the same status, headers and body, or
both refuse. Where we are stricter on purpose, the test says so (`STRICTER_ON_PURPOSE`). Then every
limit, exactly at it and one byte over."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import h11
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wire.http1 import NEED_DATA, End, Limits, ResponseHead, ResponseParser

Fields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Parsed:
    status: int
    reason: bytes
    headers: Fields
    body: bytes
    trailers: Fields
    keep_alive: bool


@dataclass(frozen=True)
class Refused:
    reason: str


def normal(fields: Fields | list[tuple[bytes, bytes]]) -> Fields:
    """Headers as both parsers agree on them. h11 keeps one of repeated equal Content-Length headers
    (and "5, 5" as "5") and lower-cases the Transfer-Encoding value; the length shows in the body
    anyway, so Content-Length is left out on both sides, and Transfer-Encoding compared in lower case."""
    return tuple((name, value.lower() if name.lower() == b"transfer-encoding" else value)
                 for name, value in fields if name.lower() != b"content-length")


def ours(pieces: list[bytes], method: bytes = b"POST", limits: Limits | None = None) -> Parsed | Refused:
    parser = ResponseParser(limits or Limits())
    parser.start(method)
    feed = iter([*pieces, b""])
    largest = max((len(piece) for piece in pieces), default=0)
    head: ResponseHead | None = None
    body: list[bytes] = []
    try:
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                parser.feed(next(feed))  # StopIteration here: it asked for more after the close
            elif isinstance(event, ResponseHead):
                assert head is None and not body
                head = event
            elif isinstance(event, bytes):
                assert head is not None and event
                assert len(event) <= largest  # never more than one piece: nothing is accumulated
                body.append(event)
            else:
                assert isinstance(event, End) and head is not None
                return Parsed(head.status, head.reason, normal(head.headers), b"".join(body),
                              normal(event.trailers), head.keep_alive)
    except httpx.RemoteProtocolError as exc:
        return Refused(str(exc))


def theirs(pieces: list[bytes], method: bytes = b"POST") -> tuple[Parsed | Refused, set[bytes]]:
    """h11's reading, and the HTTP versions of the heads it took."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 30)  # ours are in Limits
    connection.send(h11.Request(method=method, target="/", headers=[("Host", "miner")]))
    connection.send(h11.EndOfMessage())
    versions: set[bytes] = set()
    head: h11.Response | None = None
    body = bytearray()
    try:
        for piece in [*pieces, b""]:
            connection.receive_data(piece)
            while (event := connection.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.InformationalResponse):
                    versions.add(event.http_version)
                elif isinstance(event, h11.Response):
                    versions.add(event.http_version)
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    # A body that ran to the close leaves h11 DONE too; the connection is gone all the same.
                    keep_alive = connection.their_state is h11.DONE and piece != b""
                    return Parsed(head.status_code, head.reason, normal(head.headers.raw_items()), bytes(body),
                                  normal(event.headers.raw_items()), keep_alive), versions
                else:
                    assert isinstance(event, h11.ConnectionClosed)
                    return Refused("closed before the end"), versions
    except h11.RemoteProtocolError as exc:
        return Refused(str(exc)), versions
    raise AssertionError("h11 wanted more after the close")


# Where we refuse what h11 takes, on purpose (each a leniency that lets a peer's answer mean two
# things to two parsers, the root of response smuggling):
STRICTER_ON_PURPOSE = (
    "bare LF",  # h11 also ends head and trailer lines with LF alone; we take CRLF only
    "obsolete line folding",  # h11 joins a line starting with a space to the one before; we refuse it
    "not an HTTP/1.1 status line",  # h11 takes any "HTTP/d.d"; we take 1.0 and 1.1 only (checked below)
)


def assert_same(pieces: list[bytes], method: bytes = b"POST") -> None:
    mine = ours(pieces, method)
    reference, versions = theirs(pieces, method)
    if isinstance(mine, Refused) and isinstance(reference, Refused):
        return
    if isinstance(mine, Refused) and isinstance(reference, Parsed):
        reason = next((r for r in STRICTER_ON_PURPOSE if mine.reason.startswith(r)), None)
        assert reason is not None, (mine, reference)
        if reason == "not an HTTP/1.1 status line":
            assert versions - {b"1.0", b"1.1"}, (mine, reference)  # the only status line h11 takes and we do not
        return
    assert mine == reference


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(edges)] or [b""]


# -- valid responses -----------------------------------------------------------------------------

token = st.text("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=12).map(str.encode).filter(
    lambda name: name.lower() not in (b"content-length", b"transfer-encoding", b"connection"))
visible = st.binary(min_size=1, max_size=8).map(lambda b: bytes(c if c > 0x20 and c != 0x7f else 0x61 for c in b))
field_value = st.lists(visible, max_size=4).map(b" ".join)
ows = st.sampled_from([b"", b" ", b"\t", b"  "])


@st.composite
def header_line(draw: st.DrawFn) -> bytes:
    return draw(token) + b":" + draw(ows) + draw(field_value) + draw(ows)


@st.composite
def head(draw: st.DrawFn, status: int, framing: list[bytes]) -> bytes:
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    reason = draw(st.one_of(st.none(), st.sampled_from([b"", b"OK", b"Not Found", b"weird \x80\xff reason"])))
    lines = [b"HTTP/" + version + b" %03d" % status + (b"" if reason is None else b" " + reason)]
    lines += draw(st.lists(header_line(), max_size=6))
    lines += framing
    if draw(st.booleans()):
        lines.append(b"Connection: " + draw(st.sampled_from([b"close", b"keep-alive", b"Keep-Alive, Close", b"upgrade"])))
    if draw(st.booleans()):
        lines.append(b"Content-Encoding: " + draw(st.sampled_from([b"identity", b"gzip"])))  # the pool refuses these
    order = draw(st.permutations(range(1, len(lines))))
    return b"\r\n".join([lines[0]] + [lines[i] for i in order]) + b"\r\n\r\n"


@st.composite
def chunked_body(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """The framed body, and the data it carries."""
    data = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=6))
    framed = b""
    for part in data:
        size = b"%x" % len(part)
        size = draw(st.sampled_from([size, size.upper(), b"000" + size]))
        extension = draw(st.sampled_from([b"", b";ext", b";name=value", b';q="a b"', b" \t"]))
        framed += size + extension + b"\r\n" + part + b"\r\n"
    framed += draw(st.sampled_from([b"0", b"000", b"0;last"])) + b"\r\n"
    framed += b"".join(line + b"\r\n" for line in draw(st.lists(header_line(), max_size=3))) + b"\r\n"
    return framed, b"".join(data)


@st.composite
def valid_response(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A response and the method it answers."""
    method = draw(st.sampled_from([b"POST", b"POST", b"POST", b"HEAD"]))
    raw = b""
    for _ in range(draw(st.integers(0, 2))):
        raw += draw(head(draw(st.sampled_from([100, 102, 103, 199])), []))
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500, 503, 299, 599]))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if framing == "length":
        body = draw(st.binary(max_size=400))
        length = b"%d" % len(body)
        lines = [b"Content-Length: " + draw(st.sampled_from([length, length + b", " + length, b"00" + length]))]
        if draw(st.booleans()):
            lines.append(b"content-length: " + lines[0].split(b": ")[1])
        raw += draw(head(status, lines)) + body
    elif framing == "chunked":
        framed, _ = draw(chunked_body())
        coding = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED"]))
        lines = [b"Transfer-Encoding: " + coding] + ([b"Content-Length: 3"] if draw(st.booleans()) else [])
        raw += draw(head(status, lines)) + framed
    else:
        raw += draw(head(status, [])) + draw(st.binary(max_size=400))
    if framing != "close":
        raw += draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"garbage after the end"]))
    return raw, method


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_response(), st.lists(st.integers(min_value=0), max_size=6))
@example((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nT: 1\r\n\r\n", b"POST"), [])
def test_valid_responses_cut_anywhere_read_as_h11_reads_them(response: tuple[bytes, bytes], points: list[int]) -> None:
    raw, method = response
    pieces = cuts(raw, points)
    mine = ours(pieces, method)
    assert isinstance(mine, Parsed)  # valid: no leniency of h11's is needed, none may differ
    assert mine == theirs(pieces, method)[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_response(), st.lists(st.integers(min_value=0), max_size=6))
@example((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"POST"), [])
@example((b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"POST"), [])
def test_an_end_said_received_is_reached_without_more_bytes(response: tuple[bytes, bytes], points: list[int]) -> None:
    """Wherever the bytes are cut: once the parser says the body's end is among the bytes fed, it reaches
    `End` without another feed; and the whole response fed at once, with its end, always says so."""
    raw, method = response
    parser = ResponseParser()
    parser.start(method)
    said = False
    for piece in cuts(raw, points):
        parser.feed(piece)
        while (event := parser.next_event()) is not NEED_DATA:
            if isinstance(event, End):
                return
            if parser.end_received:
                said = True
        if said:
            raise AssertionError("the end was said to be received, but more bytes were needed")


def test_the_usual_answers_say_their_end_came_with_their_last_data() -> None:
    for raw in (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\ndata: [DONE]",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\ndata: [DONE]\r\n0\r\n\r\n"):
        parser = ResponseParser()
        parser.start(b"POST")
        parser.feed(raw)
        assert isinstance(parser.next_event(), ResponseHead)
        assert parser.next_event() == b"data: [DONE]" and parser.end_received
        assert isinstance(parser.next_event(), End)
    parser = ResponseParser()
    parser.start(b"POST")
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\ndata: [DONE]\r\n")
    assert isinstance(parser.next_event(), ResponseHead)
    assert parser.next_event() == b"data: [DONE]" and not parser.end_received  # the last chunk is to come


# -- corrupted responses -------------------------------------------------------------------------

NASTY = b"\r\n \t:;0aAfFgG\x00\x0b\x7f\xff,-"


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[bytes, bytes]:
    raw, method = draw(valid_response())
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        byte = draw(st.sampled_from(NASTY))
        match draw(st.sampled_from(["replace", "insert", "delete", "truncate", "repeat"])):
            case "replace":
                data[at] = byte
            case "insert":
                data.insert(at, byte)
            case "delete":
                del data[at]
            case "truncate":
                del data[at:]
            case _:
                data[at:at] = data[at:at + draw(st.integers(1, 40))]
    return bytes(data), method


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corrupted(), st.lists(st.integers(min_value=0), max_size=5))
def test_corrupted_responses_cut_anywhere_are_read_as_h11_reads_them_or_refused_by_both(
        response: tuple[bytes, bytes], points: list[int]) -> None:
    raw, method = response
    assert_same(cuts(raw, points), method)


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b \t c\r\n\r\n"
    b"19;ext=1\r\ndata: {\"a\": 1}\n\ndata: [DO\r\n4\r\nNE]\n\r\n0\r\nT: v\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 201 Created\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nthe body runs to the close",
])
def test_every_single_cut_of_typical_answers(raw: bytes) -> None:
    for at in range(1, len(raw)):
        assert isinstance(ours([raw[:at], raw[at:]]), Parsed)
        assert_same([raw[:at], raw[at:]])
    assert_same([raw[i:i + 1] for i in range(len(raw))])


@pytest.mark.parametrize(("raw", "reason"), [
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "bare LF"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX: 1\r\n\r\nok", "bare LF"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\n", "bare LF"),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok", "obsolete line folding"),
    (b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "not an HTTP/1.1 status line"),
])
def test_what_h11_takes_and_we_refuse_on_purpose(raw: bytes, reason: str) -> None:
    assert isinstance(theirs([raw])[0], Parsed)
    refused = ours([raw])
    assert isinstance(refused, Refused) and refused.reason.startswith(reason)
    assert_same([raw])


def test_a_bare_lf_head_is_refused_before_the_close() -> None:
    """Not held until the peer closes or the gateway's timeout: at once."""
    parser = ResponseParser()
    parser.start(b"POST")
    parser.feed(b"HTTP/1.1 200 OK\nContent-Type: text/plain\n")
    with pytest.raises(httpx.RemoteProtocolError, match="bare LF"):
        parser.next_event()
    with pytest.raises(httpx.RemoteProtocolError):
        parser.next_event()  # and it stays broken


def test_garbage_is_refused_at_its_first_bytes() -> None:
    parser = ResponseParser()
    parser.start(b"POST")
    parser.feed(b"\x16\x03\x01")  # a TLS answer
    with pytest.raises(httpx.RemoteProtocolError, match=r"not an HTTP/1\.1 status line"):
        parser.next_event()


# -- limits --------------------------------------------------------------------------------------

SMALL = Limits(head_bytes=200, header_line_bytes=60, headers=5, chunk_line_bytes=20, trailer_bytes=50,
               informational=2)


def response_with(*, headers: list[bytes] = (), informational: int = 0, chunk_line: bytes = b"2",
                  trailers: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    return (b"HTTP/1.1 100 Continue\r\n\r\n" * informational
            + b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in headers)
            + b"Transfer-Encoding: chunked\r\n\r\n" + chunk_line + b"\r\nok\r\n0\r\n"
            + b"".join(t + b"\r\n" for t in trailers) + b"\r\n")


def at_and_over(limit: int, make: Callable[[int], bytes], limits: Limits = SMALL) -> None:
    """`make(n)` builds a response using n of the limited thing: n = limit passes, limit + 1 fails,
    whole or fed a byte at a time."""
    for pieces in (lambda raw: [raw], lambda raw: [raw[i:i + 1] for i in range(len(raw))]):
        at = ours(pieces(make(limit)), limits=limits)
        assert isinstance(at, Parsed) and at.body == b"ok", at
        over = ours(pieces(make(limit + 1)), limits=limits)
        assert isinstance(over, Refused), over


def test_the_head_size_is_limited() -> None:
    base = len(response_with().split(b"\r\n\r\n")[0]) + 4 + len(b"X: \r\n")
    at_and_over(SMALL.head_bytes, lambda n: response_with(headers=[b"X: " + b"v" * (n - base)]),
                dataclasses.replace(SMALL, header_line_bytes=1000))


def test_one_header_line_is_limited() -> None:
    at_and_over(SMALL.header_line_bytes, lambda n: response_with(headers=[b"X: " + b"v" * (n - 3)]))


def test_the_number_of_headers_is_limited() -> None:
    at_and_over(SMALL.headers, lambda n: response_with(headers=[b"X: 1"] * (n - 1)))  # + Transfer-Encoding


def test_the_chunk_size_line_is_limited() -> None:
    at_and_over(SMALL.chunk_line_bytes, lambda n: response_with(chunk_line=b"2;" + b"e" * (n - 2)))


def test_the_trailers_are_limited_in_all() -> None:
    at_and_over(SMALL.trailer_bytes, lambda n: response_with(trailers=[b"T: " + b"v" * (n - 7)]))


def test_endless_trailers_are_refused() -> None:
    many = Limits(trailer_bytes=1 << 20, headers=5)
    raw = response_with(trailers=[b"T: 1"] * 6)
    assert isinstance(ours([raw], limits=dataclasses.replace(many, headers=6)), Parsed)
    refused = ours([raw], limits=many)
    assert isinstance(refused, Refused) and "more than 5 trailer lines" in refused.reason


def test_informational_heads_are_limited() -> None:
    at_and_over(SMALL.informational, lambda n: response_with(informational=n))


def test_endless_informational_heads_are_refused_with_the_default_limits() -> None:
    parser = ResponseParser()
    parser.start(b"POST")
    with pytest.raises(httpx.RemoteProtocolError, match="more than 8 informational"):
        for _ in range(1000):
            parser.feed(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            assert parser.next_event() is NEED_DATA


def test_one_huge_chunk_comes_out_as_it_is_fed() -> None:
    parser = ResponseParser()
    parser.start(b"POST")
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (1 << 40))
    assert isinstance(parser.next_event(), ResponseHead)
    for _ in range(100):
        parser.feed(b"x" * 65536)
        assert parser.next_event() == b"x" * 65536
        assert parser.next_event() is NEED_DATA
    assert parser.pending == 0
