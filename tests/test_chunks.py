"""Reading a miner's chunks: `read_events` takes a read's events as the per-event parse would."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wire import jsonio
from wire.chunks import NotAChunk, content_of, read_events
from wire.sse import DONE

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=40)
TEXT = st.none() | st.text(max_size=8) | st.integers(0, 3)
CHOICE = st.fixed_dictionaries({}, optional={"delta": st.fixed_dictionaries({}, optional={"content": TEXT}) | JSON,
                                             "message": st.fixed_dictionaries({}, optional={"content": TEXT}),
                                             "finish_reason": TEXT, "index": st.integers(0, 2)})
CHUNK = st.fixed_dictionaries({}, optional={"choices": st.lists(CHOICE, max_size=2) | JSON, "usage": JSON})
EVENT = (CHUNK.map(jsonio.dumps) | JSON.map(jsonio.dumps) | st.just(DONE)
         | st.sampled_from([b"{", b"not json", b"NaN", b"[" * 33 + b"]" * 33, b'{"a":' * 40 + b"1" + b"}" * 40]))


def one_by_one(events: list[bytes]) -> tuple[list[tuple[Any, ...]], bool]:
    """The per-event reading `read_events` stands for: `loads_bounded`, then `content_of`."""
    read = []
    for data in events:
        if data == DONE:
            return read, True
        try:
            chunk = jsonio.loads_bounded(data)
        except ValueError:
            raise NotAChunk("not valid JSON (or nested too deep)") from None
        if not isinstance(chunk, dict):
            raise NotAChunk("not a JSON object")
        read.append((data, chunk, *content_of(chunk)))
    return read, False


@given(st.lists(EVENT, max_size=6))
@example([b'{"choices":[{"delta":{"content":"a"}}]}', DONE, b"not json"])
@example([b'{"choices":[{"message":{"content":"b"},"finish_reason":"stop"}]}'])
@example([b'{"choices":[{"delta":{"content":"c"},"finish_reason":3}]}', b'{"choices":[{"delta":{"content":4}}]}'])
def test_a_read_is_taken_as_event_by_event(events: list[bytes]) -> None:
    try:
        expected: Any = one_by_one(events)
    except NotAChunk as exc:
        expected = str(exc)
    try:
        got: Any = read_events(events)
    except NotAChunk as exc:
        got = str(exc)
    assert got == expected


def test_the_chunk_text_finish_and_choice() -> None:
    data = b'{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'
    (read,), done = read_events([data])
    assert read == (data, jsonio.loads(data), "hi", None, {"index": 0, "delta": {"content": "hi"}, "finish_reason": None})
    assert not done


@pytest.mark.parametrize(("data", "why"), [(b"[1]", "not a JSON object"), (b"{", "not valid JSON"),
                                           (b"[" * 33 + b"]" * 33, "nested too deep")])
def test_a_bad_event_refuses_the_whole_read(data: bytes, why: str) -> None:
    with pytest.raises(NotAChunk, match=why):
        read_events([b'{"choices":[]}', data])
