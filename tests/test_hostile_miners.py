"""Miners are untrusted servers: what one sends is bounded, never reaches a client unsanitised, and
never costs honest miners their standing; the gateway's own failures are not blamed on miners."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from actors.fanout.bounds import AnswerBounds
from actors.fanout.breaker import MinerHealth
from actors.fanout.events import Broken, Chunk, End
from actors.fanout.job import FanoutJob
from actors.fanout.pool import FanoutPool
from config.settings import Settings
from engine.gateway import make_http_client
from tests.chat_stack import Stack, sse_events
from tests.devnet_stack import start, stream_chat
from tests.scripted_miners import DONE, Miners, answer, chunk, vllm_answer, vllm_chunk
from wire.epistula import Signer
from wire.http1 import GatewayLimitError
from wire.metagraph import Neuron
from wire.organic import OrganicResult

BODY: dict[str, Any] = {"model": None, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "seed": 7, "task": "InferenceTask", "sampling_parameters": {"max_new_tokens": 16}}


def neuron(uid: int) -> Neuron:
    return Neuron(uid=uid, hotkey=Keypair.create_from_uri(f"//miner{uid}").ss58_address,
                  axon=f"127.0.0.1:{9000 + uid}", incentive=0.1)


@pytest.fixture
def results() -> list[OrganicResult]:
    return []


@pytest.fixture
async def miners(nursery: trio.Nursery) -> Miners:
    """Scripted miners on loopback, for uids 1 to 5."""
    served = Miners()
    await served.serve(nursery, range(1, 6))
    return served


@pytest.fixture
async def pool(miners: Miners, results: list[OrganicResult], nursery: trio.Nursery) -> FanoutPool:
    http = make_http_client(Settings())
    health = MinerHealth(failure_threshold=2, cooldown_s=30.0)
    started: FanoutPool = await nursery.start(
        FanoutPool(http, Signer(Keypair.create_from_uri("//Gateway")), health, results.append).run)
    return started


async def events_of(job: FanoutJob) -> list[Any]:
    events = []
    with trio.fail_after(120):
        async for event in job.receive:
            events.append(event)
    return events


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, Chunk))


# -- bounded answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("script", "reason"), [
    # one line that never ends
    ([(0.0, "data: " + "x" * 10_000)] * 100, "line over 65536 bytes"),
    # valid events of 60 KB each, for ever (a chunk's text is bounded first)
    ([(0.0, chunk("y" * 60_000))] * 100, "chunk of over 8192 characters"),
    # many small valid events, beyond what the token budget allows (it answers after the honest one)
    ([(0.1, chunk("z")), *[(0.0, chunk("z"))] * 1000], "answer over 96 events"),
    # nesting beyond any chunk's
    ([(0.0, "data: " + "[" * 5000 + "]" * 5000 + "\n\n")], "not valid JSON (or nested too deep)"),
])
async def test_a_miner_over_its_bounds_fails_and_the_honest_one_answers(
        pool: FanoutPool, miners: Miners, results: list[OrganicResult], autojump_clock: Any,
        script: list[tuple[float, str]], reason: str) -> None:
    miners.scripts[9001] = script
    miners.scripts[9002] = answer(["honest", " answer"], first_delay=0.05)
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    events = await events_of(job)
    assert text_of(events) == "honest answer" and isinstance(events[-1], End)
    await job.finished.wait()
    (result,) = results
    hostile = result.answers[0]
    assert hostile.error is not None and reason in hostile.error
    assert hostile.received_bytes <= job.bounds.max_bytes
    failures = pool.health()["miner_failures"]
    assert failures["over_bounds"] + failures["failed"] == 1
    assert len(result.encode()) < 100_000  # the scoring payload is bounded too


async def test_a_winner_going_over_its_bounds_ends_the_stream_bounded(
        pool: FanoutPool, miners: Miners, results: list[OrganicResult], autojump_clock: Any) -> None:
    miners.scripts[9001] = [(0.0, chunk("z"))] * 1000  # valid tokens, far beyond the budget
    job = pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask")
    events = await events_of(job)
    assert isinstance(events[-1], Broken) and "over 96 events" in events[-1].error
    assert len(text_of(events)) <= job.bounds.max_events


def test_bounds_follow_the_token_budget() -> None:
    small = AnswerBounds.for_request("InferenceTask", {"sampling_parameters": {"max_new_tokens": 16}})
    large = AnswerBounds.for_request("InferenceTask", {"sampling_parameters": {"max_new_tokens": 4096}})
    assert small.max_events == 96 and large.max_events == 8256
    assert small.max_bytes < large.max_bytes <= 32 * 1024 * 1024
    retrieval = AnswerBounds.for_request("WebRetrievalTask", {})
    assert retrieval.max_chunk_chars is None and retrieval.max_event_bytes > 1024 * 1024


# -- sanitised output ---------------------------------------------------------------------------


async def test_tool_calls_and_stray_fields_never_reach_the_client(stack: Stack) -> None:
    tool = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "rm", "arguments": "{}"}}
    evil = vllm_chunk("run", tool_calls=[tool])
    data = json.loads(evil[6:])
    data["choices"][0]["delta"]["tool_calls"] = [tool]
    data["choices"][0]["delta"]["function_call"] = {"name": "rm"}
    data["choices"][0]["logprobs"]["content"][0]["evil"] = "x"
    data["choices"][0]["logprobs"]["extra"] = "y"
    data["model"] = "evil-model"
    finish = json.loads(vllm_chunk(finish="tool_calls")[6:])
    finish["choices"][0]["delta"] = {"tool_calls": [tool]}
    script = [(0.0, "data: " + json.dumps(data) + "\n\n"), (0.0, "data: " + json.dumps(finish) + "\n\n"),
              (0.0, DONE)]
    for stream in (True, False):
        stack.miners.scripts[9001] = script
        response = await stack.chat(stream=stream, uids=[1], model="client-model", logprobs=True, top_logprobs=1)
        assert response.status_code == 200, response.text
        if stream:
            events = sse_events(response.text)
            assert events[-1] == "[DONE]"
            choices = [e["choices"][0] for e in events[:-1]]
            assert {k for c in choices for k in c["delta"]} <= {"role", "content"}
            assert [c["finish_reason"] for c in choices][-1] == "stop"
            entries = [entry for c in choices if c.get("logprobs") for entry in c["logprobs"]["content"]]
            assert {e["model"] for e in events[:-1]} == {"client-model"}
        else:
            body = response.json()
            assert body["choices"][0]["message"] == {"role": "assistant", "content": "run"}
            assert body["choices"][0]["finish_reason"] == "stop" and body["model"] == "client-model"
            entries = body["choices"][0]["logprobs"]["content"]
        assert entries and all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in entries)
        assert "tool_calls" not in response.text and "evil" not in response.text


async def test_a_miners_usage_counts_are_kept_within_the_request(stack: Stack) -> None:
    recorded: list[int] = []
    stack.gateway.services.keys.record_usage_nowait = lambda key_id, *, tokens: recorded.append(tokens)  # type: ignore[method-assign]
    huge = {"prompt_tokens": 2**40, "completion_tokens": 2**40, "total_tokens": 2**41}
    for usage in (huge, {"completion_tokens": 2**64 - 1}, {"completion_tokens": -5}):
        stack.miners.scripts[9001] = [*vllm_answer(["a", "b"], usage=False, done=False),
                                      (0.0, "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"),
                                      (0.0, DONE)]
        body = (await stack.chat(uids=[1], max_tokens=10)).json()
        assert body["usage"]["completion_tokens"] <= 10
        assert body["usage"]["prompt_tokens"] < 100
    assert all(0 <= tokens <= 10 for tokens in recorded) and len(recorded) == 3


async def test_usage_is_counted_when_a_streaming_client_leaves(stack: Stack) -> None:
    recorded: list[int] = []
    stack.gateway.services.keys.record_usage_nowait = lambda key_id, *, tokens: recorded.append(tokens)  # type: ignore[method-assign]
    stack.miners.scripts[9001] = answer([f"w{i} " for i in range(200)], step=0.05)
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "uids": [1]}
    async with stack.client.stream("POST", "/v1/chat/completions", json=body) as response:
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 5:
                break
    with trio.fail_after(10):
        while not recorded:  # noqa: ASYNC110 - the exchange's close callback records it
            await trio.sleep(0.02)
    assert 5 <= recorded[0] < 200


# -- the client's input, the gateway's failures: not the miner's --------------------------------


async def test_a_clients_bad_sampling_parameters_never_reach_miners_or_breakers(stack: Stack) -> None:
    stack.miners.scripts[9001] = answer(["ok"])
    for params in ({"temperature": "hot"}, {"top_k": 1.5}, {"warp": 1}, {"max_new_tokens": 10**9},
                   {"do_sample": "yes"}):
        response = await stack.chat(sampling_parameters=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"].startswith("sampling_parameters.")
    assert stack.miners.received == []
    assert stack.gateway.services.miner_health.report() == {}


async def test_a_miner_refusing_the_input_moves_no_breaker(pool: FanoutPool, miners: Miners, autojump_clock: Any
                                                          ) -> None:
    miners.scripts[9001] = 422
    for _ in range(5):
        job = pool.start(BODY, [miners.neuron(1)], mode="complete", task="InferenceTask")
        await job.finished.wait()
    assert pool.miner_health.state(1) == "closed" and pool.health()["miner_failures"]["client_caused"] == 5


async def test_requests_naming_their_miners_move_no_breaker(pool: FanoutPool, miners: Miners,
                                                            autojump_clock: Any) -> None:
    miners.scripts[9001] = 500
    for _ in range(5):
        job = pool.start(BODY, [miners.neuron(1)], mode="complete", task="InferenceTask", moves_breakers=False)
        await job.finished.wait()
    assert pool.miner_health.state(1) == "closed" and pool.miner_health.report()["1"]["failures"] == 5


@pytest.mark.parametrize("error", [GatewayLimitError("too many open files"), RuntimeError("a defect")])
async def test_the_gateways_own_failures_move_no_breaker(
        miners: Miners, nursery: trio.Nursery, autojump_clock: Any, error: Exception) -> None:
    async def failing(request: httpx.Request) -> httpx.Response:
        raise error

    http = httpx.AsyncClient(transport=httpx.MockTransport(failing))
    pool: FanoutPool = await nursery.start(FanoutPool(
        http, Signer(Keypair.create_from_uri("//Gateway")), MinerHealth(failure_threshold=1, cooldown_s=30),
        None).run)
    for _ in range(3):
        job = pool.start(BODY, [miners.neuron(1)], mode="complete", task="InferenceTask")
        await job.finished.wait()
        assert (job.answers[0].error or "").startswith("gateway error")
    assert pool.miner_health.state(1) == "closed" and pool.health()["gateway_errors"] == 3


# -- a broken winner with nobody to take over ---------------------------------------------------


@pytest.mark.parametrize(("other", "within_s"), [
    ([(0.15, chunk("Something ")), (0.0, chunk("else")), (1000.0, DONE)], 0.01),  # said something else: at once
    ([(1000.0, chunk("The "))], 1.5),  # says nothing: at most stall_timeout_s, not its timeout
])
async def test_a_broken_winner_nobody_can_continue_ends_the_stream_soon(
        pool: FanoutPool, miners: Miners, autojump_clock: Any, other: list[tuple[float, str]], within_s: float
) -> None:
    miners.scripts[9001] = [(0.1, chunk("The ")), (0.1, chunk("same ")), (0.0, "BREAK")]
    miners.scripts[9002] = other
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    events = []
    async for event in job.receive:
        events.append(event)
        if isinstance(event, Broken):
            break
    assert text_of(events) == "The same " and isinstance(events[-1], Broken)
    assert trio.current_time() - job.started <= 0.2 + within_s


def test_watching_a_stalled_winner_compares_each_chunk_once() -> None:
    async def main() -> None:
        job = FanoutJob(request_id="r", task="InferenceTask", body=BODY, miners=[neuron(1), neuron(2)],
                        mode="stream", timeout_s=60, bounds=AnswerBounds(max_bytes=1 << 30, max_events=1 << 20))
        race = job.race
        assert race is not None
        job.winner = 0
        for i in range(5000):
            race.send_text(f"t{i} ")
        follower = job.answers[1].chunks
        compared = 0
        for i in range(5000):
            follower.append(f"t{i} ")
            before = race._checked[1]
            assert race.covers(1) == (i == 4999)
            compared += race._checked[1][0] - before[0]
            assert race._checked[1][0] == i + 1  # resumed where it stopped, not from the start
        assert compared == 5000
        follower.append("more")
        assert race.covers(1) and race.rest_of(1) == "more"
        follower[4000] = "changed"  # a text already compared is not compared again
        assert race.covers(1)
        diverging = job.answers[0]
        diverging.chunks.extend(["t0 ", "x"])
        assert not race.covers(0) and race._diverged[0]

    trio.run(main)


async def test_a_hostile_devnet_miner_costs_only_its_own_answer(tmp_path: Path, nursery: trio.Nursery) -> None:
    """The devnet's hostile miners, over real sockets: each fails on its own, its connection is closed,
    and an honest miner's answer is what the client gets."""
    net = await start(nursery, tmp_path, faults=("endless_line", "flood", "deep_json", "tool_calls"), miners=5)
    with trio.fail_after(60):
        for i in range(3):
            _, events = await stream_chat(net.client, f"hostile round {i}")
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))
            assert events[-1] == "[DONE]" and text.strip()
            assert "tool_calls" not in json.dumps(events)
        await net.gateway.services.fanout.wait_idle()
        for uid in (0, 1):
            await net.devnet.miner(uid).wait_streams_closed()
        failures = net.gateway.services.fanout.health()["miner_failures"]
        assert failures["over_bounds"] == 9  # endless_line, flood and deep_json (one 100 kB line), each round
    await net.client.aclose()
    net.gateway.shutdown()
    nursery.cancel_scope.cancel()


async def test_a_miner_cannot_bill_more_tokens_than_it_wrote(stack: Stack) -> None:
    stack.miners.scripts[9001] = [*vllm_answer(["Hi"], usage=False, done=False),
                                  (0.0, "data: " + json.dumps({"choices": [], "usage": {
                                      "prompt_tokens": 5, "completion_tokens": 900}}) + "\n\n"), (0.0, DONE)]
    body = (await stack.chat(uids=[1], max_tokens=1000)).json()
    assert body["usage"]["completion_tokens"] == 2  # two bytes of text: at most two tokens


def test_when_no_miner_was_reached_for_the_gateways_own_reasons_it_is_a_503() -> None:
    from actors.fanout.events import Failed
    from web.chat import failed_error

    own = failed_error(Failed({1: "gateway error: cannot connect: the gateway is out of EMFILE",
                               2: "gateway error: RuntimeError"}))
    assert own.status == 503 and own.code == "gateway_overloaded" and own.headers["Retry-After"] == "1"
    theirs = failed_error(Failed({1: "gateway error: RuntimeError", 2: "HTTP 500"}))
    assert theirs.status == 502 and theirs.code == "miners_failed"
