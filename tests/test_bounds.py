"""Bounds an attacker would otherwise push past: explicit uids, research runs, the pool's answer bytes."""

from __future__ import annotations

import pytest

from tests.chat_stack import Stack


@pytest.mark.parametrize("count", [17, 5000])
async def test_a_chat_request_names_at_most_16_uids(stack: Stack, count: int) -> None:
    response = await stack.chat(uids=list(range(count)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "uids"
    assert "at most 16" in error["message"] and len(error["message"]) < 200
    assert stack.miners.received == []


async def test_sixteen_uids_are_accepted_and_unknown_ones_named_briefly(stack: Stack) -> None:
    response = await stack.chat(uids=[1, *range(100, 115)])  # 16 uids, 15 of them unknown
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "uids" and error["code"] == "unknown_uid"
    assert error["message"] == "uids not in the metagraph: 100, 101, 102 and 12 more."


@pytest.mark.parametrize("post", [False, True])
async def test_web_retrieval_names_at_most_64_uids(stack: Stack, post: bool) -> None:
    uids = list(range(1000, 1065))
    if post:
        response = await stack.client.post("/web_retrieval", json={"search_query": "x", "uids": uids})
    else:
        response = await stack.client.get("/web_retrieval", params={"search_query": "x",
                                                                    "uids": ",".join(map(str, uids))})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "uids"
    assert "at most 64" in error["message"] and len(error["message"]) < 200
    assert stack.miners.received == []


async def test_web_retrieval_names_few_unknown_uids(stack: Stack) -> None:
    response = await stack.client.post("/web_retrieval", json={"search_query": "x", "uids": list(range(1000, 1064))})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "uids not in the metagraph: 1000, 1001, 1002 and 61 more."
