"""`/v1/chat/completions` through the real HTTP server, with scripted miners behind the gateway.

The gateway's outbound client uses a MockTransport (the scripted miners); the test talks to the
gateway over real loopback HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.chat_stack import Stack, sse_events
from tests.metrics_support import scrape
from tests.scripted_miners import answer, chunk


async def test_stream_passes_on_winner_chunks_and_finish_reason(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["never"], first_delay=3.0)
    stack.miners.scripts[9002] = answer(["Hel", "lo"], first_delay=0.05, finish="length")
    stack.miners.scripts[9003] = 500
    response = await stack.chat(stream=True, model="my-model")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert int(response.headers["X-RateLimit-Limit"]) == 1000
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"my-model"}
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


async def test_non_stream_answer(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer(["An", " answer"], first_delay=0.01 * (port - 9000))
    response = await stack.chat(stream=False, temperature=0.2, max_tokens=64, seed=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "An answer"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2
    sent = json.loads(stack.miners.received[0].content)
    assert sent["seed"] == 5 and sent["stream"] is True and sent["task"] == "InferenceTask"
    assert sent["sampling_parameters"]["temperature"] == 0.2
    assert sent["sampling_parameters"]["max_new_tokens"] == 64


async def test_mid_stream_break_is_an_error_event_without_done(stack: Stack) -> None:
    stack.miners.scripts[9001] = [(0.0, chunk("par")), (0.05, chunk("tial")), (0.05, "BREAK")]
    response = await stack.chat(stream=True, uids=[1])
    assert response.status_code == 200
    events = sse_events(response.text)
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "miner_stream_broken"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "partial"


async def test_all_miners_failing_is_502_with_reasons(stack: Stack) -> None:
    stack.miners.scripts[9001] = 500
    stack.miners.scripts[9002] = 0
    stack.miners.scripts[9003] = [(0.0, "data: {broken\n\n")]
    response = await stack.chat(stream=True)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "miners_failed"
    assert set(error["details"]) == {"1", "2", "3"} and error["details"]["1"] == "HTTP 500"


async def test_no_first_token_in_budget_is_504(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer(["late"], first_delay=3.0)
    response = await stack.chat(stream=True)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


async def test_explicit_uids_are_honoured_and_checked(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer([f"from {port}"])
    response = await stack.chat(uids=[3])
    assert response.json()["choices"][0]["message"]["content"] == "from 9003"
    assert {r.url.port for r in stack.miners.received} == {9003}
    response = await stack.chat(uids=[3, 42])
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "uids"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"temperature": 5}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"task": "NoSuchTask"}, "task"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"uids": ["a"]}, "uids"),
        ({"sampling_parameters": []}, "sampling_parameters"),
    ],
)
async def test_bad_requests_name_the_parameter(stack: Stack, body: dict[str, Any], param: str) -> None:
    response = await stack.chat(**body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert stack.miners.received == []


async def test_missing_key_is_401(stack: Stack) -> None:
    response = await stack.client.post("/v1/chat/completions", json={"messages": []}, headers={"api-key": ""})
    assert response.status_code == 401


async def test_mixture_combines_first_round_answers(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["one"])
    stack.miners.scripts[9002] = answer(["two"])
    stack.miners.scripts[9003] = answer(["combined"])
    response = await stack.chat(uids=[1, 2], mixture=True)
    assert response.status_code == 200, response.text
    final = [json.loads(r.content) for r in stack.miners.received if r.url.port == 9003]
    assert len(final) == 1, "the final answer comes from a further miner"
    last = final[0]["messages"][-1]
    assert last["role"] == "assistant"
    assert "1. one" in last["content"] or "1. two" in last["content"]
    assert "2. " in last["content"] and "combine" in last["content"]
    assert response.json()["choices"][0]["message"]["content"] == "combined"


async def test_mixture_flag_inside_sampling_parameters(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer([f"m{port}"])
    response = await stack.chat(stream=True, sampling_parameters={"mixture": True, "max_new_tokens": 32})
    assert response.status_code == 200
    assert len(stack.miners.received) == 4  # three in the first round, one to combine
    assert sse_events(response.text)[-1] == "[DONE]"


async def test_client_disconnect_keeps_collecting_for_scoring(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["tok"] * 40, step=0.05)
    stack.miners.scripts[9002] = answer(["other"] * 3, first_delay=0.5)
    stack.miners.scripts[9003] = answer(["third"], first_delay=0.6)
    pool = stack.gateway.services.fanout
    async with stack.client.stream("POST", "/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
        async for _line in r.aiter_lines():
            break  # the client goes away after the first bytes
    with trio.fail_after(1):
        while pool.jobs_serving:  # noqa: ASYNC110 - the handler lets go as soon as the client is gone
            await trio.sleep(0.01)
    assert pool.jobs_running == 1  # while the miners are still heard out for scoring
    with trio.fail_after(10):
        await pool.wait_idle()
    assert pool.miner_health.report()["1"]["successes"] == 1  # the stream was read to its end


async def test_metrics_report_actors_components_and_miners(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["ok"])
    stack.miners.scripts[9002] = 500
    await stack.chat(uids=[1, 2])
    await stack.gateway.services.fanout.wait_idle()
    response = await stack.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    metrics = scrape(response.text)
    assert metrics.value("sn1_gateway_ready") == 1
    assert metrics.value("sn1_gateway_actor_running", actor="fanout") == 1
    assert metrics.value("sn1_gateway_fanout_jobs_total") == 1
    assert metrics.value("sn1_gateway_miner_successes_total", uid="1") == 1
    assert metrics.value("sn1_gateway_miner_failures_total", uid="2") == 1
    assert metrics.value("sn1_gateway_miner_breaker_state", uid="2", state="closed") == 1


async def test_mixture_does_not_wait_for_the_slowest_miner(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["quick"], first_delay=0.05)
    stack.miners.scripts[9002] = answer(["sluggish"], first_delay=15.0)  # under the 20 s deadline
    stack.miners.scripts[9003] = answer(["combined"])
    with trio.fail_after(5):
        response = await stack.chat(uids=[1, 2], mixture=True)
    assert response.status_code == 200, response.text
    (final,) = [json.loads(r.content) for r in stack.miners.received if r.url.port == 9003]
    combined = final["messages"][-1]["content"]
    assert "1. quick" in combined and "sluggish" not in combined


async def test_mixture_combines_only_whole_answers(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["quick"], first_delay=0.05)
    stack.miners.scripts[9002] = answer([f"w{i} " for i in range(20)], first_delay=0.05, step=0.1)  # 2 s
    stack.miners.scripts[9003] = answer(["combined"])
    response = await stack.chat(uids=[1, 2], mixture=True)
    assert response.status_code == 200, response.text
    (final,) = [json.loads(r.content) for r in stack.miners.received if r.url.port == 9003]
    combined = final["messages"][-1]["content"]
    assert "1. quick" in combined and "w0" not in combined, "an answer still being written is left out"


async def test_usage_has_all_three_counts(stack: Stack) -> None:
    for port in (9001, 9002, 9003):
        stack.miners.scripts[port] = answer(["a", "b", "c"])
    response = await stack.chat(messages=[{"role": "user", "content": "x" * 40}])
    usage = response.json()["usage"]
    assert usage == {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17}
    reported = json.loads(chunk(None, "stop")[6:])
    reported["usage"] = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    stack.miners.scripts[9001] = [(0.0, chunk("a")), (0.0, chunk("b")), (0.0, f"data: {json.dumps(reported)}\n\n"),
                                  (0.0, "data: [DONE]\n\n")]
    response = await stack.chat(uids=[1])
    assert response.json()["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


@pytest.mark.parametrize(("body", "status"), [({"messages": []}, 400), ({"uids": [1]}, 502), ({"uids": [42]}, 400)])
async def test_errors_after_the_key_is_counted_carry_the_rate_limit_headers(
        stack: Stack, body: dict[str, Any], status: int) -> None:
    stack.miners.scripts[9001] = 500
    response = await stack.chat(**body)
    assert response.status_code == status
    assert response.headers["X-RateLimit-Limit"] == "1000"
    assert int(response.headers["X-RateLimit-Remaining"]) < 1000
    assert "X-RateLimit-Reset" in response.headers


async def test_a_burst_of_chunks_arrives_whole_and_in_order(stack: Stack) -> None:
    words = [f"w{i} " for i in range(300)]
    stack.miners.scripts[9001] = answer(words, step=0.0)  # all at once: they queue up and go out together
    response = await stack.chat(stream=True, uids=[1], stream_options={"include_usage": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 300
    chunks = [e for e in events[:-2] if e["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "".join(words)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_stream_whose_body_never_starts_is_released(stack: Stack) -> None:
    """The client leaves while the response head is written: the body is never sent, and the handler
    still lets go of the job."""
    stack.miners.scripts[9001] = [(0.0, chunk(f"w{i}")) for i in range(200)]  # more than a channel holds
    app = stack.gateway_app
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": True, "uids": [1]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2), "extensions": {},
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                         (b"api-key", stack.key.encode()), (b"content-length", str(len(body)).encode())]}
    gone = trio.Event()
    asked = [False]

    async def receive() -> dict[str, Any]:
        if not asked[0]:
            asked[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            gone.set()  # the client's FIN is read while the head is being written
            await trio.sleep(0.01)

    pool = stack.gateway.services.fanout
    with trio.fail_after(10):
        await app(scope, receive, send)
        assert pool.jobs_serving == 0
        await pool.wait_idle()  # the miner's 200 chunks were collected: nothing waits on a gone client


async def test_a_client_leaving_during_the_mixture_first_round_releases_it(stack: Stack) -> None:
    for port in (9001, 9002):
        stack.miners.scripts[port] = answer(["slow"], first_delay=1.0)
    stack.miners.scripts[9003] = answer(["combined"])
    pool = stack.gateway.services.fanout
    with trio.move_on_after(0.3):  # the client gives up while the first round is still out
        await stack.chat(uids=[1, 2], mixture=True)
    with trio.fail_after(5):
        while pool.jobs_serving:  # noqa: ASYNC110 - the handler lets go once the exchange ends
            await trio.sleep(0.01)
    assert pool.jobs_running == 1  # the first round is still heard out, for scoring
