"""Bounds an attacker would otherwise push past: explicit uids, research runs, the pool's answer bytes."""

from __future__ import annotations

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
from config.settings import ResearchSettings
from devnet.miner import MinerTiming
from tests.chat_stack import Stack
from tests.research_support import Net, open_net
from tests.scripted_miners import DONE, Miners, answer, chunk
from web.research.running import ResearchRuns
from wire.epistula import Signer
from wire.organic import OrganicResult


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


# -- deep-research runs ---------------------------------------------------------------------------------

SLOW = MinerTiming(first_token_s=3.0, token_s=0.0)  # a run's first call takes 3 s: runs stay under way


async def wait_running(runs: ResearchRuns, count: int) -> None:
    with trio.fail_after(3):
        while runs.running != count:  # noqa: ASYNC110 - the run starts (or ends) in the gateway
            await trio.sleep(0.01)


async def hold_stream(net: Net, key: str, scope: trio.CancelScope, *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A streamed run held open until `scope` is cancelled (the client leaving)."""
    with scope:
        async with net.client.stream("POST", "/v1/chat/completions", json=net.research(stream=True),
                                     headers={"api-key": key}) as response:
            assert response.status_code == 200
            task_status.started()
            async for _ in response.aiter_raw():
                pass


async def test_research_runs_are_bounded_per_key_and_in_all_and_a_cancelled_run_frees_its_slot(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path, timing=SLOW, sse_keepalive_s=0.1,
                         research=ResearchSettings(search_timeout_s=5, max_running=2, max_running_per_key=1))
    runs = net.gateway.services.research
    assert runs is not None
    other, _ = await net.gateway.services.keys.create(10_000)
    third, _ = await net.gateway.services.keys.create(10_000)
    async with net.client:
        first = trio.CancelScope()
        await nursery.start(hold_stream, net, net.key, first)
        await wait_running(runs, 1)

        for stream in (True, False):  # the key's second run, streamed or not
            response = await net.client.post("/v1/chat/completions", json=net.research(stream=stream))
            assert response.status_code == 429, response.text
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "too_many_research_runs"
            assert response.headers["Retry-After"] == "5"

        second = trio.CancelScope()
        await nursery.start(hold_stream, net, other, second)  # another key: within the gateway's 2
        await wait_running(runs, 2)
        response = await net.client.post("/v1/chat/completions", json=net.research(stream=True),
                                         headers={"api-key": third})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "research_busy"
        assert "Retry-After" in response.headers
        job = await net.client.post("/v1/chat/completions/jobs", json=net.research(), headers={"api-key": third})
        assert job.status_code == 202  # a job's run is refused when it starts: the job fails, saying why
        job_id = job.json()["job_id"]
        with trio.fail_after(3):
            while (polled := (await net.client.get(f"/v1/chat/completions/jobs/{job_id}",  # noqa: ASYNC110
                                                   headers={"api-key": third})).json())["status"] != "failed":
                await trio.sleep(0.02)
        assert polled["error"]["code"] == "research_busy"

        metrics = (await net.client.get("/metrics")).text
        assert "sn1_gateway_research_runs_running 2.0" in metrics
        assert 'sn1_gateway_research_runs_refused_total{reason="running_per_key"} 2.0' in metrics
        assert 'sn1_gateway_research_runs_refused_total{reason="running"} 2.0' in metrics
        ready = (await net.client.get("/health/ready")).json()
        assert ready["research"]["running"] == 2 and ready["research"]["keys_running"] == 2

        first.cancel()  # the first client leaves mid-run: its slot is free again
        await wait_running(runs, 1)
        assert runs.running_for(net.key) == 0
        again = trio.CancelScope()
        await nursery.start(hold_stream, net, net.key, again)
        await wait_running(runs, 2)
        second.cancel()
        again.cancel()
        await wait_running(runs, 0)
    net.gateway.shutdown()


async def test_a_run_answered_whole_frees_its_slot_when_its_client_leaves(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path, timing=SLOW, sse_keepalive_s=0.1,
                         research=ResearchSettings(search_timeout_s=5, max_running_per_key=1))
    runs = net.gateway.services.research
    assert runs is not None
    async with net.client:
        with trio.move_on_after(1.0):  # the client gives up during the first call
            await net.client.post("/v1/chat/completions", json=net.research())
        await wait_running(runs, 0)
        again = trio.CancelScope()
        await nursery.start(hold_stream, net, net.key, again)  # the key is admitted again
        await wait_running(runs, 1)
        again.cancel()
        await wait_running(runs, 0)  # the client is gone before it is closed (else its read may see the close)
    net.gateway.shutdown()


# -- the miners' answers of every fan-out, together ---------------------------------------------------

BIG_CHUNK = chunk("a" * 8000)  # about 8 KB on the wire


def body_for(tokens: int) -> dict[str, Any]:
    return {"model": None, "messages": [{"role": "user", "content": "hi"}], "stream": True, "seed": 7,
            "task": "InferenceTask", "sampling_parameters": {"max_new_tokens": tokens}}


async def scripted_pool(nursery: trio.Nursery, miners: Miners, results: list[OrganicResult], *,
                        answers_max_bytes: int) -> FanoutPool:
    http = httpx.AsyncClient(transport=miners.transport())
    pool: FanoutPool = await nursery.start(FanoutPool(
        http, Signer(Keypair.create_from_uri("//Gateway")), MinerHealth(failure_threshold=1, cooldown_s=60.0),
        results.append, answers_max_bytes=answers_max_bytes).run)
    return pool


async def events_of(job: FanoutJob) -> list[Any]:
    events: list[Any] = []
    with trio.fail_after(60):
        async for event in job.receive:
            events.append(event)
    job.release()
    return events


async def test_a_large_answer_is_cut_and_blamed_while_the_pool_holds_too_much(
        nursery: trio.Nursery, autojump_clock: Any) -> None:
    """Two fan-outs at 1,024 tokens hold 120 KB of ordinary answers; a third, at 16 tokens, has a miner
    sending 11 chunks of 8 KB (within its own bound of 96 KiB, but past the 73 KiB its request typically
    takes). Once the three hold over the pool's 200 KB it is cut, as its own failure; the others finish."""
    miners = Miners()
    for uid in (1, 2):
        miners.scripts[9000 + uid] = [(0.0, BIG_CHUNK)] * 7 + [(0.3, chunk(" more")) for _ in range(5)] + [
            (0.0, chunk(None, "stop")), (0.0, DONE)]
    miners.scripts[9003] = [(0.1, BIG_CHUNK)] * 11 + [(0.0, chunk(None, "stop")), (0.0, DONE)]
    results: list[OrganicResult] = []
    pool = await scripted_pool(nursery, miners, results, answers_max_bytes=200_000)
    fillers = [pool.start(body_for(1024), [miners.neuron(uid)], mode="stream", task="InferenceTask")
               for uid in (1, 2)]
    large = pool.start(body_for(16), [miners.neuron(3)], mode="stream", task="InferenceTask")
    assert large.bounds.typical_bytes < 11 * len(BIG_CHUNK) < large.bounds.max_bytes
    events = await events_of(large)
    assert isinstance(events[-1], Broken) and "over the 75136 typical" in events[-1].error
    for job in fillers:
        assert isinstance((await events_of(job))[-1], End)
        await job.finished.wait()
    await large.finished.wait()
    report = pool.health()
    assert report["miner_failures"]["over_bounds"] == 1 and report["answers_cut"] == 1
    assert report["answers_bytes"] == 0 and report["miner_streams"] == 0
    assert not pool.miner_health.allows(3) and pool.miner_health.allows(1) and pool.miner_health.allows(2)
    assert all(a.error is None for r in results for a in r.answers if a.uid != 3)


async def test_ordinary_answers_past_their_share_are_cut_without_blame_and_small_ones_go_on(
        nursery: trio.Nursery, autojump_clock: Any) -> None:
    """Three fan-outs whose miners each stream 800 KB at 1,024 tokens (an ordinary size for it), and one
    short answer, under a pool budget of 150 KB: the long ones are cut near their share (no breaker
    moves; each client sees its stream break), the short one is answered whole."""
    miners = Miners()
    for uid in (1, 2, 3):
        miners.scripts[9000 + uid] = [(0.01, BIG_CHUNK)] * 100 + [(0.0, chunk(None, "stop")), (0.0, DONE)]
    miners.scripts[9004] = answer(["short", " and", " sweet"], step=0.2)
    results: list[OrganicResult] = []
    pool = await scripted_pool(nursery, miners, results, answers_max_bytes=150_000)
    long = [pool.start(body_for(1024), [miners.neuron(uid)], mode="stream", task="InferenceTask")
            for uid in (1, 2, 3)]
    short = pool.start(body_for(1024), [miners.neuron(4)], mode="stream", task="InferenceTask")
    peak = [0]

    async def watch() -> None:
        while True:
            peak[0] = max(peak[0], pool.answers_bytes)
            await trio.sleep(0.001)

    nursery.start_soon(watch)
    for job in long:
        events = await events_of(job)
        assert isinstance(events[-1], Broken) and "the gateway held over 150000 bytes" in events[-1].error
    assert 100_000 < peak[0] <= 150_000 + 4 * len(BIG_CHUNK)  # over by at most a read per stream
    short_events = await events_of(short)
    assert "".join(e.text for e in short_events if isinstance(e, Chunk)) == "short and sweet"
    assert isinstance(short_events[-1], End)
    await pool.wait_idle()
    report = pool.health()
    assert report["miner_failures"]["cut_at_pool_budget"] == 3 and report["miner_failures"]["over_bounds"] == 0
    assert report["answers_cut"] == 3 and report["answers_bytes"] == 0
    assert all(pool.miner_health.allows(uid) for uid in (1, 2, 3, 4))


def test_one_requests_budget_is_capped_however_many_miners_it_names() -> None:
    bounds = AnswerBounds.for_request("InferenceTask", body_for(32_768))
    assert bounds.max_bytes == bounds.typical_bytes == 16 * 1024 * 1024
    assert bounds.request_bytes(5 + 256) == 32 * 1024 * 1024  # two whole answers, not 261
    small = AnswerBounds.for_request("InferenceTask", body_for(1024))
    assert small.request_bytes(5) == 5 * small.typical_bytes + 2 * (small.max_bytes - small.typical_bytes)
    assert small.request_bytes(300) == 16 * 1024 * 1024


async def test_the_pools_answer_bytes_are_on_metrics(stack: Stack) -> None:
    text = (await stack.client.get("/metrics")).text
    assert "sn1_gateway_fanout_answers_max_bytes 1.073741824e+09" in text
    assert "sn1_gateway_fanout_answers_bytes 0.0" in text
    assert 'sn1_gateway_fanout_miner_failures_total{kind="cut_at_pool_budget"} 0.0' in text
