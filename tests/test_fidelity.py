"""The gateway behaves as Subnet 1's deployed validators and miners expect (docs/protocol.md):
scoring payloads the validator can score, upstream's time budgets and sampling defaults, models as
upstream serves them, OpenAI-shaped output, and the rest of upstream's request fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.fanout.bounds import request_timeout_s
from tests.chat_stack import Stack, asgi_post, open_stack, sse_events
from tests.scripted_miners import answer, vllm_answer
from web.chat_request import DEFAULT_SAMPLING, parse_chat_request
from wire import jsonio
from wire.organic import MinerAnswer, OrganicResult, scored_body

MISTRAL = "mrfakename/mistral-small-3.1-24b-instruct-2503-hf"
WORDS = ["The", " same", " answer"]


def sent_bodies(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(r.content) for r in stack.miners.received]


def capture_results(stack: Stack) -> list[OrganicResult]:
    results: list[OrganicResult] = []
    stack.gateway.services.fanout.submit = results.append
    return results


def assert_aligned(payload: dict[str, Any]) -> None:
    """What upstream's logprob check assumes: entry i of chunks, timings and chunk_dicts_raw is one chunk."""
    for uid in map(str, payload["uids"]):
        chunks, raw, timings = payload["chunks"][uid], payload["chunk_dicts_raw"][uid], payload["timings"][uid]
        assert len(chunks) == len(raw) == len(timings), uid
        assert all(chunks), "no empty strings"
        for text, chunk in zip(chunks, raw, strict=True):
            assert chunk["choices"][0]["delta"]["content"] == text
            assert chunk["choices"][0]["logprobs"]["content"][0]["token"] == text


# -- 1. scoring payloads ------------------------------------------------------------------------


async def test_scoring_lists_are_aligned_for_vllm_streams(stack: Stack) -> None:
    results = capture_results(stack)
    stack.miners.scripts[9001] = vllm_answer(WORDS, role_chunk=True, finish_with_last=True, usage=True)
    stack.miners.scripts[9002] = vllm_answer(WORDS, role_chunk=True, finish_with_last=False, usage=False,
                                             done=False)
    stack.miners.scripts[9003] = vllm_answer(WORDS, role_chunk=False, finish_with_last=False, usage=True)
    response = await stack.chat(stream=True)
    assert response.status_code == 200
    await stack.gateway.services.fanout.wait_idle()
    (result,) = results
    payload = json.loads(result.encode())
    assert_aligned(payload)
    assert payload["chunks"] == {uid: WORDS for uid in ("1", "2", "3")}
    # a last token sent together with its finish_reason is in all three lists
    assert payload["chunk_dicts_raw"]["1"][-1]["choices"][0]["finish_reason"] == "stop"
    assert {a.uid: (a.usage or {}).get("completion_tokens") for a in result.answers} == {1: 3, 2: None, 3: 3}


async def test_the_scored_body_has_only_numbers_in_sampling_parameters(stack: Stack) -> None:
    results = capture_results(stack)
    stack.miners.scripts[9001] = vllm_answer(WORDS)
    response = await stack.chat(uids=[1], stop=["\n\n"], temperature=0.3, max_tokens=32)
    assert response.status_code == 200, response.text
    await stack.gateway.services.fanout.wait_idle()
    (sent,) = sent_bodies(stack)
    assert sent["stop"] == ["\n\n"]  # the stop list goes to miners as OpenAI's field, beside the parameters
    payload = results[0].scoring_payload()
    params = payload["body"]["sampling_parameters"]
    assert params == {**DEFAULT_SAMPLING, "temperature": 0.3, "max_new_tokens": 32}
    assert all(isinstance(v, int | float) for v in params.values())


def test_any_non_number_left_in_sampling_parameters_is_kept_from_the_validator() -> None:
    body = {"messages": [], "sampling_parameters": {"temperature": 0.5, "stop": ["x"], "extra": {"a": 1},
                                                    "none": None, "do_sample": True}}
    assert scored_body(body)["sampling_parameters"] == {"temperature": 0.5, "do_sample": True}
    result = OrganicResult("r", "InferenceTask", body, (MinerAnswer(uid=1, hotkey="h"),), 0.0)
    assert jsonio.loads(result.encode())["body"]["sampling_parameters"] == {"temperature": 0.5, "do_sample": True}
    assert body["sampling_parameters"]["stop"] == ["x"]  # what miners were sent is not changed


# -- 3. time budgets ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "header"), [
    ({}, "60"),
    ({"max_tokens": 16384}, "90"),
    ({"sampling_parameters": {"max_new_tokens": 4096}}, "70"),
    ({"timeout": 120}, "120"),
    ({"timeout": 5}, "60"),
    ({"timeout": 3000}, "300"),
])
async def test_miners_get_upstreams_time_budget(stack: Stack, fields: dict[str, Any], header: str) -> None:
    stack.miners.scripts[9001] = answer(["ok"])
    response = await stack.chat(uids=[1], **fields)
    assert response.status_code == 200, response.text
    (request,) = stack.miners.received
    assert request.headers["X-Client-Timeout"] == header
    assert request_timeout_s(json.loads(request.content)) == float(header)


async def test_a_streaming_client_gets_keep_alive_comments_while_it_waits(tmp_path: Path, nursery: trio.Nursery
                                                                          ) -> None:
    async with open_stack(tmp_path, nursery, sse_keepalive_s=0.1, first_token_timeout_s=0.0) as opened:
        opened.miners.scripts[9001] = answer(["late"], first_delay=0.6)
        response = await opened.chat(stream=True, uids=[1])
        assert response.status_code == 200
        head, _, rest = response.text.partition("data: ")
        assert head.count(": keep-alive\n\n") >= 3 and head.replace(": keep-alive\n\n", "") == ""
        assert sse_events("data: " + rest)[-1] == "[DONE]"


async def test_a_fast_failure_keeps_its_status_while_a_late_one_is_an_event(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    async with open_stack(tmp_path, nursery, sse_keepalive_s=0.2, first_token_timeout_s=0.5) as opened:
        opened.miners.scripts[9001] = 500
        fast = await opened.chat(stream=True, uids=[1])
        assert fast.status_code == 502 and fast.json()["error"]["code"] == "miners_failed"
        opened.miners.scripts[9001] = answer(["never"], first_delay=5.0)
        late = await opened.chat(stream=True, uids=[1])
        assert late.status_code == 200  # committed after one keep-alive period
        events = sse_events(late.text)
        assert events[-1]["error"]["code"] == "miner_timeout" and "[DONE]" not in events


# -- 4. sampling defaults -----------------------------------------------------------------------


def test_sampling_defaults_and_overrides_key_by_key() -> None:
    plain = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, default_model=MISTRAL)
    assert plain.miner_body["sampling_parameters"] == {
        "temperature": 0.7, "top_p": 0.95, "top_k": 50, "max_new_tokens": 1024, "do_sample": True}
    mixed = parse_chat_request({
        "messages": [{"role": "user", "content": "x"}], "temperature": 0.1, "max_tokens": 64,
        "sampling_parameters": {"temperature": 0.9, "top_k": 5, "mixture": False},
    }, default_model=MISTRAL)
    assert mixed.miner_body["sampling_parameters"] == {
        "temperature": 0.9, "top_p": 0.95, "top_k": 5, "max_new_tokens": 64, "do_sample": True}


# -- 5. models ----------------------------------------------------------------------------------


def test_default_means_the_subnets_default_model() -> None:
    for model in ("Default", None):
        request = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "model": model},
                                     default_model=MISTRAL)
        assert request.model == MISTRAL and request.miner_body["model"] == MISTRAL
    lower = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "model": "default"},
                               default_model=MISTRAL)
    assert lower.model == "default"  # exact, as upstream


# -- 6. OpenAI-shaped output --------------------------------------------------------------------


async def test_logprobs_only_when_asked(stack: Stack) -> None:
    stack.miners.scripts[9001] = vllm_answer(WORDS)
    plain = sse_events((await stack.chat(stream=True, uids=[1])).text)
    assert all("logprobs" not in c["choices"][0] for c in plain[:-1])
    stack.miners.scripts[9001] = vllm_answer(WORDS)
    asked = sse_events((await stack.chat(stream=True, uids=[1], logprobs=True, top_logprobs=2)).text)
    content = [c for c in asked[:-1] if c["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in content] == WORDS
    entry = content[0]["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
    stack.miners.scripts[9001] = vllm_answer(WORDS)
    whole = (await stack.chat(uids=[1], logprobs=True)).json()
    assert [e["token"] for e in whole["choices"][0]["logprobs"]["content"]] == WORDS
    assert whole["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    stack.miners.scripts[9001] = vllm_answer(WORDS)
    assert (await stack.chat(uids=[1])).json()["choices"][0]["logprobs"] is None


# -- 7. the rest of upstream's fields -----------------------------------------------------------


async def test_tools_go_to_miners_as_a_last_tool_message_and_in_the_body(stack: Stack) -> None:
    tools = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    stack.miners.scripts[9001] = answer(["ok"])
    response = await stack.chat(uids=[1], tools=tools, json_format=True, timeout=90)
    assert response.status_code == 200, response.text
    (sent,) = sent_bodies(stack)
    assert sent["messages"][-1] == {"role": "tool", "content": json.dumps(tools)}
    assert sent["tools"] == tools and sent["json_format"] is True and sent["timeout"] == 90
    assert stack.miners.received[0].headers["json_format"] == "true"


async def test_reasoning_fast_is_the_multi_step_reasoning_task(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["ok"])
    response = await stack.chat(uids=[1], inference_mode="Reasoning-Fast")
    assert response.status_code == 200
    (sent,) = sent_bodies(stack)
    assert sent["task"] == "MultiStepReasoningTask" and sent["inference_mode"] == "Reasoning-Fast"
    assert stack.miners.received[0].headers["task"] == "MultiStepReasoningTask"


async def test_extra_miners_answer_for_scoring_only(tmp_path: Path, nursery: trio.Nursery) -> None:
    async with open_stack(tmp_path, nursery, miners=1, extra_scoring_miners=2) as opened:
        results = capture_results(opened)
        streamed = []
        for _ in range(5):  # all answer at once: were extras eligible to win, one would, sooner or later
            for port in (9001, 9002, 9003):
                opened.miners.scripts[port] = answer([f"m{port}"], first_delay=0.05)
            response = await opened.chat(stream=True)
            streamed.append("".join(c["choices"][0]["delta"].get("content", "")
                                    for c in sse_events(response.text)[:-1]))
        await opened.gateway.services.fanout.wait_idle()
    assert len(results) == 5
    for result, text in zip(sorted(results, key=lambda r: r.created_at), streamed, strict=True):
        assert len(result.answers) == 3 and sum(a.scoring_only for a in result.answers) == 2
        (primary,) = [a for a in result.answers if not a.scoring_only]
        assert text == primary.text
        assert sorted(json.loads(result.encode())["uids"]) == [1, 2, 3]


async def test_a_miner_whose_first_token_takes_20_s_still_wins(
        tmp_path: Path, nursery: trio.Nursery, stack_clock: trio.abc.Clock) -> None:
    async with open_stack(tmp_path, nursery, first_token_timeout_s=0.0) as opened:
        opened.miners.scripts[9001] = answer(["patient", " miner"], first_delay=20.0)
        opened.miners.scripts[9002] = 500
        opened.miners.scripts[9003] = [(0.0, "data: {broken\n\n")]
        for stream in (True, False):
            started = trio.current_time()
            response = await asgi_post(opened.gateway_app, "/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": "x"}], "stream": stream},
                                       {"api-key": opened.key})
            assert response.status == 200, response.body
            assert trio.current_time() - started >= 20
            if stream:
                events = sse_events(response.body.decode())
                assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "patient miner"
                assert events[-1] == "[DONE]"
            else:
                assert response.json()["choices"][0]["message"]["content"] == "patient miner"
