"""The simulated validator over real loopback HTTP: scoring records, availabilities, fault modes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from devnet.miner import MinerFault
from devnet.network import Devnet
from engine.epistula import Signer

PAYLOAD = {"body": {"seed": 1, "task": "InferenceTask", "messages": [{"role": "user", "content": "hi"}]},
           "uids": [1, 0], "chunks": {"1": ["Hel", "lo"], "0": []}, "timings": {"1": [0.03, 0.04], "0": []},
           "chunk_dicts_raw": {"1": [], "0": []}}


class Gateway:
    """Signs as the gateway and talks to the validator."""

    def __init__(self, http: httpx.AsyncClient, devnet: Devnet) -> None:
        self.http = http
        self.devnet = devnet
        self.signer = Signer(Keypair.create_from_uri(devnet.gateway_uri))

    async def post(self, path: str, payload: Any) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **self.signer.headers(body, self.devnet.validator.hotkey)}
        return await self.http.post(f"http://{self.devnet.validator.address}{path}", content=body, headers=headers)

    async def score(self, payload: Any = PAYLOAD) -> httpx.Response:
        return await self.post("/scoring", payload)

    async def availabilities(self, uids: Any) -> httpx.Response:
        return await self.post("/miner_availabilities/miner_availabilities", uids)


@pytest.fixture
async def devnet(nursery: trio.Nursery) -> Devnet:
    devnet = Devnet(miners=3, validator_poll_s=0.1)
    devnet.validator.slow_s = 0.6
    await nursery.start(devnet.run)
    return devnet


@pytest.fixture
async def gateway(devnet: Devnet) -> AsyncIterator[Gateway]:
    async with httpx.AsyncClient(timeout=10, verify=False) as http:
        yield Gateway(http, devnet)


async def test_scoring_payloads_are_recorded_and_answered_with_null(gateway: Gateway, devnet: Devnet) -> None:
    response = await gateway.score()
    assert response.status_code == 200
    assert response.text == "null" and response.headers["content-type"] == "application/json"
    second = {**PAYLOAD, "uids": [2]}
    assert (await gateway.score(second)).status_code == 200
    assert list(devnet.validator.scored) == [PAYLOAD, second]
    assert devnet.validator.scored_total == 2


@pytest.mark.parametrize("payload", [[1, 2], {"body": {}}, {"uids": "1"}])
async def test_a_payload_of_the_wrong_shape_is_a_400_and_not_recorded(gateway: Gateway, devnet: Devnet,
                                                                       payload: Any) -> None:
    response = await gateway.score(payload)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_body"
    assert not devnet.validator.scored


async def test_availabilities_come_from_polling_the_miners(gateway: Gateway, devnet: Devnet) -> None:
    response = await gateway.availabilities([0, 2, 3, 99])
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == {"0", "2", "3", "99"}
    assert answer["3"] is None and answer["99"] is None  # the validator itself; an unknown uid
    for uid in ("0", "2"):
        assert answer[uid]["task_availabilities"]["InferenceTask"] is True
        assert answer[uid]["task_availabilities"]["ProgrammingTask"] is False
        assert answer[uid]["llm_model_availabilities"]["hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"] is True
    # The miners saw the validator's own signed polls.
    polls = [r for r in devnet.miners[0].received if r.path == "/availability"]
    assert polls and all(r.headers["epistula-signed-by"] == devnet.validator.hotkey for r in polls)


@pytest.mark.parametrize("everyone", [None, []])
async def test_null_or_empty_asks_for_every_miner(gateway: Gateway, everyone: Any) -> None:
    answer = (await gateway.availabilities(everyone)).json()
    assert set(answer) == {"0", "1", "2"}
    assert all(entry is not None for entry in answer.values())


async def test_a_body_that_is_not_uids_is_a_400(gateway: Gateway) -> None:
    response = await gateway.availabilities({"uids": [1]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_body"


async def test_a_miner_that_stops_answering_becomes_null(gateway: Gateway, devnet: Devnet) -> None:
    await devnet.miners[1].set_fault(MinerFault.HTTP_500)
    await devnet.miners[2].set_fault(MinerFault.REFUSE)
    with trio.fail_after(5):
        await devnet.validator.wait_next_poll()
    answer = (await gateway.availabilities([0, 1, 2])).json()
    assert answer["0"] is not None and answer["1"] is None and answer["2"] is None


async def test_down_refuses_connections_then_comes_back_on_the_same_port(gateway: Gateway,
                                                                         devnet: Devnet) -> None:
    address = devnet.validator.address
    await devnet.validator.go_down()
    with pytest.raises(httpx.ConnectError):
        await gateway.score()
    await devnet.validator.come_up()
    assert devnet.validator.address == address
    assert (await gateway.score()).status_code == 200
    assert list(devnet.validator.scored) == [PAYLOAD]


async def test_a_validator_can_start_down(nursery: trio.Nursery) -> None:
    devnet = Devnet(miners=1)
    devnet.validator.set_fault_nowait("down")
    await nursery.start(devnet.run)
    async with httpx.AsyncClient(verify=False) as http:
        gateway = Gateway(http, devnet)
        with pytest.raises(httpx.ConnectError):
            await gateway.score()
        await devnet.validator.set_fault("")
        assert (await gateway.score()).status_code == 200


async def test_http_500_answers_500_and_records_nothing(gateway: Gateway, devnet: Devnet) -> None:
    await devnet.validator.set_fault("http_500")
    response = await gateway.score()
    assert response.status_code == 500 and response.json()["error"]["code"] == "simulated_failure"
    assert (await gateway.availabilities([0])).status_code == 500
    assert not devnet.validator.scored


async def test_slow_answers_only_after_its_delay(gateway: Gateway, devnet: Devnet) -> None:
    await devnet.validator.set_fault("slow")
    answered: list[httpx.Response] = []

    async def score() -> None:
        answered.append(await gateway.score())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(score)
            await trio.sleep(0.4)
            assert not answered and not devnet.validator.scored
    assert answered[0].status_code == 200
    assert list(devnet.validator.scored) == [PAYLOAD]


async def test_wait_scored_returns_once_enough_payloads_arrived(gateway: Gateway, devnet: Devnet) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(devnet.validator.wait_scored, 2)
            await gateway.score()
            await trio.sleep(0.05)
            assert nursery.child_tasks  # still waiting for the second
            await gateway.score()
