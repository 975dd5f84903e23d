"""Organic scoring against the devnet validator: real HTTP on loopback, real Epistula verification.

The forwarder alone (shuffled answer orders, a failing validator), then whole gateways: the validator
down, the gateway restarted in between, every payload delivered once when it is back.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from bittensor_core import Keypair

from actors.scoring.forwarder import ScoringForwarder
from actors.scoring.spool import Spool, SpoolFiles
from config.settings import AuthSettings, AvailabilitySettings, ScoringSettings, ServerSettings, Settings
from devnet.miner import DEFAULT_MODELS
from devnet.network import DEFAULT_GATEWAY_URI, Devnet
from devnet.validator import Validator
from engine.gateway import Gateway, run
from engine.supervisor import Supervisor
from tests.metrics_support import scrape
from tests.spool_faults import FailingFiles
from wire import jsonio
from wire.epistula import Signer
from wire.metagraph import SubnetSnapshot
from wire.organic import MinerAnswer, OrganicResult
from wire.snapshot import SnapshotCell

UIDS = (3, 17, 42, 8)
FAST_BACKOFF = {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 2.0}


def organic(i: int, order: tuple[int, ...]) -> OrganicResult:
    """A finished fan-out whose answers are listed in `order`; every chunk names its miner."""
    answers = tuple(
        MinerAnswer(uid=uid, hotkey=f"miner-{uid}", chunks=[f"m{uid}:r{i}:{k}" for k in range(uid % 3 + 1)],
                    timings=[0.01 * (k + 1) for k in range(uid % 3 + 1)],
                    raw_chunks=[jsonio.dumps({"choices": [{"index": 0, "delta": {"content": f"m{uid}:r{i}:{k}"}}]})
                                for k in range(uid % 3 + 1)])
        for uid in order
    )
    body = {"messages": [{"role": "user", "content": f"q{i}"}], "seed": i, "task": "InferenceTask"}
    return OrganicResult(request_id=f"r{i}", task="InferenceTask", body=body, answers=answers, created_at=0.0)


def shuffled_orders(n: int, seed: int = 5) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.sample(UIDS, len(UIDS))) for _ in range(n)]


def assert_attributed(payload: dict[str, Any]) -> None:
    """Every chunk, timing and raw chunk sits under the uid of the miner that produced it."""
    i = payload["body"]["seed"]
    for uid in UIDS:
        n = uid % 3 + 1
        assert payload["chunks"][str(uid)] == [f"m{uid}:r{i}:{k}" for k in range(n)]
        assert len(payload["timings"][str(uid)]) == n
        assert [c["choices"][0]["delta"]["content"] for c in payload["chunk_dicts_raw"][str(uid)]] == \
            payload["chunks"][str(uid)]


async def until(condition: Callable[[], bool], limit_s: float = 20.0) -> None:
    with trio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110 - the devnet's counters have no event to wait on
            await trio.sleep(0.02)


async def start_validator(nursery: trio.Nursery, gateway_hotkey: str) -> Validator:
    validator = Validator(gateway_hotkey=gateway_hotkey, miners=list, poll_interval_s=3600)
    await nursery.start(validator.run)
    return validator


def forwarder_for(validator: Validator, tmp_path: Path, signer: Signer, http: httpx.AsyncClient,
                  spool_files: SpoolFiles | None = None) -> ScoringForwarder:
    settings = Settings(
        scoring=ScoringSettings(validator=validator.address, validator_hotkey=validator.hotkey, **FAST_BACKOFF),
        base_dir=str(tmp_path),
    )
    return ScoringForwarder(settings, http=http, signer=signer, subnet=SnapshotCell(SubnetSnapshot(netuid=1)),
                            spool_files=spool_files, spool_retry_s=0.05)


async def test_devnet_validator_gets_every_answer_under_its_uid_whatever_the_order(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    signer = Signer(Keypair.create_from_uri("//scoring/gateway"))
    validator = await start_validator(nursery, signer.ss58)
    orders = shuffled_orders(30)
    async with httpx.AsyncClient(trust_env=False) as http:
        forwarder: ScoringForwarder = await nursery.start(forwarder_for(validator, tmp_path, signer, http).run)
        for i, order in enumerate(orders):
            forwarder.submit_nowait(organic(i, order))
        await until(lambda: validator.scored_total == 30)
        await trio.sleep(0.1)
    assert {r.status for r in validator.received} == {200}, "every request passed Epistula verification"
    assert validator.scored_total == 30
    by_seed = {p["body"]["seed"]: p for p in validator.scored}
    assert sorted(by_seed) == list(range(30))
    for i, order in enumerate(orders):
        assert by_seed[i]["uids"] == list(order)
        assert_attributed(by_seed[i])


async def test_devnet_validator_failing_then_healthy_gets_everything_once(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    signer = Signer(Keypair.create_from_uri("//scoring/gateway"))
    validator = await start_validator(nursery, signer.ss58)
    await validator.set_fault("http_500")
    async with httpx.AsyncClient(trust_env=False) as http:
        forwarder: ScoringForwarder = await nursery.start(forwarder_for(validator, tmp_path, signer, http).run)
        for i, order in enumerate(shuffled_orders(12)):
            forwarder.submit_nowait(organic(i, order))
        await until(lambda: forwarder.spool.pending == 12 and len(validator.received) >= 3)
        await validator.set_fault("")
        await until(lambda: validator.scored_total == 12)
        await trio.sleep(0.3)  # several back-off periods: a duplicate would show up
    assert Counter(p["body"]["seed"] for p in validator.scored) == Counter(range(12))
    assert {r.status for r in validator.received} == {200, 500}
    for payload in validator.scored:
        assert_attributed(payload)


async def test_a_full_disk_while_the_devnet_validator_is_down_delivers_each_payload_once(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """The audit's scenario over real HTTP: N payloads while the validator is down and every disk write
    fails with ENOSPC; the disk is freed, then the validator comes up: N distinct payloads in N
    deliveries, and the actor never restarted."""
    signer = Signer(Keypair.create_from_uri("//scoring/gateway"))
    validator = await start_validator(nursery, signer.ss58)
    await validator.go_down()
    disk = FailingFiles()
    disk.fail("create", "pwrite", "fsync", "fsync_dir", "write_atomic", "unlink")
    supervisor = Supervisor()
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            forwarder = forwarder_for(validator, tmp_path, signer, http, spool_files=disk)
            await supervisor.start(nursery, forwarder)
            for i, order in enumerate(shuffled_orders(60)):
                forwarder.submit_nowait(organic(i, order))
            await until(lambda: forwarder.spool_errors >= 3 and forwarder.attempts_failed >= 2)
            stats = forwarder.health()
            assert stats["overflow"] + stats["writing"] + stats["in_flight"] == 60
            assert stats["spool"]["failing"] and stats["spool"]["segments"] <= 1
            disk.heal()
            await until(lambda: forwarder.spool.pending == 60)
            await validator.come_up()
            await until(lambda: validator.scored_total == 60)
            await trio.sleep(0.5)  # several back-off periods: a duplicate would show up
            stats = forwarder.health()
    assert Counter(p["body"]["seed"] for p in validator.scored) == Counter(range(60)), "each exactly once"
    assert sum(r.status == 200 for r in validator.received) == 60, "N deliveries"
    assert supervisor.states["scoring"].restarts == 0
    assert all(v == 0 for v in stats["dropped"].values()) and stats["spool"]["pending"] == 0
    assert validator.misaligned == 0 and not validator.ignored


async def start_gateway(nursery: trio.Nursery, devnet: Devnet, tmp_path: Path, **scoring: Any) -> Gateway:
    settings = devnet.configure(dataclasses.replace(
        Settings(),
        server=ServerSettings(port=0),
        auth=AuthSettings(keys_file=str(tmp_path / "keys.toml")),
        availability=AvailabilitySettings(source="none"),
        base_dir=str(tmp_path),
    ))
    settings = dataclasses.replace(settings, scoring=dataclasses.replace(settings.scoring,
                                                                         **{**FAST_BACKOFF, **scoring}))
    gateway: Gateway = await nursery.start(partial(run, settings, source=devnet.source))
    return gateway


async def test_validator_down_across_a_gateway_restart_then_everything_arrives_once(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        devnet: Devnet = await nursery.start(Devnet(miners=1, validator_poll_s=3600).run)
        assert devnet.gateway_uri == DEFAULT_GATEWAY_URI
        validator = devnet.validator
        await validator.go_down()
        orders = shuffled_orders(40)

        first = await start_gateway(nursery, devnet, tmp_path)
        async with httpx.AsyncClient(base_url=first.url, trust_env=False) as client:
            ready = (await client.get("/health/ready")).json()
        assert ready["actors"]["scoring"]["status"] == "running"
        assert ready["scoring"]["enabled"] is True
        scoring = first.services.scoring
        for i in range(30):
            scoring.submit_nowait(organic(i, orders[i]))
        await until(lambda: scoring.attempts_failed >= 1)
        first.shutdown()  # some are still queued or in flight: the shutdown writes them to the spool
        await first.wait_stopped()
        spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
        spool.open()
        assert sorted(json.loads(r.payload)["body"]["seed"] for r in spool.read(1000).records) == list(range(30))
        spool.close()

        second = await start_gateway(nursery, devnet, tmp_path)  # restarted, the validator still down
        for i in range(30, 40):
            second.services.scoring.submit_nowait(organic(i, orders[i]))
        await trio.sleep(0.5)
        assert validator.scored_total == 0
        await validator.come_up()
        await until(lambda: validator.scored_total == 40)
        await trio.sleep(0.5)  # a duplicate would have arrived by now
        stats = second.services.scoring.health()
        second.shutdown()
        await second.wait_stopped()

    assert Counter(p["body"]["seed"] for p in validator.scored) == Counter(range(40)), "each exactly once"
    for payload in validator.scored:
        assert payload["uids"] == list(orders[payload["body"]["seed"]])
        assert_attributed(payload)
    assert {r.status for r in validator.received} == {200}
    assert stats["spool"]["pending"] == 0 and stats["dropped"] == dict.fromkeys(stats["dropped"], 0)


async def test_a_validator_refusing_the_gateways_hotkey_is_reported_and_everything_flows_once_fixed(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        devnet: Devnet = await nursery.start(Devnet(miners=1, validator_poll_s=3600,
                                                    validator_fault="refuse_signer").run)
        validator = devnet.validator
        gateway = await start_gateway(nursery, devnet, tmp_path, backoff_max_s=0.3)
        scoring = gateway.services.scoring
        orders = shuffled_orders(10)
        for i, order in enumerate(orders):
            scoring.submit_nowait(organic(i, order))
        await until(lambda: validator.refused >= 1)
        await trio.sleep(0.1)  # the first concurrent deliveries all learn it at once
        refused_before = validator.refused
        await trio.sleep(1.5)
        assert validator.refused - refused_before <= 1.5 / 0.3 + 2, "one probe per back-off period"

        ours = Keypair.create_from_uri(DEFAULT_GATEWAY_URI).ss58_address
        hint = (f"validator {validator.hotkey} at {validator.address} refuses our hotkey {ours} (HTTP 401): "
                f"set API_HOTKEY={ours} in that validator's environment and restart it")
        async with httpx.AsyncClient(base_url=gateway.url, trust_env=False) as client:
            ready = (await client.get("/health/ready")).json()
            metrics = scrape((await client.get("/metrics")).text)
        assert hint in ready["scoring"]["warnings"]
        state = ready["scoring"]["validators"][validator.hotkey]
        assert state["refused_signer"] is True and state["hint"] == hint
        assert ready["scoring"]["spool"]["pending"] + ready["scoring"]["overflow"] == 10, "kept, not lost"
        assert metrics.value("sn1_gateway_scoring_validators_refusing_signer") == 1
        assert metrics.value("sn1_gateway_scoring_validator_refused_signer", hotkey=validator.hotkey) == 1
        assert metrics.value("sn1_gateway_scoring_warnings") == 1

        await validator.set_fault("")  # the operator set API_HOTKEY to the gateway's hotkey
        await until(lambda: validator.scored_total == 10)
        await trio.sleep(0.5)
        async with httpx.AsyncClient(base_url=gateway.url, trust_env=False) as client:
            ready = (await client.get("/health/ready")).json()
        gateway.shutdown()
        await gateway.wait_stopped()
    assert Counter(p["body"]["seed"] for p in validator.scored) == Counter(range(10)), "each exactly once"
    assert ready["scoring"]["warnings"] == []
    assert ready["scoring"]["validators"][validator.hotkey]["refused_signer"] is False
    assert ready["scoring"]["spool"]["pending"] == 0


async def test_the_ordinary_devnet_flow_is_scored_not_ignored(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Chat requests through a gateway to devnet miners: the validator takes every organic as a real one
    would (its model, numeric sampling parameters, the gateway's hotkey)."""
    with trio.fail_after(60):
        devnet: Devnet = await nursery.start(Devnet(miners=3, validator_poll_s=3600).run)
        gateway = await start_gateway(nursery, devnet, tmp_path)
        key, _ = await gateway.services.keys.create(10_000)
        async with httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30,
                                     trust_env=False) as client:
            for i, extra in enumerate([{}, {"stream": True}, {"model": DEFAULT_MODELS[0], "max_tokens": 8},
                                       {"temperature": 0.2, "top_p": 0.9}]):
                response = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}],
                    **extra})
                assert response.status_code == 200, response.text
        await devnet.validator.wait_scored(4)
        gateway.shutdown()
        await gateway.wait_stopped()
    validator = devnet.validator
    assert validator.scored_total == 4
    assert (validator.refused, validator.failed, dict(validator.ignored)) == (0, 0, {})
    assert {r.status for r in validator.received if r.path == "/scoring"} == {200}


async def test_the_ordinary_devnet_flow_sends_aligned_chunks(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        devnet: Devnet = await nursery.start(Devnet(miners=3, validator_poll_s=3600).run)
        gateway = await start_gateway(nursery, devnet, tmp_path)
        key, _ = await gateway.services.keys.create(10_000)
        async with httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30,
                                     trust_env=False) as client:
            for i, stream in enumerate([False, True]):
                response = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"q{i}"}], "stream": stream})
                assert response.status_code == 200, response.text
        await devnet.validator.wait_scored(2)
        gateway.shutdown()
        await gateway.wait_stopped()
    assert devnet.validator.misaligned == 0, devnet.validator.first_misalignment
