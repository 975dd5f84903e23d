"""Every Epistula check of the devnet's miners and validator, over real loopback HTTP.

Each case builds a request with the real Signer and breaks exactly one thing; the receiver must answer
with that check's status and error code, and must not act on the request.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
import trio
from bittensor_core import Keypair

from devnet.network import Devnet
from wire.epistula import Signer


@dataclass
class Target:
    name: str
    path: str
    body: bytes
    address: str
    hotkey: str


@pytest.fixture
async def devnet(nursery: trio.Nursery) -> Devnet:
    devnet = Devnet(miners=2)
    await nursery.start(devnet.run)
    return devnet


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5, verify=False) as client:
        yield client


CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 1, "task": "InferenceTask"}).encode()
SCORING = json.dumps({"body": {"seed": 1}, "uids": [0], "chunks": {"0": ["a "]}, "timings": {"0": [0.1]}}).encode()

TARGETS: dict[str, Callable[[Devnet], Target]] = {
    "miner chat": lambda d: Target("miner", "/v1/chat/completions", CHAT, d.miners[0].address, d.miners[0].hotkey),
    "miner availability": lambda d: Target("miner", "/availability", b"{}", d.miners[0].address,
                                           d.miners[0].hotkey),
    "validator scoring": lambda d: Target("validator", "/scoring", SCORING, d.validator.address,
                                          d.validator.hotkey),
    "validator availabilities": lambda d: Target("validator", "/miner_availabilities/miner_availabilities",
                                                 b"[0, 1]", d.validator.address, d.validator.hotkey),
}


def gateway_signer(devnet: Devnet, *, skew_ms: int = 0) -> Signer:
    return Signer(Keypair.create_from_uri(devnet.gateway_uri),
                  clock_ms=lambda: time.time_ns() // 1_000_000 + skew_ms)


def broken_request(case: str, devnet: Devnet, target: Target) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a request with exactly one defect."""
    body = target.body
    if case == "unsigned":
        return body, {}
    if case == "stale":
        return body, gateway_signer(devnet, skew_ms=-9_000).headers(body, target.hotkey)
    if case == "future":
        return body, gateway_signer(devnet, skew_ms=5_000).headers(body, target.hotkey)
    if case == "unknown signer":
        return body, Signer(Keypair.create_from_uri("//Mallory")).headers(body, target.hotkey)
    if case == "wrong receiver":
        return body, gateway_signer(devnet).headers(body, devnet.miners[1].hotkey)
    headers = gateway_signer(devnet).headers(body, target.hotkey)
    if case == "forged signature":
        signature = bytearray(bytes.fromhex(headers["Epistula-Request-Signature"][2:]))
        signature[10] ^= 0x01
        return body, {**headers, "Epistula-Request-Signature": "0x" + signature.hex()}
    if case == "body changed by one byte":
        changed = bytearray(body)
        changed[-2] = ord("2") if changed[-2] != ord("2") else ord("3")
        return bytes(changed), headers
    raise AssertionError(case)


CASES = {
    "unsigned": (400, "missing_headers"),
    "forged signature": (400, "bad_signature"),
    "wrong receiver": (400, "wrong_receiver"),
    "unknown signer": (401, "unknown_signer"),
    "stale": (400, "stale"),
    "future": (400, "from_the_future"),
    "body changed by one byte": (400, "bad_signature"),
}


@pytest.mark.parametrize("target_name", list(TARGETS))
@pytest.mark.parametrize("case", list(CASES))
async def test_a_broken_signature_is_rejected_with_its_reason(
    devnet: Devnet, http: httpx.AsyncClient, target_name: str, case: str
) -> None:
    target = TARGETS[target_name](devnet)
    body, headers = broken_request(case, devnet, target)
    response = await http.post(f"http://{target.address}{target.path}", content=body,
                               headers={"Content-Type": "application/json", **headers})
    status, code = CASES[case]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    receiver = devnet.validator if target.name == "validator" else devnet.miners[0]
    not_polls = [r for r in receiver.received if r.headers.get("epistula-signed-by") != devnet.validator.hotkey]
    assert [(r.path, r.status, r.body) for r in not_polls] == [(target.path, status, body)]
    assert not devnet.validator.scored


@pytest.mark.parametrize("target_name", list(TARGETS))
async def test_a_replayed_request_is_rejected(devnet: Devnet, http: httpx.AsyncClient, target_name: str) -> None:
    target = TARGETS[target_name](devnet)
    headers = {"Content-Type": "application/json", **gateway_signer(devnet).headers(target.body, target.hotkey)}
    url = f"http://{target.address}{target.path}"
    first = await http.post(url, content=target.body, headers=headers)
    assert first.status_code == 200, first.text
    again = await http.post(url, content=target.body, headers=headers)
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "replayed"
    if target_name == "validator scoring":
        assert len(devnet.validator.scored) == 1


async def test_a_miner_also_accepts_the_validator_but_the_validator_only_the_gateway(
    devnet: Devnet, http: httpx.AsyncClient
) -> None:
    validator_signer = Signer(devnet.validator.keypair)
    miner = devnet.miners[0]
    to_miner = validator_signer.headers(CHAT, miner.hotkey)
    response = await http.post(f"http://{miner.address}/v1/chat/completions", content=CHAT, headers=to_miner)
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    miner_signer = Signer(miner.keypair)
    to_validator = miner_signer.headers(SCORING, devnet.validator.hotkey)
    response = await http.post(f"http://{devnet.validator.address}/scoring", content=SCORING, headers=to_validator)
    assert response.status_code == 401
    assert not devnet.validator.scored
