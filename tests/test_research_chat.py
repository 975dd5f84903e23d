"""Deep research through the gateway: `inference_mode: "Chain-of-Thought"` (or `test_time_inference`)
on a real gateway over a devnet on loopback, streamed, not streamed and through the official `openai`
client; its bad-JSON fault, its deadline, keep-alives while a step works, the client leaving, and what
the key is charged."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from openai import APIError

from config.settings import (
    ResearchSettings,
)
from devnet.miner import MinerFault, MinerTiming
from tests.chat_stack import sse_events
from tests.research_support import (
    CALLS,
    HEADINGS,
    QUESTION,
    SEARCHES,
    Net,
    heading_lines,
    open_net,
    text_of,
)
from web.research import MARKER_PREFIX


@pytest.fixture
async def net(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Net]:
    opened = await open_net(nursery, tmp_path)
    async with opened.client:
        yield opened
    opened.gateway.shutdown()


async def test_a_whole_run_streams_the_progress_then_the_answer_with_sources(net: Net) -> None:
    with trio.fail_after(20):
        response = await net.client.post("/v1/chat/completions", json=net.research(
            stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    text = text_of(events)
    assert heading_lines(text) == HEADINGS
    answer = text.split("## Final Answer\n\n", 1)[1]
    assert answer.startswith("In short: ")  # prose: the direct answer first, never a dict printout
    assert "{'" not in answer and '{"' not in answer
    sources = re.findall(r"<(https://[^>]+)>", answer)
    assert len(sources) == 4 and all(re.match(r"https://(docs\.example\.org|miner-\d\.example\.net)/", u)
                                     for u in sources)
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] > 100 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # each model call was an ordinary chat fan-out with upstream's parameters, each search a web retrieval
    calls = net.miner_calls()
    inference = [c for c in calls if c["task"] == "InferenceTask"]
    assert len(inference) == CALLS * 3  # every miner asked each time
    first_lines = {str(c["messages"][0]["content"]).splitlines()[0] for c in inference}
    assert first_lines == {MARKER_PREFIX + s for s in ("assess", "plan", "tools", "query", "search_answer",
                                                       "think", "update", "final")}
    assert {(c["model"], c["sampling_parameters"]["temperature"], c["sampling_parameters"]["max_new_tokens"],
             c["timeout"]) for c in inference} == {(net.settings.fanout.default_model, 0.15, 6144, 120)}
    assert len([c for c in calls if c["task"] == "WebRetrievalTask"]) == SEARCHES * 3
    # ... and each was forwarded for scoring as an ordinary organic
    validator = net.devnet.validator
    with trio.fail_after(10):
        while len([r for r in validator.received if r.path == "/scoring"]) < CALLS + SEARCHES:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert validator.misaligned == 0


async def test_test_time_inference_is_deep_research_too_and_a_greeting_needs_none(net: Net) -> None:
    response = await net.client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hello!"}], "stream": True, "test_time_inference": True})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert text_of(events) == "Hello! Ask me a question and I will research it for you."
    assert [str(c["messages"][0]["content"]).splitlines()[0] for c in net.miner_calls()] == [
        MARKER_PREFIX + "assess"] * 3


async def test_not_streamed_the_final_answer_is_one_chat_completion(net: Net) -> None:
    response = await net.client.post("/v1/chat/completions", json=net.research(model="Default"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == net.settings.fanout.default_model
    (choice,) = body["choices"]
    content = choice["message"]["content"]
    assert choice["finish_reason"] == "stop" and content.startswith("In short: ")
    assert "## " not in content.split("###", 1)[0], "the progress is for streams; the answer alone here"
    assert "### Sources" in content and len(re.findall(r"<https://", content)) == 4
    assert body["usage"]["completion_tokens"] > 100


async def test_the_run_is_one_request_against_the_key_and_its_calls_tokens_are_its_usage(net: Net) -> None:
    keys = net.gateway.services.keys
    (before,) = await keys.list_keys()
    response = await net.client.post("/v1/chat/completions", json=net.research(
        stream=True, stream_options={"include_usage": True}))
    usage = [e for e in sse_events(response.text) if isinstance(e, dict) and e.get("usage")][-1]["usage"]
    assert int(response.headers["X-RateLimit-Remaining"]) >= 10_000 - 2  # one request, not one per call
    await keys.flush()
    (after,) = await keys.list_keys()
    assert after.requests - before.requests == 1
    assert after.tokens - before.tokens == usage["completion_tokens"] > 100


async def test_the_official_openai_client_streams_the_headings_and_the_answer(net: Net) -> None:
    client = net.openai()
    stream = await client.chat.completions.create(
        model="Default", messages=[{"role": "user", "content": QUESTION}], stream=True,
        extra_body={"inference_mode": "Chain-of-Thought"})
    pieces = []
    finish = None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(pieces)
    assert heading_lines(text) == HEADINGS and finish == "stop"
    assert len(re.findall(r"<https://", text.split("## Final Answer", 1)[1])) == 4
    completion = await client.chat.completions.create(
        model="Default", messages=[{"role": "user", "content": QUESTION}],
        extra_body={"test_time_inference": True})
    assert completion.choices[0].message.content is not None
    assert completion.choices[0].message.content.startswith("In short: ")


async def test_invalid_json_from_every_miner_is_asked_again_then_an_honest_error(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path, timing=MinerTiming(first_token_s=0.05, token_s=0.0),
                         research=ResearchSettings(json_retries=2), sse_keepalive_s=0.02)
    for miner in net.devnet.miners:
        await miner.set_fault(MinerFault.RESEARCH_BAD_JSON)
    async with net.client:
        response = await net.client.post("/v1/chat/completions", json=net.research(stream=True))
        assert response.status_code == 200  # committed with a keep-alive while the first try was out
        events = sse_events(response.text)
        assert "[DONE]" not in events
        error = events[-1]["error"]
        assert error["code"] == "research_unusable_answer"
        assert error["message"] == ("Deep research failed: the assess step's answer was not the JSON asked for "
                                    "in 3 tries (the answer holds no valid JSON).")
        assessed = [c for c in net.miner_calls() if c["messages"][0]["content"].startswith(MARKER_PREFIX + "assess")]
        assert len(assessed) == 3 * 3  # three tries, each to every miner, then no further call
        assert len(net.miner_calls()) == 9
        again = await net.client.post("/v1/chat/completions", json=net.research())
        assert again.status_code == 502 and again.json()["error"]["code"] == "research_unusable_answer"
    net.gateway.shutdown()


async def test_the_deadline_ends_the_run_with_an_error_event(nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path, timing=MinerTiming(first_token_s=0.0, token_s=0.01),
                         research=ResearchSettings(deadline_s=1.0), sse_keepalive_s=0.2)
    async with net.client:
        started = time.monotonic()
        response = await net.client.post("/v1/chat/completions", json=net.research(stream=True))
        took = time.monotonic() - started
        events = sse_events(response.text)
        assert response.status_code == 200 and "[DONE]" not in events
        assert events[-1]["error"]["code"] == "research_deadline"
        assert events[-1]["error"]["message"] == "Deep research failed: deep research did not finish within 1 s."
        assert 1.0 <= took < 3.0
        assert "## Generating Research Plan" in text_of(events)  # it was under way
        assert ": keep-alive" in response.text  # while the steps worked
    net.gateway.shutdown()


async def test_keep_alive_comments_go_out_while_a_step_works(nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path, timing=MinerTiming(first_token_s=0.4, token_s=0.0),
                         sse_keepalive_s=0.1)
    async with net.client:
        response = await net.client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hello!"}], "stream": True,
            "inference_mode": "Chain-of-Thought"})
        head, _, rest = response.text.partition("data: ")
        assert head.count(": keep-alive\n\n") >= 3 and head.replace(": keep-alive\n\n", "") == ""
        assert sse_events("data: " + rest)[-1] == "[DONE]"
    net.gateway.shutdown()


async def test_the_client_leaving_stops_the_run(nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path, timing=MinerTiming(first_token_s=0.05, token_s=0.0))
    runner = net.gateway.services.jobs
    assert runner is not None
    async with net.client, net.client.stream("POST", "/v1/chat/completions",
                                             json=net.research(stream=True)) as response:
        async for line in response.aiter_lines():
            if "Step 1: Planning Tools" in line:
                break  # the client goes away in the middle of the run
    with trio.fail_after(2):
        while runner.runs_running:  # noqa: ASYNC110 - the run is cancelled once the exchange ends
            await trio.sleep(0.01)
    asked = len(net.miner_calls())
    await trio.sleep(1.0)  # the rest of the run would take about 0.5 s
    assert len(net.miner_calls()) == asked < CALLS * 3, "no further miner call after the client left"
    with trio.fail_after(5):
        await net.gateway.services.fanout.wait_idle()  # the call in flight is heard out, for scoring
    net.gateway.shutdown()


async def test_a_failed_call_ends_the_run_with_its_status_when_nothing_was_sent(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path)
    for miner in net.devnet.miners:
        await miner.set_fault(MinerFault.HTTP_500)
    async with net.client:
        response = await net.client.post("/v1/chat/completions", json=net.research(stream=True))
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert error["code"] == "research_call_failed" and "the assess call failed: every miner failed" in error["message"]
        client = net.openai()
        with pytest.raises(APIError):
            await client.chat.completions.create(model="Default", messages=[{"role": "user", "content": QUESTION}],
                                                 extra_body={"inference_mode": "Chain-of-Thought"})
    net.gateway.shutdown()
