"""Availability polling and miner selection."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from actors.availability import AvailabilityActor, AvailabilitySnapshot, MinerAvailability, validator_for
from actors.fanout.breaker import MinerHealth
from actors.fanout.selection import SelectionError, Selector
from config.settings import AvailabilitySettings, ScoringSettings, Settings
from wire.epistula import Signer
from wire.metagraph import Neuron, SubnetSnapshot
from wire.snapshot import SnapshotCell

MODEL = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"


def miner(uid: int, incentive: float, *, axon: bool = True, permit: bool = False, stake: float = 0.0) -> Neuron:
    return Neuron(uid=uid, hotkey=f"hk{uid}", axon=f"127.0.0.1:{9000 + uid}" if axon else None,
                  incentive=incentive, stake=stake, validator_permit=permit)


def available(tasks: tuple[str, ...] = ("InferenceTask",), models: tuple[str, ...] = ()) -> MinerAvailability:
    return MinerAvailability(tasks=frozenset(tasks), models=frozenset(models), seen_at=0.0)


def selector(neurons: list[Neuron], availability: AvailabilitySnapshot, *, top_pool: int = 50,
             health: MinerHealth | None = None) -> Selector:
    return Selector(
        SnapshotCell(SubnetSnapshot.of(1, neurons)), SnapshotCell(availability),
        health or MinerHealth(failure_threshold=1, cooldown_s=60, clock=lambda: 0.0),
        validator_stake_limit=1000.0, top_pool=top_pool, rng=random.Random(1),
    )


def test_eligibility_rules() -> None:
    neurons = [
        miner(0, 0.9, axon=False),  # serves nothing
        miner(1, 0.8, permit=True, stake=5000.0),  # a validator
        miner(2, 0.7, permit=True, stake=10.0),  # a permit but little stake: still a miner
        miner(3, 0.6),  # not available for the task
        miner(4, 0.5),
    ]
    avail = AvailabilitySnapshot(source="validator", ever_known=True, miners={
        1: available(), 2: available(), 3: available(("WebRetrievalTask",)), 4: available(), 0: available()})
    chosen = selector(neurons, avail).pick("InferenceTask", None, 10)
    assert sorted(n.uid for n in chosen) == [2, 4]


def test_model_filter_and_unknown_model() -> None:
    neurons = [miner(1, 0.5), miner(2, 0.4)]
    avail = AvailabilitySnapshot(source="validator", ever_known=True, miners={
        1: available(models=(MODEL,)), 2: available(models=("other",))})
    sel = selector(neurons, avail)
    assert [n.uid for n in sel.pick("InferenceTask", MODEL, 5)] == [1]
    with pytest.raises(SelectionError) as info:
        sel.pick("InferenceTask", "nobody/serves-this", 5)
    assert info.value.status == 404 and "other" in str(info.value)


def test_top_pool_takes_best_incentive() -> None:
    neurons = [miner(uid, incentive=uid / 100) for uid in range(1, 21)]
    sel = selector(neurons, AvailabilitySnapshot(source="none"), top_pool=5)
    seen = {n.uid for _ in range(50) for n in sel.pick("InferenceTask", None, 3)}
    assert seen == {16, 17, 18, 19, 20}


def test_open_breakers_are_skipped() -> None:
    clock = [0.0]
    health = MinerHealth(failure_threshold=1, cooldown_s=60, clock=lambda: clock[0])
    sel = selector([miner(1, 0.5), miner(2, 0.4)], AvailabilitySnapshot(source="none"), health=health)
    health.failed(1, "HTTP 500")
    assert [n.uid for n in sel.pick("InferenceTask", None, 5)] == [2]
    health.failed(2, "HTTP 500")
    with pytest.raises(SelectionError) as info:
        sel.pick("InferenceTask", None, 5)
    assert info.value.status == 503
    clock[0] = 61.0  # half-open: one trial each
    picked = sel.pick("InferenceTask", None, 5)
    assert sorted(n.uid for n in picked) == [1, 2]
    assert all(health.asking(n.uid) for n in picked)  # what the fan-out does as it starts them
    with pytest.raises(SelectionError):
        sel.pick("InferenceTask", None, 5)  # trials in flight
    assert not health.asking(1)  # a trial is taken once


def test_explicit_uids() -> None:
    sel = selector([miner(1, 0.5), miner(2, 0.4, axon=False)], AvailabilitySnapshot(source="none"))
    assert [n.uid for n in sel.explicit([1])] == [1]
    with pytest.raises(SelectionError) as info:
        sel.explicit([1, 99])
    assert info.value.status == 400 and "99" in str(info.value)
    with pytest.raises(SelectionError) as info:
        sel.explicit([2])
    assert info.value.status == 400


def test_never_known_falls_back_to_every_serving_miner() -> None:
    sel = selector([miner(1, 0.5), miner(2, 0.4)], AvailabilitySnapshot(source="validator"))
    assert sorted(n.uid for n in sel.pick("InferenceTask", MODEL, 5)) == [1, 2]


def test_index_is_rebuilt_only_for_new_snapshots() -> None:
    sel = selector([miner(1, 0.5)], AvailabilitySnapshot(source="none"))
    first = sel.index()
    assert sel.index() is first
    sel.subnet.publish(SubnetSnapshot.of(1, [miner(1, 0.5), miner(2, 0.6)]))
    assert sel.index() is not first
    assert [n.uid for n in sel.index().eligible("InferenceTask", None)] == [2, 1]


# -- the availability actor -----------------------------------------------------------------------


def settings_for(source: str) -> Settings:
    return dataclasses.replace(
        Settings(),
        availability=AvailabilitySettings(source=source, interval_s=10.0),  # type: ignore[arg-type]
        scoring=ScoringSettings(validator="127.0.0.1:8999", validator_hotkey=Keypair.create_from_uri("//V").ss58_address),
    )


class Validator:
    def __init__(self) -> None:
        self.status = 200
        self.calls: list[Any] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(json.loads(request.content))
        assert request.headers["Epistula-Signed-For"] == Keypair.create_from_uri("//V").ss58_address
        if self.status != 200:
            return httpx.Response(self.status)
        return httpx.Response(200, json={
            "1": {"task_availabilities": {"InferenceTask": True, "WebRetrievalTask": False},
                  "llm_model_availabilities": {MODEL: True}},
            "2": None,
        })


async def test_validator_source_keeps_last_answers_on_failure(autojump_clock: Any, nursery: trio.Nursery) -> None:
    validator = Validator()
    subnet = SnapshotCell(SubnetSnapshot.of(1, [miner(1, 0.5), miner(2, 0.4)]))
    clock = [1000.0]
    actor = AvailabilityActor(settings_for("validator"), subnet,
                              httpx.AsyncClient(transport=httpx.MockTransport(validator.handle)),
                              Signer(Keypair.create_from_uri("//G")), wall_clock=lambda: clock[0])
    cell = (await nursery.start(actor.run)).cell
    await trio.sleep(1)
    snap = cell.get()
    assert validator.calls == [[1, 2]]
    assert snap.serves(1, "InferenceTask", MODEL) and not snap.serves(1, "WebRetrievalTask", None)
    assert not snap.serves(2, "InferenceTask", None)
    validator.status = 500
    clock[0] += 35
    await trio.sleep(10)
    assert len(validator.calls) == 2
    assert cell.get() is snap  # the last known answers, not "everyone"
    health = actor.health()
    assert health["stale"] and "HTTP 500" in health["last_error"] and health["age_s"] == 35


async def test_validator_never_reached_means_fallback_reported(autojump_clock: Any, nursery: trio.Nursery) -> None:
    validator = Validator()
    validator.status = 503
    actor = AvailabilityActor(settings_for("validator"), SnapshotCell(SubnetSnapshot.of(1, [miner(1, 0.5)])),
                              httpx.AsyncClient(transport=httpx.MockTransport(validator.handle)),
                              Signer(Keypair.create_from_uri("//G")))
    cell = (await nursery.start(actor.run)).cell
    await trio.sleep(1)
    assert cell.get().everyone
    assert actor.health()["fallback_every_serving_miner"] is True


async def test_miners_source_asks_each_miner(autojump_clock: Any, nursery: trio.Nursery) -> None:
    asked: list[int] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        port = request.url.port or 0
        asked.append(port)
        if port == 9002:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"task_availabilities": {"InferenceTask": True},
                                         "llm_model_availabilities": {MODEL: port == 9001}})

    actor = AvailabilityActor(settings_for("miners"),
                              SnapshotCell(SubnetSnapshot.of(1, [miner(1, 0.5), miner(2, 0.4), miner(3, 0.3)])),
                              httpx.AsyncClient(transport=httpx.MockTransport(handle)),
                              Signer(Keypair.create_from_uri("//G")))
    cell = (await nursery.start(actor.run)).cell
    await trio.sleep(9.9)  # one round: the asks are spread over the interval
    assert sorted(asked) == [9001, 9002, 9003]
    await trio.sleep(0.2)
    snap = cell.get()
    assert snap.serves(1, "InferenceTask", MODEL) and not snap.serves(3, "InferenceTask", MODEL)
    assert not snap.serves(2, "InferenceTask", None)  # never answered: not available
    assert snap.models() == [MODEL]


async def test_miners_source_never_asks_a_validator(autojump_clock: Any, nursery: trio.Nursery) -> None:
    asked: list[int] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.port or 0)
        return httpx.Response(200, json={"task_availabilities": {"InferenceTask": True},
                                         "llm_model_availabilities": {MODEL: True}})

    validator = miner(4, 0.0, permit=True, stake=5e4)  # serving, with a permit and the stake of a validator
    small = miner(5, 0.2, permit=True, stake=10.0)  # a permit under fanout.validator_stake_limit: a miner
    actor = AvailabilityActor(settings_for("miners"),
                              SnapshotCell(SubnetSnapshot.of(1, [miner(1, 0.5), validator, small])),
                              httpx.AsyncClient(transport=httpx.MockTransport(handle)),
                              Signer(Keypair.create_from_uri("//G")))
    await actor.poll_miners(spread_s=1.0)
    assert sorted(asked) == [9001, 9005]  # before: the validator's axon was asked too
    assert sorted(uid for uid, found in actor.cell.get().miners.items() if found is not None) == [1, 5]


def test_the_configured_validator_is_asked_under_its_metagraph_hotkey() -> None:
    settings = dataclasses.replace(Settings(), scoring=ScoringSettings(validator="127.0.0.1:8999"))
    listed = Neuron(uid=9, hotkey="hk-validator", axon="127.0.0.1:8999", validator_permit=True, stake=5e4)
    assert validator_for(settings, SubnetSnapshot.of(1, [miner(1, 0.5), listed])) == ("127.0.0.1:8999", "hk-validator")
    assert validator_for(settings, SubnetSnapshot.of(1, [miner(1, 0.5)])) is None  # never an empty receiver
    named = dataclasses.replace(settings, scoring=ScoringSettings(validator="127.0.0.1:8999", validator_hotkey="hk"))
    assert validator_for(named, SubnetSnapshot.of(1, [listed])) == ("127.0.0.1:8999", "hk")


def test_unknown_model_names_do_not_grow_the_index() -> None:
    sel = selector([miner(1, 0.5)], AvailabilitySnapshot(source="validator", miners={1: available(models=(MODEL,))},
                                                            ever_known=True))
    index = sel.index()
    for i in range(100):
        with pytest.raises(SelectionError):
            sel.pick("InferenceTask", f"made-up-{i}", 1)
    assert sel.index() is index and len(index._memo) <= 3


def test_only_the_trial_a_request_holds_is_given_back() -> None:
    clock = [0.0]
    health = MinerHealth(failure_threshold=1, cooldown_s=10, clock=lambda: clock[0])
    health.failed(1, "HTTP 500")
    clock[0] = 11.0
    first = health.asking(1)
    assert first == 1 and not health.allows(1)
    health.failed(1, "HTTP 500", first)  # the trial failed: open again, for longer
    clock[0] = 100.0
    second = health.asking(1)
    assert second == 2
    health.released(1, first)  # the first request, cut short at last
    assert not health.allows(1), "the second trial still runs"
    health.released(1, second)
    assert health.allows(1)


def test_only_the_request_holding_the_trial_decides_it() -> None:
    clock = [0.0]
    health = MinerHealth(failure_threshold=1, cooldown_s=10, clock=lambda: clock[0])
    health.failed(1, "HTTP 500")
    clock[0] = 11.0
    trial = health.asking(1)
    # Requests started before the breaker opened end now: they are counted, they decide nothing.
    health.failed(1, "HTTP 500")
    health.succeeded(1, 0.1)
    assert health.state(1) == "half_open" and not health.allows(1)
    assert health.report()["1"]["failures"] == 2 and health.report()["1"]["successes"] == 1
    health.succeeded(1, 0.1, trial)
    assert health.state(1) == "closed"


def test_requests_naming_their_miners_move_no_breaker() -> None:
    health = MinerHealth(failure_threshold=2, cooldown_s=10, clock=lambda: 0.0)
    for _ in range(5):
        health.failed(1, "HTTP 500", moves=False)
    assert health.state(1) == "closed" and health.report()["1"]["failures"] == 5
    health.failed(1, "HTTP 500")
    health.failed(1, "HTTP 500")
    assert health.state(1) == "open"
    health.succeeded(1, 0.1, moves=False)
    assert health.state(1) == "open"
