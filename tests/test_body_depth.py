"""Request bodies nested too deeply are the client's 400, on every route that reads a JSON body."""

from __future__ import annotations

import json

import pytest

from tests.chat_stack import Stack
from tests.scripted_miners import answer

BRACKETS = b"[" * 100_000
OBJECTS = b'{"a":' * 40 + b"1" + b"}" * 40


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/web_retrieval"])
@pytest.mark.parametrize("body", [BRACKETS, OBJECTS], ids=["brackets", "objects"])
async def test_a_body_nested_too_deeply_is_400(stack: Stack, path: str, body: bytes) -> None:
    response = await stack.client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and "nested too deeply" in error["message"]
    assert stack.miners.received == []
    # The gateway goes on serving.
    assert (await stack.client.get("/health")).status_code == 200


async def test_a_body_nested_within_the_limit_is_served(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer(["hi"])
    extra = json.loads('{"a":' * 30 + "1" + "}" * 30)  # with the body object itself: 31 levels
    response = await stack.chat(metadata=extra)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hi"
