"""Web retrieval and the miner-availability routes, through the real HTTP server."""

from __future__ import annotations

import json

import pytest

from actors.availability import AvailabilitySnapshot, MinerAvailability
from tests.chat_stack import Stack, stack
from tests.scripted_miners import DONE, chunk

__all__ = ["stack"]

MODEL = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"


def results_script(items: object, *, split: bool = False) -> list[tuple[float, str]]:
    text = json.dumps(items)
    parts = [text[: len(text) // 2], text[len(text) // 2:]] if split else [text]
    return [*((0.0, chunk(p)) for p in parts), (0.0, chunk(None, "stop")), (0.0, DONE)]


def page(url: str) -> dict[str, str]:
    return {"url": url, "content": f"content of {url}", "relevant": "yes"}


async def test_get_merges_dedupes_and_limits(stack: Stack) -> None:
    stack.miners.scripts[9001] = results_script([page("https://a"), page("https://b")])
    stack.miners.scripts[9002] = results_script([page("https://b"), page("https://c"), {"no": "url"}], split=True)
    stack.miners.scripts[9003] = [(0.0, chunk("this is not json")), (0.0, DONE)]
    response = await stack.client.get("/web_retrieval", params={
        "search_query": "trio", "n_miners": 3, "n_results": 3, "max_response_time": 5})
    assert response.status_code == 200, response.text
    urls = [r["url"] for r in response.json()["results"]]
    assert len(urls) == 3 and len(set(urls)) == 3
    assert set(urls) <= {"https://a", "https://b", "https://c"}
    sent = json.loads(stack.miners.received[0].content)
    assert sent["task"] == "WebRetrievalTask" and sent["target_results"] == 3 and sent["timeout"] == 5
    assert sent["messages"] == [{"role": "user", "content": "trio"}]
    assert stack.miners.received[0].headers["target_results"] == "3"


async def test_uids_repeated_or_comma_separated(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = results_script([page(f"https://{port}")])
    response = await stack.client.get("/web_retrieval?search_query=x&uids=1&uids=3")
    assert sorted(r["url"] for r in response.json()["results"]) == ["https://9001", "https://9003"]
    response = await stack.client.get("/web_retrieval?search_query=x&uids=2,3")
    assert sorted(r["url"] for r in response.json()["results"]) == ["https://9002", "https://9003"]


async def test_post_form_of_the_predecessor(stack: Stack) -> None:
    stack.miners.scripts[9002] = results_script([page("https://only")])
    response = await stack.client.post("/web_retrieval", json={
        "search_query": "x", "n_miners": 1, "n_results": 5, "max_response_time": 3, "uids": [2]})
    assert response.status_code == 200
    assert response.json() == {"results": [page("https://only")]}


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("", "search_query"),
        ("search_query=x&n_results=0", "n_results"),
        ("search_query=x&n_miners=abc", "n_miners"),
        ("search_query=x&max_response_time=1000", "max_response_time"),
        ("search_query=x&uids=one", "uids"),
    ],
)
async def test_validation_errors(stack: Stack, query: str, param: str) -> None:
    response = await stack.client.get(f"/web_retrieval?{query}")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_no_useful_answer_is_502(stack: Stack) -> None:
    stack.miners.scripts[9001] = 500
    stack.miners.scripts[9002] = [(0.0, chunk("[]")), (0.0, DONE)]
    stack.miners.scripts[9003] = [(0.0, chunk("{oops")), (0.0, DONE)]
    response = await stack.client.get("/web_retrieval?search_query=x")
    assert response.status_code == 502


async def test_web_retrieval_needs_a_key(stack: Stack) -> None:
    response = await stack.client.get("/web_retrieval?search_query=x", headers={"api-key": "wrong"})
    assert response.status_code == 401


def publish_availability(stack: Stack) -> None:
    stack.gateway.services.availability.publish(AvailabilitySnapshot(source="validator", ever_known=True, miners={
        1: MinerAvailability(frozenset({"InferenceTask"}), frozenset({MODEL}), 0.0),
        2: MinerAvailability(frozenset({"InferenceTask", "WebRetrievalTask"}), frozenset(), 0.0),
        3: None,
    }))


async def test_miner_availabilities(stack: Stack) -> None:
    publish_availability(stack)
    response = await stack.client.post("/miner_availabilities/miner_availabilities", json=[1, 3, 7])
    body = response.json()
    assert set(body) == {"1", "3", "7"} and body["3"] is None and body["7"] is None
    assert body["1"]["task_availabilities"]["InferenceTask"] is True
    assert body["1"]["task_availabilities"]["WebRetrievalTask"] is False
    assert body["1"]["llm_model_availabilities"][MODEL] is True
    everyone = (await stack.client.post("/miner_availabilities/miner_availabilities", content=b"null")).json()
    assert set(everyone) == {"1", "2", "3"}
    bad = await stack.client.post("/miner_availabilities/miner_availabilities", json={"uids": [1]})
    assert bad.status_code == 400


async def test_get_available_miners(stack: Stack) -> None:
    publish_availability(stack)
    get = stack.client.get
    assert (await get("/miner_availabilities/get_available_miners?task=InferenceTask")).json() == [2, 1]
    assert (await get(f"/miner_availabilities/get_available_miners?task=InferenceTask&model={MODEL}")).json() == [1]
    assert (await get("/miner_availabilities/get_available_miners?task=WebRetrievalTask&k=5")).json() == [2]
    assert (await get("/miner_availabilities/get_available_miners?k=1")).json() == [2]
    unknown = await get("/miner_availabilities/get_available_miners?task=Nope")
    assert unknown.status_code == 400 and "InferenceTask" in unknown.json()["error"]["message"]
