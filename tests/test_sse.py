"""Parsing miners' event streams from raw bytes, however the network splits them."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wire.sse import SseData, SseTooLarge, _split_lines, encode_event

STREAM = (b": a comment\r\n"
          b"data: {\"a\": 1}\r\n\r\n"
          b"event: note\ndata:{\"b\":2}\n\n"
          b"data: line one\ndata: line two\n\n"
          b"id: 7\rdata: [DONE]\r\r")
EVENTS = [b'{"a": 1}', b'{"b":2}', b"line one\nline two", b"[DONE]"]


def parse(pieces: list[bytes], limit: int = 200_000) -> list[bytes]:
    parser = SseData(limit)
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.end()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_every_line_ending_and_field() -> None:
    assert parse([STREAM]) == EVENTS


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_the_events_do_not_depend_on_where_the_bytes_are_cut(cuts: list[int]) -> None:
    assert parse(split_at(STREAM, cuts)) == EVENTS


def test_a_last_event_without_its_blank_line_still_counts() -> None:
    assert parse([b"data: {}\n\ndata: tail"]) == [b"{}", b"tail"]


def test_encoded_events_parse_back() -> None:
    payload = {"choices": [{"delta": {"content": "h\u00e9\n\u2603"}}]}
    assert parse([encode_event(payload), encode_event("[DONE]")]) == [encode_event(payload)[6:-2], b"[DONE]"]


def test_a_long_line_in_many_pieces_is_one_event() -> None:
    line = b"data: " + b"x" * 100_000
    pieces = [line[i:i + 100] for i in range(0, len(line), 100)] + [b"\n\ndata: [DONE]\n\n"]
    assert parse(pieces) == [b"x" * 100_000, b"[DONE]"]


def test_a_line_over_the_limit_is_refused_before_it_ends() -> None:
    parser = SseData(1000)
    assert parser.feed(b"data: [1]\n\n") == [b"[1]"]
    parser.feed(b"data: " + b"x" * 900)
    with pytest.raises(SseTooLarge):
        parser.feed(b"x" * 200)  # no line end in sight: refused now, not when (if ever) it ends


@pytest.mark.parametrize("stream", [
    b"data: " + b"y" * 2000 + b"\n\n",  # one whole line in one piece
    b"data: " + b"z" * 600 + b"\ndata: " + b"z" * 600 + b"\n\n",  # an event of many lines
])
def test_an_event_over_the_limit_is_refused(stream: bytes) -> None:
    with pytest.raises(SseTooLarge):
        parse([stream], limit=1000)
    assert parse([stream], limit=5000)


def line_by_line(stream: bytes, limit: int = 200_000) -> list[bytes]:
    """The events as the general line parser finds them (the reference for the whole-piece path)."""
    parser = SseData(limit)
    lines, _ = _split_lines(stream + b"\n\n")
    return parser._events(lines)


EVENT_DATA = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
OTHER_LINES = st.sampled_from([b": keep-alive", b"event: x", b"data:no-space", b"id: 3", b"", b"data: a\ndata: b"])


@given(st.lists(st.one_of(EVENT_DATA.map(lambda d: b"data: " + d), OTHER_LINES), max_size=12),
       st.lists(st.integers(min_value=0, max_value=2_000), max_size=8))
def test_lf_streams_of_data_lines_parse_as_line_by_line_wherever_cut(blocks: list[bytes], cuts: list[int]) -> None:
    """Pieces of one `data: ` line per event take a faster path; any other line sends the piece line by
    line. The events are the same either way, and however the bytes are cut."""
    stream = b"".join(block + b"\n\n" for block in blocks)
    expected = line_by_line(stream)
    assert parse([stream]) == expected
    assert parse(split_at(stream, cuts)) == expected


def test_a_long_event_taken_whole_is_still_refused_over_the_limit() -> None:
    with pytest.raises(SseTooLarge):
        parse([b"data: 1\n\ndata: " + b"q" * 1500 + b"\n\n"], limit=1000)


def test_a_long_line_after_the_last_event_of_a_read_costs_none_of_its_events() -> None:
    """The events a read ended come out; a line not ended yet and over the limit is refused with the next
    piece (or the end), as the line parser does: a miner's [DONE] is not lost to what follows it."""
    parser = SseData(1000)
    assert parser.feed(b"data: 1\n\ndata: [DONE]\n\n" + b"x" * 1001) == [b"1", b"[DONE]"]
    with pytest.raises(SseTooLarge):
        parser.feed(b"x")
    parser = SseData(1000)
    assert parser.feed(b"data: 1\n\n" + b"x" * 1001) == [b"1"]
    with pytest.raises(SseTooLarge):
        parser.end()


class LineByLine(SseData):
    """The parser without its whole-piece path: every piece line by line."""

    def _single_lines(self, piece: bytes) -> tuple[list[bytes], bytes]:
        return [], piece


def outcome(parser: SseData, pieces: list[bytes]) -> list[bytes] | str:
    events: list[bytes] = []
    try:
        for piece in pieces:
            events += parser.feed(piece)
        return events + parser.end()
    except SseTooLarge:
        return f"refused after {len(events)} events"


@given(st.lists(st.one_of(st.binary(max_size=60).map(lambda b: b"data: " + b.replace(b"\n", b"").replace(b"\r", b"")),
                          OTHER_LINES), max_size=10),
       st.booleans(), st.integers(min_value=8, max_value=70), st.lists(st.integers(min_value=0, max_value=800), max_size=6))
@example([b"data: 1", b"data: [DONE]", b"data: " + b"x" * 40], False, 20, [])  # a long line after [DONE]
def test_within_and_over_the_limit_the_whole_piece_path_is_the_line_parser(
        blocks: list[bytes], ended: bool, limit: int, cuts: list[int]) -> None:
    """Same events, and refused at the same event, whatever the limit, the cuts, or a last line not ended."""
    stream = b"".join(block + b"\n\n" for block in blocks)
    if not ended and blocks:
        stream = stream[:-2]
    pieces = split_at(stream, cuts)
    assert outcome(SseData(limit), pieces) == outcome(LineByLine(limit), pieces)
