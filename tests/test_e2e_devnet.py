"""End to end over a devnet: real miners and a real validator on loopback, real Epistula."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.scoring.spool import Spool
from config.settings import AuthSettings, AvailabilitySettings, FanoutSettings, ServerSettings, Settings
from devnet.miner import MinerFault, MinerTiming
from devnet.network import Devnet
from engine.gateway import Gateway, run
from tests.devnet_stack import HEALTHY_FIRST_TOKEN_S, Net, start, stream_chat


@pytest.fixture
async def net_factory(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Any]:
    made: list[Net] = []

    async def make(**kw: Any) -> Net:
        net = await start(nursery, tmp_path, **kw)
        made.append(net)
        return net

    yield make
    for net in made:
        await net.client.aclose()
        net.gateway.shutdown()
    nursery.cancel_scope.cancel()


FAULTS = [f.value for f in MinerFault if f not in (MinerFault.HEALTHY, MinerFault.BENCH)]


@pytest.mark.parametrize("fault", FAULTS)
async def test_one_faulty_miner_of_five_never_shows(net_factory: Any, fault: str) -> None:
    with trio.fail_after(60):
        net = await net_factory(faults=(fault,))
        for i in range(3):
            ttft, events = await stream_chat(net.client, f"question {i} for {fault}")
            assert events[-1] == "[DONE]"
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))
            assert text.strip()
            # the answer comes at the pace of the fastest healthy miner, not the faulty one
            assert ttft < 1.0, ttft  # healthy miners: 0.02 s; the slow fault: 5 s
            response = await net.client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"again {i} {fault}"}]})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"]


async def test_every_answer_reaches_the_validator_under_its_own_uid(net_factory: Any) -> None:
    with trio.fail_after(60):
        net = await net_factory(availability="validator")
        devnet = net.devnet
        # answers arrive in an order unrelated to uids: the highest uid is the fastest
        for miner in devnet.miners:
            miner.timing = dataclasses.replace(miner.timing, first_token_s=0.25 * (5 - miner.uid))
        for i in range(4):
            _, events = await stream_chat(net.client, f"score me {i}", seed=100 + i)
            assert events[-1] == "[DONE]"
        with trio.fail_after(20):
            await devnet.validator.wait_scored(4)
        async with httpx.AsyncClient() as direct:
            for payload in devnet.validator.scored:
                assert sorted(payload["uids"]) == sorted(m.uid for m in devnet.miners)
                body = payload["body"]
                for uid in payload["uids"]:
                    # what this miner says to the same request, asked directly
                    expected = await ask_directly(direct, net, uid, body)
                    assert "".join(payload["chunks"][str(uid)]) == expected
                    assert len(payload["timings"][str(uid)]) == len(payload["chunks"][str(uid)])
                    raw = payload["chunk_dicts_raw"][str(uid)]
                    assert len(raw) == len(payload["chunks"][str(uid)])  # aligned, chunk for chunk
                    # each devnet miner stamps its uid into its chunk ids
                    assert {c["id"].split("-")[2] for c in raw} == {str(uid)}
                # 0.25 s apart, in that order; a loaded machine may read two at once (same instant, any order)
                first_at = {uid: payload["timings"][str(uid)][0] for uid in payload["uids"]}
                order = [4, 3, 2, 1, 0]
                assert all(first_at[a] <= first_at[b] + 0.05 for a, b in itertools.pairwise(order)), first_at


async def ask_directly(client: httpx.AsyncClient, net: Net, uid: int, body: dict[str, Any]) -> str:
    miner = net.devnet.miner(uid)
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **net.gateway.services.signer.headers(raw, miner.hotkey)}
    response = await client.post(f"http://{miner.address}/v1/chat/completions", content=raw, headers=headers)
    text = ""
    for line in response.text.splitlines():
        if line.startswith("data: ") and line[6:] != "[DONE]":
            chunk = json.loads(line[6:])
            if chunk["choices"]:  # not the usage chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


async def test_models_and_availability_come_from_the_validator(net_factory: Any) -> None:
    with trio.fail_after(30):
        net = await net_factory(availability="validator")
        cell = net.gateway.services.availability
        with trio.fail_after(10):
            while not cell.get().ever_known:
                await cell.wait_newer(cell.version)
        models = (await net.client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
                                                     "mrfakename/mistral-small-3.1-24b-instruct-2503-hf"]
        uids = (await net.client.get("/miner_availabilities/get_available_miners?task=InferenceTask")).json()
        assert sorted(uids) == [0, 1, 2, 3, 4]


async def test_web_retrieval_over_the_devnet(net_factory: Any) -> None:
    with trio.fail_after(30):
        net = await net_factory()
        response = await net.client.get("/web_retrieval", params={"search_query": "structured concurrency",
                                                                  "n_miners": 3, "n_results": 4})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 4 and len({r["url"] for r in results}) == 4


async def test_answers_still_coming_at_shutdown_are_scored_or_spooled(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A miner that never finishes keeps its fan-outs running past the drain deadline: at shutdown they
    are cut short and go to scoring with what was said, never lost with the forwarder."""
    with trio.fail_after(60):
        timing = MinerTiming(first_token_s=HEALTHY_FIRST_TOKEN_S, token_s=0.002)
        devnet: Devnet = await nursery.start(Devnet(miners=3, faults=("hang_after_headers",), timing=timing,
                                                    validator_poll_s=3600).run)
        await devnet.validator.go_down()  # nothing can be delivered: everything must reach the spool
        settings = devnet.configure(dataclasses.replace(
            Settings(),
            server=ServerSettings(port=0, drain_timeout_s=0.5),
            auth=AuthSettings(keys_file=str(tmp_path / "keys.toml")),
            availability=AvailabilitySettings(source="none"),
            fanout=FanoutSettings(miners=3),
            base_dir=str(tmp_path),
        ))
        gateway: Gateway = await nursery.start(lambda task_status: run(settings, source=devnet.source,
                                                                         task_status=task_status))
        key, _ = await gateway.services.keys.create(100)
        async with httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30) as client:
            for i in range(4):
                response = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"at shutdown {i}"}], "seed": i})
                assert response.status_code == 200, response.text
        fanout = gateway.services.fanout
        assert fanout.jobs_running == 4 and fanout.jobs_serving == 0  # the hanging miner holds each open
        gateway.shutdown()
        await gateway.wait_stopped()
        stats = gateway.services.scoring.health()

    assert stats["dropped"] == dict.fromkeys(stats["dropped"], 0), stats
    spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
    spool.open()
    payloads = [json.loads(r.payload) for r in spool.read(1000).records]
    spool.close()
    assert sorted(p["body"]["seed"] for p in payloads) == [0, 1, 2, 3]
    hanging = next(m.uid for m in devnet.miners if m.fault == MinerFault.HANG_AFTER_HEADERS)
    for payload in payloads:
        assert sorted(payload["uids"]) == sorted(m.uid for m in devnet.miners)
        assert payload["chunks"][str(hanging)] == []
        healthy = [uid for uid in payload["uids"] if uid != hanging]
        assert all(payload["chunks"][str(uid)] for uid in healthy)


async def test_web_retrieval_and_the_mixture_steps_reach_the_validator(net_factory: Any) -> None:
    with trio.fail_after(60):
        net = await net_factory(fanout=3)
        validator = net.devnet.validator
        response = await net.client.post("/web_retrieval", json={"search_query": "scored search", "n_miners": 2})
        assert response.status_code == 200, response.text
        response = await net.client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "mix it"}], "seed": 3, "mixture": True})
        assert response.status_code == 200, response.text
        await validator.wait_scored(3)  # the search, the mixture's first round, its final step
        await trio.sleep(0.3)
    payloads = validator.scored
    assert len(payloads) == 3
    search = [p for p in payloads if p["body"]["task"] == "WebRetrievalTask"]
    assert len(search) == 1 and len(search[0]["uids"]) == 2
    assert search[0]["body"]["messages"][-1]["content"] == "scored search"
    rounds = sorted((p for p in payloads if p["body"]["task"] == "InferenceTask"), key=lambda p: len(p["uids"]))
    final, first = rounds
    assert len(first["uids"]) == 3 and len(final["uids"]) == 1
    assert final["uids"][0] not in first["uids"], "a further miner combines the answers"
    combined = final["body"]["messages"][-1]["content"]
    for uid in first["uids"]:
        assert "".join(first["chunks"][str(uid)]).strip() in combined
    assert "".join(final["chunks"][str(final["uids"][0])]) == response.json()["choices"][0]["message"]["content"]


MISTRAL = "mrfakename/mistral-small-3.1-24b-instruct-2503-hf"


async def test_the_seed_documents_client_with_any_model_name(net_factory: Any) -> None:
    """As the seed document's example, with `model="gpt-4o"` (no miner serves it) and `"Default"`: an
    answer, without logprobs; miners and the validator see the subnet's default model."""
    import openai

    with trio.fail_after(60):
        net = await net_factory(availability="validator")
        headers = {"api-key": net.key, "Content-Type": "application/json"}
        async with openai.AsyncOpenAI(
            base_url=f"{net.gateway.url}/v1", api_key=net.key, max_retries=0,
            timeout=openai.Timeout(30, connect=10, read=20),
            http_client=openai.DefaultAsyncHttpxClient(headers=headers),
        ) as client:
            for model in ("gpt-4o", "Default"):
                result = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "How are you?"}], stream=True,
                    temperature=0.7, seed=42, extra_headers=headers,
                    extra_body={"task": "InferenceTask",
                                "sampling_parameters": {"mixture": False, "max_new_tokens": 256, "do_sample": True}},
                )
                parts = []
                async for chunk in result:
                    assert chunk.model == (model if model != "Default" else MISTRAL)
                    if chunk.choices:
                        assert chunk.choices[0].logprobs is None
                        parts.append(chunk.choices[0].delta.content or "")
                assert "".join(parts).strip()
        with trio.fail_after(20):
            await net.devnet.validator.wait_scored(2)
        assert {p["body"]["model"] for p in net.devnet.validator.scored} == {MISTRAL}
        sent = [r.json() for m in net.devnet.miners for r in m.received if r.path == "/v1/chat/completions"]
        assert sent and {b["model"] for b in sent} == {MISTRAL}


async def test_strict_models_keep_a_model_nobody_serves_a_404(net_factory: Any) -> None:
    with trio.fail_after(30):
        net = await net_factory(availability="validator", strict_models=True)
        response = await net.client.post("/v1/chat/completions", json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
        served = await net.client.post("/v1/chat/completions", json={
            "model": "Default", "messages": [{"role": "user", "content": "x"}]})
        assert served.status_code == 200, served.text


async def test_a_task_no_miner_advertises_goes_to_any_serving_miner(net_factory: Any) -> None:
    with trio.fail_after(30):
        net = await net_factory(availability="validator")
        response = await net.client.post("/v1/chat/completions", json={
            "task": "ProgrammingTask", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
