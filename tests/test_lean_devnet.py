"""The lean devnet (raw-socket miners and validator for the benchmark): the protocol as the gateway meets it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from devnet.lean import LeanDevnet, PlannedRequest
from devnet.population import MinerProfile
from wire.epistula import Signer

GATEWAY = Signer(Keypair.create_from_uri("//devnet/gateway"))


def body(seed: int = 5, max_tokens: int = 8) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": seed, "stream": True,
                       "max_tokens": max_tokens}).encode()


async def post(http: httpx.AsyncClient, address: str, hotkey: str, data: bytes, path: str = "/v1/chat/completions",
               signer: Signer = GATEWAY) -> httpx.Response:
    return await http.post(f"http://{address}{path}", content=data,
                           headers={**signer.headers(data, hotkey), "Content-Type": "application/json"})


def contents(sse: str) -> list[str]:
    out = []
    for line in sse.split("\n\n"):
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0].get("delta", {}).get("content"):
                out.append(delta[0]["delta"]["content"])
    return out


async def test_bench_miners_answer_signed_requests_on_kept_alive_connections(nursery: trio.Nursery) -> None:
    devnet: LeanDevnet = await nursery.start(LeanDevnet(["bench", "slow_tokens"], slow_token_s=0.01).run)
    miner = devnet.miners[0]
    async with httpx.AsyncClient(timeout=5) as http:
        with trio.fail_after(10):
            first = await post(http, miner.address, miner.hotkey, body())
            again = await post(http, miner.address, miner.hotkey, body())
            assert first.status_code == again.status_code == 200
            assert first.headers["content-type"] == "text/event-stream"
            assert len(contents(first.text)) == 8 and first.text.endswith("data: [DONE]\n\n")
            assert first.text == again.text  # the same seed, the same answer
            assert miner.server.requests == 2 and miner.server.connections == 1  # one connection, kept

            unsigned = await http.post(f"http://{miner.address}/v1/chat/completions", content=body())
            assert unsigned.status_code == 400 and unsigned.json()["error"]["code"] == "missing_headers"
            stranger = Signer(Keypair.create_from_uri("//someone"))
            refused = await post(http, miner.address, miner.hotkey, body(), signer=stranger)
            assert refused.status_code == 401
            wrong = await post(http, miner.address, devnet.miners[1].hotkey, body())  # signed for another
            assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_receiver"
            assert (await post(http, miner.address, miner.hotkey, b"{nope")).status_code == 400

            slow = devnet.miners[1]
            streamed = await post(http, slow.address, slow.hotkey, body(max_tokens=5))
            assert streamed.status_code == 200 and len(contents(streamed.text)) == 5  # chunked, token by token


async def test_the_validator_takes_scoring_posts_from_the_gateway_only(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []
    devnet: LeanDevnet = await nursery.start(LeanDevnet(["bench"], on_scored=seen.append).run)
    validator = devnet.validator
    payload = json.dumps({"body": {"seed": 3}, "uids": [0]}).encode()
    async with httpx.AsyncClient(timeout=5) as http:
        with trio.fail_after(10):
            ok = await post(http, validator.address, validator.hotkey, payload, path="/scoring")
            assert ok.status_code == 200 and ok.json() is None
            other = Signer(Keypair.create_from_uri("//someone"))
            assert (await post(http, validator.address, validator.hotkey, payload, path="/scoring",
                               signer=other)).status_code == 401
    assert seen == [payload] and validator.scored == 1 and validator.rejected == 1
    config = devnet.config()
    assert config["scoring"] == {"validator": validator.address, "validator_hotkey": validator.hotkey}
    assert [n["uid"] for n in config["subnet"]["neurons"]] == [0, 1, 2]  # the miner, validator, gateway


@pytest.mark.parametrize("fault", ["", "http_500", "stop_mid_stream", "garbage", "hang", "refuse"])
async def test_subnet_miners_do_what_their_plan_says(nursery: trio.Nursery, fault: str) -> None:
    plans: list[PlannedRequest] = []
    profile = MinerProfile(0, ttft_median_s=0.05, tokens_per_s=80.0, fault=fault)  # type: ignore[arg-type]
    devnet: LeanDevnet = await nursery.start(LeanDevnet(profiles=[profile], on_plan=plans.append).run)
    devnet.start_clock()
    miner = devnet.miners[0]
    # a seed whose plan is this fault (faults strike a share of requests)
    seed = next(s for s in range(1000) if profile.plan(s, 0.0).outcome == (fault or "ok"))
    got: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=1.0)) as http:
        with trio.fail_after(10):
            try:
                started = trio.current_time()
                async with http.stream("POST", f"http://{miner.address}/v1/chat/completions", content=body(seed, 10),
                                       headers=GATEWAY.headers(body(seed, 10), miner.hotkey)) as response:
                    got["status"] = response.status_code
                    got["text"] = ""
                    async for piece in response.aiter_text():
                        got.setdefault("first_at", trio.current_time() - started)
                        got["text"] += piece
            except httpx.ConnectError:
                got["error"] = "refused"
            except (httpx.RemoteProtocolError, httpx.ReadError):
                got["error"] = "broken"
            except httpx.ReadTimeout:
                got["error"] = "hung"
    plan = profile.plan(seed, 0.0)
    if fault == "refuse":
        assert got == {"error": "refused"} and plans == []
        return
    assert len(plans) == 1 and plans[0].seed == seed and plans[0].plan.outcome == plan.outcome
    if fault == "":
        assert got["status"] == 200 and len(contents(got["text"])) == 10 and got["text"].endswith("[DONE]\n\n")
        assert got["first_at"] == pytest.approx(plan.ttft_s, abs=0.05)
    elif fault == "http_500":
        assert got["status"] == 500
    elif fault == "stop_mid_stream":
        assert got["error"] == "broken" and len(contents(got["text"])) == 5
    elif fault == "garbage":
        # its first event is not JSON, and nothing follows it
        assert got["status"] == 200 and got["text"] == 'data: {"choices": [{"index": 0, "delta": {"content": "broken\n\n'

    else:
        assert got["status"] == 200 and got["text"] == "" and got["error"] == "hung"
