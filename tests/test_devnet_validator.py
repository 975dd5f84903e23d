"""The simulated validator over real loopback HTTP: scoring records, availabilities, fault modes, and
what a real validator does with a scoring payload (API_HOTKEY, sampling parameters, ignored organics,
chunk alignment)."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from config.loading import ConfigError, load_settings
from devnet.miner import DEFAULT_MODELS, MinerFault
from devnet.network import Devnet
from devnet.validator import MISTRAL_SMALL, Validator, ValidatorFault, misalignment
from engine.cli import main
from wire.epistula import Signer


def raw(content: Any, **delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": content, **delta}}]}


PAYLOAD = {"body": {"seed": 1, "task": "InferenceTask", "messages": [{"role": "user", "content": "hi"}]},
           "uids": [1, 0], "chunks": {"1": ["Hel", "lo"], "0": []}, "timings": {"1": [0.03, 0.04], "0": []},
           "chunk_dicts_raw": {"1": [raw("Hel"), raw("lo")], "0": []}}


class Gateway:
    """Signs as the gateway (or as `uri`) and talks to the validator."""

    def __init__(self, http: httpx.AsyncClient, devnet: Devnet, uri: str | None = None) -> None:
        self.http = http
        self.devnet = devnet
        self.signer = Signer(Keypair.create_from_uri(uri or devnet.gateway_uri))

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
    assert devnet.validator.misaligned == 0 and not devnet.validator.ignored


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


# -- API_HOTKEY ---------------------------------------------------------------------------------


async def test_scoring_from_any_signer_but_its_api_hotkey_is_a_401(nursery: trio.Nursery) -> None:
    gateway_hotkey = Keypair.create_from_uri("//devnet/gateway").ss58_address
    validator = Validator(gateway_hotkey=gateway_hotkey, api_hotkey=Keypair.create_from_uri("//operator").ss58_address,
                          miners=list, poll_interval_s=3600)
    await nursery.start(validator.run)

    async def post(uri: str, path: str, payload: Any) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json",
                   **Signer(Keypair.create_from_uri(uri)).headers(body, validator.hotkey)}
        return await http.post(f"http://{validator.address}{path}", content=body, headers=headers)

    async with httpx.AsyncClient(timeout=10) as http:
        response = await post("//devnet/gateway", "/scoring", PAYLOAD)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "signer_not_api_hotkey"
        assert (await post("//devnet/gateway", "/miner_availabilities/miner_availabilities", None)).status_code \
            == 200, "only /scoring checks API_HOTKEY"
        assert (await post("//operator", "/scoring", PAYLOAD)).status_code == 200
        assert (await post("//someone/else", "/scoring", PAYLOAD)).status_code == 401
    assert validator.scored_total == 1 and validator.refused == 1  # the unknown signer fails Epistula first


async def test_refuse_signer_answers_401_to_every_scoring_post_until_healed(gateway: Gateway, devnet: Devnet) -> None:
    await devnet.validator.set_fault("refuse_signer")
    for _ in range(3):
        response = await gateway.score()
        assert response.status_code == 401 and response.json()["error"]["code"] == "signer_not_api_hotkey"
    assert (await gateway.availabilities([0])).status_code == 200
    assert devnet.validator.refused == 3 and not devnet.validator.scored
    await devnet.validator.set_fault("")
    assert (await gateway.score()).status_code == 200


def test_the_validator_fault_comes_from_the_config_and_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[devnet]\nvalidator_fault = "refuse_signer"\n', encoding="utf-8")
    devnet = Devnet.from_settings(load_settings(path))
    assert devnet.validator.fault is ValidatorFault.REFUSE_SIGNER
    with pytest.raises(ConfigError, match=r"devnet\.validator_fault: expected one of .*'refuse_signer'.*"
                                          r"found 'sideways'"):
        Devnet(miners=1, validator_fault="sideways")


def test_the_devnet_command_refuses_an_unknown_validator_fault(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devnet", "--miners", "1", "--validator-fault", "sideways"]) == 2
    assert "--validator-fault: expected one of" in capsys.readouterr().err


# -- what upstream does with a payload ---------------------------------------------------------


def with_body(**changes: Any) -> dict[str, Any]:
    payload = copy.deepcopy(PAYLOAD)
    payload["body"].update(changes)
    return payload


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.7, "stop": ["\n"]},  # a list, as an OpenAI `stop` mapped into it
    {"temperature": None},
    {"top_k": {"value": 5}},
    {"max_new_tokens": "256"},
    ["temperature", 0.7],
])
async def test_sampling_parameters_that_are_not_numbers_are_a_500(gateway: Gateway, devnet: Devnet,
                                                                 sampling: Any) -> None:
    response = await gateway.score(with_body(sampling_parameters=sampling))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "invalid_sampling_parameters"
    assert devnet.validator.failed == 1 and not devnet.validator.scored


async def test_numbers_and_booleans_are_fine_and_only_inference_is_checked(gateway: Gateway, devnet: Devnet) -> None:
    fine = with_body(sampling_parameters={"temperature": 0.7, "top_p": 0.95, "top_k": 50, "max_new_tokens": 64,
                                          "do_sample": True})
    assert (await gateway.score(fine)).status_code == 200
    retrieval = with_body(task="WebRetrievalTask", sampling_parameters={"stop": ["x"]})  # upstream reads no
    assert (await gateway.score(retrieval)).status_code == 200                         # sampling there
    assert devnet.validator.scored_total == 2 and devnet.validator.failed == 0


@pytest.mark.parametrize(("changes", "reason"), [
    ({"model": "someone/else-7b"}, "model"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages"),
    ({"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
])
async def test_organics_upstream_does_not_score_get_200_null_and_are_not_kept(
        gateway: Gateway, devnet: Devnet, changes: dict[str, Any], reason: str) -> None:
    response = await gateway.score(with_body(**changes))
    assert response.status_code == 200 and response.text == "null"
    assert not devnet.validator.scored and devnet.validator.scored_total == 0
    assert devnet.validator.ignored == {reason: 1}


async def test_a_payload_without_chunks_is_ignored(gateway: Gateway, devnet: Devnet) -> None:
    response = await gateway.score({**PAYLOAD, "chunks": {}})
    assert response.status_code == 200 and response.text == "null"
    assert devnet.validator.ignored == {"empty": 1} and not devnet.validator.scored


@pytest.mark.parametrize("model", [None, DEFAULT_MODELS[0], MISTRAL_SMALL])
async def test_its_own_model_mistral_small_or_none_are_scored(gateway: Gateway, devnet: Devnet,
                                                              model: str | None) -> None:
    assert (await gateway.score(with_body(model=model))).status_code == 200
    assert devnet.validator.scored_total == 1 and not devnet.validator.ignored


def test_the_validator_scores_the_model_devnet_miners_serve() -> None:
    validator = Validator(gateway_hotkey="5F", miners=list)
    assert validator.model in DEFAULT_MODELS


# -- chunk alignment ----------------------------------------------------------------------------


def aligned() -> dict[str, Any]:
    return {"uids": [3, 7], "chunks": {"3": ["a", "b"], "7": ["c"]}, "timings": {"3": [0.1, 0.2], "7": [0.1]},
            "chunk_dicts_raw": {"3": [raw("a"), raw("b")], "7": [raw("c")]}}


def test_an_aligned_payload_has_no_misalignment() -> None:
    assert misalignment(aligned()) is None
    assert misalignment({**aligned(), "uids": []}) is None


@pytest.mark.parametrize(("change", "expected"), [
    # a role-only first chunk kept in chunk_dicts_raw but not in chunks
    (lambda p: p["chunk_dicts_raw"]["3"].insert(0, raw("", role="assistant")),
     "uid 3: 2 chunks, 3 chunk_dicts_raw, 2 timings"),
    # a finish-only chunk at the end
    (lambda p: p["chunk_dicts_raw"]["7"].append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
     "uid 7: 1 chunks, 2 chunk_dicts_raw, 1 timings"),
    (lambda p: p["timings"]["3"].pop(), "uid 3: 2 chunks, 2 chunk_dicts_raw, 1 timings"),
    (lambda p: p["chunk_dicts_raw"]["3"].reverse(), "uid 3 index 0: chunk_dicts_raw content 'b' is not the chunk 'a'"),
    (lambda p: p["chunk_dicts_raw"]["7"].__setitem__(0, {"choices": []}),
     "uid 7 index 0: chunk_dicts_raw content (missing) is not the chunk 'c'"),
    (lambda p: p["chunk_dicts_raw"].pop("7"), "uid 7: 1 chunks, 0 chunk_dicts_raw, 1 timings"),
])
def test_misalignment_names_the_first_mismatch(change: Any, expected: str) -> None:
    payload = aligned()
    change(payload)
    assert misalignment(payload) == expected


async def test_a_misaligned_payload_is_taken_but_counted_with_its_first_mismatch(gateway: Gateway,
                                                                                devnet: Devnet) -> None:
    shifted = copy.deepcopy(PAYLOAD)
    shifted["chunk_dicts_raw"]["1"].insert(0, raw("", role="assistant"))
    assert (await gateway.score(shifted)).status_code == 200, "upstream penalises the miner, it takes the payload"
    assert (await gateway.score()).status_code == 200
    assert devnet.validator.scored_total == 2 and devnet.validator.misaligned == 1
    assert devnet.validator.first_misalignment == "uid 1: 2 chunks, 3 chunk_dicts_raw, 2 timings"
