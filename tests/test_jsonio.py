"""Hot-path JSON: orjson's output, and the standard library's where orjson refuses a value."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import jsonio


def test_compact_utf8_as_the_standard_library_reads_it() -> None:
    value = {"text": "h\u00e9 \u2603", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    encoded = jsonio.dumps(value)
    assert b" " not in encoded.replace("h\u00e9 \u2603".encode(), b"")
    assert json.loads(encoded) == value and jsonio.loads(encoded) == value


@pytest.mark.parametrize("value", [{"text": "lone \ud800 surrogate"}, {"seed": 2**70}])
def test_what_orjson_refuses_is_written_by_the_standard_library(value: dict[str, object]) -> None:
    assert json.loads(jsonio.dumps(value)) == value


def test_not_json_at_all_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        jsonio.dumps({"choices": {1, 2}})


@pytest.mark.parametrize("text", [b"NaN", b'{"a": Infinity}', b"{'a': 1}", b'"\\ud800"'])
def test_parsing_is_strict(text: bytes) -> None:
    with pytest.raises(ValueError):
        jsonio.loads(text)


@pytest.mark.parametrize("loads", [jsonio.loads_bounded, lambda data: jsonio.loads_bounded(data.decode())])
def test_bounded_parsing_refuses_deep_nesting(loads: object) -> None:
    assert callable(loads)
    assert loads(b"[" * 32 + b"]" * 32) == eval("[" * 32 + "]" * 32)
    for text in (b"[" * 33 + b"]" * 33, b'{"a":' * 40 + b"1" + b"}" * 40, b"[" * 100_000):
        with pytest.raises(ValueError):
            loads(text)


def test_bounded_parsing_counts_depth_not_brackets() -> None:
    wide = jsonio.dumps({"items": [{"k": [1]} for _ in range(1000)], "text": "[[[[{{{{" * 100})
    assert jsonio.loads_bounded(wide, max_depth=4)["items"][0] == {"k": [1]}
    with pytest.raises(jsonio.TooDeep):
        jsonio.loads_bounded(wide, max_depth=3)


@given(st.binary(max_size=200))
def test_the_bracket_count_is_one_of_each_opener(data: bytes) -> None:
    assert len(data.translate(None, jsonio.NOT_OPENERS)) == data.count(b"{") + data.count(b"[")
