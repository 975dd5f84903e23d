"""Bounds an attacker would otherwise push past: explicit uids, research runs, the pool's answer bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from config.settings import ResearchSettings
from devnet.miner import MinerTiming
from tests.chat_stack import Stack
from tests.research_support import Net, open_net
from web.research.running import ResearchRuns


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
    net.gateway.shutdown()
