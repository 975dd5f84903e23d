"""Web retrieval and the miner-availability routes, through the real HTTP server."""

from __future__ import annotations

import json

import pytest
import trio

from actors.availability import AvailabilitySnapshot, MinerAvailability
from tests.chat_stack import Stack
from tests.scripted_miners import DONE, chunk
from web.app import create_app

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


@pytest.mark.parametrize("body", [b"{nope", b"[" * 100_000, b"[1]"])
async def test_post_checks_the_key_before_reading_the_body(stack: Stack, body: bytes) -> None:
    response = await stack.client.post("/web_retrieval", content=body, headers={"api-key": "wrong"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert stack.miners.received == []


async def test_results_are_taken_round_robin_in_the_order_miners_were_asked(stack: Stack) -> None:
    stack.miners.scripts[9001] = results_script([page("https://1a"), page("https://1b"), page("https://1c")])
    stack.miners.scripts[9002] = results_script([page("https://2a"), page("https://shared")])
    stack.miners.scripts[9003] = results_script([page("https://shared"), page("https://3b"), page("https://3c")])
    response = await stack.client.post("/web_retrieval", json={
        "search_query": "x", "n_results": 6, "max_response_time": 5, "uids": [3, 1, 2]})
    assert response.status_code == 200, response.text
    urls = [r["url"] for r in response.json()["results"]]
    # First items of 3, 1, 2; then the second items (2's "shared" was already taken from 3); then 3's third.
    assert urls == ["https://shared", "https://1a", "https://2a", "https://3b", "https://1b", "https://3c"]
    sent = [json.loads(r.content) for r in stack.miners.received]
    assert [s["target_results"] for s in sent] == [6, 6, 6]


async def test_items_need_an_http_url_with_a_host_and_content(stack: Stack) -> None:
    items = [
        {"url": "https://ok/1", "content": "kept", "relevant": 7},
        {"url": "https://ok/2", "content": "kept too"},
        {"url": "https://ok/3", "content": ""},
        {"url": "https://ok/4", "content": None, "relevant": "why"},
        {"url": "", "content": "no url"},
        {"url": "javascript:alert(1)", "content": "a script"},
        {"url": "file:///etc/passwd", "content": "a file"},
        {"url": "ftp://host/x", "content": "not http"},
        {"url": "https://", "content": "no host"},
        {"url": "http:///path", "content": "no host either"},
        {"url": "https://[::1", "content": "unparseable"},
        {"url": "https://ok/with space", "content": "a space"},
        {"url": "https://ok/\nheader", "content": "a newline"},
        {"url": "https://ok/<script>", "content": "angle brackets (never valid unencoded)"},
        {"url": "https://ok/a>b", "content": "a closing bracket would end a research report's <url> link"},
        {"url": "https://ok/" + "x" * 2048, "content": "too long"},
        {"url": ["https://ok/5"], "content": "a list"},
        "https://ok/6",
        {"url": "HTTP://OK/7", "content": "upper case scheme"},
    ]
    stack.miners.scripts[9001] = results_script(items)
    response = await stack.client.post("/web_retrieval", json={"search_query": "x", "n_results": 100,
                                                              "uids": [1]})
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [
        {"url": "https://ok/1", "content": "kept", "relevant": None},
        {"url": "https://ok/2", "content": "kept too", "relevant": None},
        {"url": "HTTP://OK/7", "content": "upper case scheme", "relevant": None},
    ]


async def test_a_url_of_2048_characters_is_kept_and_long_texts_are_cut(stack: Stack) -> None:
    url = "https://ok/" + "x" * (2048 - len("https://ok/"))
    stack.miners.scripts[9001] = results_script([{"url": url, "content": "c" * 50_000, "relevant": "r" * 5_000}])
    response = await stack.client.post("/web_retrieval", json={"search_query": "x", "uids": [1]})
    [result] = response.json()["results"]
    assert result["url"] == url
    assert result["content"] == "c" * 20_000 and result["relevant"] == "r" * 2_000


async def test_a_double_encoded_answer_is_accepted(stack: Stack) -> None:
    stack.miners.scripts[9001] = results_script(json.dumps([page("https://twice")]))
    response = await stack.client.post("/web_retrieval", json={"search_query": "x", "uids": [1]})
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [page("https://twice")]


def deep(levels: int) -> str:
    return '{"url": ' * levels + '"https://deep"' + "}" * levels


@pytest.mark.parametrize(("answer", "reason"), [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 32"),
    ("[" + deep(40) + "]", "nested deeper than 32"),
    (json.dumps("[" * 5_000 + "]" * 5_000), "nested deeper than 32"),
    ("{oops", "not valid JSON"),
    (json.dumps({"url": "https://a", "content": "an object, not a list"}), "not a list"),
    (json.dumps([{"url": "ftp://a", "content": "c"}]), "none with an http(s) url and content"),
])
async def test_a_hostile_answer_is_that_miners_failure(stack: Stack, answer: str, reason: str) -> None:
    stack.miners.scripts[9001] = [(0.0, chunk(answer)), (0.0, chunk(None, "stop")), (0.0, DONE)]
    stack.miners.scripts[9002] = results_script([page("https://fine")])
    stack.miners.scripts[9003] = 500
    response = await stack.client.post("/web_retrieval", json={"search_query": "x", "uids": [1, 2, 3]})
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [page("https://fine")]
    alone = await stack.client.post("/web_retrieval", json={"search_query": "x", "uids": [1, 3]})
    assert alone.status_code == 502, alone.text
    details = alone.json()["error"]["details"]
    assert reason in details["1"] and details["3"] == "HTTP 500"


async def test_a_huge_answer_is_that_miners_failure(stack: Stack) -> None:
    piece = chunk("x" * 1_000_000)
    stack.miners.scripts[9001] = [*((0.0, piece) for _ in range(5)), (0.0, chunk(None, "stop")), (0.0, DONE)]
    response = await stack.client.post("/web_retrieval", json={"search_query": "x", "uids": [1]})
    assert response.status_code == 502, response.text
    assert "over the 4000000 allowed" in response.json()["error"]["details"]["1"]


async def test_web_retrieval_waits_30_s_by_default(stack: Stack, stack_clock: object) -> None:
    """Driven over ASGI (no socket), so that the autojump clock can skip the miners' delays."""
    client = create_app(stack.gateway.services).test_client()
    late = results_script([page("https://late")])[0][1]
    stack.miners.scripts[9001] = [(25.0, late), (0.0, DONE)]
    stack.miners.scripts[9002] = [(35.0, late), (0.0, DONE)]
    started = trio.current_time()
    response = await client.post("/web_retrieval", json={"search_query": "x", "uids": [1]},
                                 headers={"api-key": stack.key})
    assert response.status_code == 200, await response.get_data()
    assert (await response.get_json())["results"] == [page("https://late")]
    assert json.loads(stack.miners.received[0].content)["timeout"] == 30
    too_late = await client.post("/web_retrieval", json={"search_query": "x", "uids": [2]},
                                 headers={"api-key": stack.key})
    assert too_late.status_code == 502
    assert (await too_late.get_json())["error"]["details"] == {"2": "no complete answer within 30s"}
    assert 55 <= trio.current_time() - started < 65


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


AVAILABILITY_ROUTES = [("POST", "/miner_availabilities/miner_availabilities"),
                       ("GET", "/miner_availabilities/get_available_miners")]


@pytest.mark.parametrize(("method", "path"), AVAILABILITY_ROUTES)
@pytest.mark.parametrize("key", [None, "wrong"])
async def test_availability_routes_need_a_key_checked_before_the_body(
        stack: Stack, method: str, path: str, key: str | None) -> None:
    publish_availability(stack)
    headers = {"api-key": key or ""}
    for body in (b"[1, 2]", b"{nope", b"[" * 100_000):
        response = await stack.client.request(method, path, content=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == ("missing_api_key" if key is None else "invalid_api_key")
        assert "1" not in response.text


@pytest.mark.parametrize(("method", "path"), AVAILABILITY_ROUTES)
async def test_availability_routes_count_against_the_key(stack: Stack, method: str, path: str) -> None:
    publish_availability(stack)
    ok = await stack.client.request(method, path, json=[1])
    assert ok.status_code == 200
    bad = await stack.client.request(method, path + ("?k=0" if method == "GET" else ""), content=b"{nope")
    assert bad.status_code == 400
    remaining = [int(r.headers["X-RateLimit-Remaining"]) for r in (ok, bad)]
    assert remaining[1] == remaining[0] - 1


async def test_miner_availabilities_bounds_the_uids_asked_for(stack: Stack) -> None:
    publish_availability(stack)
    path = "/miner_availabilities/miner_availabilities"
    at_limit = await stack.client.post(path, content=b"[" + b"1," * 65_535 + b"3]")
    assert at_limit.status_code == 200 and set(at_limit.json()) == {"1", "3"}
    over = await stack.client.post(path, content=b"[" + b"1," * 65_536 + b"3]")
    assert over.status_code == 400
    assert "At most 65536 uids" in over.json()["error"]["message"]


async def test_get_available_miners(stack: Stack) -> None:
    publish_availability(stack)
    get = stack.client.get
    assert (await get("/miner_availabilities/get_available_miners?task=InferenceTask")).json() == [2, 1]
    assert (await get(f"/miner_availabilities/get_available_miners?task=InferenceTask&model={MODEL}")).json() == [1]
    assert (await get("/miner_availabilities/get_available_miners?task=WebRetrievalTask&k=5")).json() == [2]
    assert (await get("/miner_availabilities/get_available_miners?k=1")).json() == [2]
    unknown = await get("/miner_availabilities/get_available_miners?task=Nope")
    assert unknown.status_code == 400 and "InferenceTask" in unknown.json()["error"]["message"]
