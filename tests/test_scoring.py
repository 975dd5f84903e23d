"""The scoring forwarder against scripted validators (httpx.MockTransport).

What a validator receives (payload, uid attribution, signature), which validator is chosen, back-off,
backpressure, and that nothing is lost across a validator outage and a restart.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from actors.scoring.forwarder import ScoringForwarder
from actors.scoring.spool import Spool, SpoolFiles
from engine.supervisor import Supervisor
from tests.scoring_support import (
    T,
    Validators,
    hotkey,
    large_organic,
    organic,
    run_inline,
    settings_for,
    subnet_of,
    until,
    validator,
)
from tests.spool_faults import FailingFiles
from wire import jsonio
from wire.epistula import Signer, Verifier
from wire.metagraph import SubnetSnapshot
from wire.snapshot import SnapshotCell


@pytest.fixture
def validators() -> Validators:
    return Validators()


@pytest.fixture
def signer() -> Signer:
    return Signer(Keypair.create_from_uri("//Gateway"))


MakeForwarder = Callable[..., ScoringForwarder]


@pytest.fixture
def make(tmp_path: Path, validators: Validators, signer: Signer) -> MakeForwarder:
    def build(subnet: SnapshotCell[SubnetSnapshot] | None = None, rng: random.Random | None = None,
              inline_io: bool = False, run_sync: Any = None, spool_files: SpoolFiles | None = None,
              wall_clock: Callable[[], float] | None = None, **scoring: Any) -> ScoringForwarder:
        http = httpx.AsyncClient(transport=httpx.MockTransport(validators.handle))
        return ScoringForwarder(
            settings_for(tmp_path, **scoring), http=http, signer=signer,
            subnet=subnet or subnet_of(validator(1, 5000.0)), rng=rng or random.Random(0),
            run_sync=run_sync or (run_inline if inline_io else trio.to_thread.run_sync),
            spool_files=spool_files, wall_clock=wall_clock or time.time,
        )
    return build


async def test_validator_receives_every_answer_under_its_own_uid_signed_for_it(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, signer: Signer) -> None:
    neuron = validator(1, 5000.0)
    forwarder: ScoringForwarder = await nursery.start(make(subnet_of(neuron)).run)
    shuffled = [(40, 7, 12), (7, 12, 40), (12, 40, 7)]  # the order the miners were asked / answered in
    for i, uids in enumerate(shuffled):
        forwarder.submit_nowait(organic(i, uids))
    await until(lambda: len(validators.delivered) == 3)

    by_seed = {payload["body"]["seed"]: payload for _, payload in validators.delivered}
    for i, uids in enumerate(shuffled):
        payload = by_seed[i]
        assert payload["uids"] == list(uids)
        assert payload["body"] == {"messages": [{"role": "user", "content": f"question {i}"}], "seed": i,
                                   "task": "InferenceTask"}
        assert payload["chunks"] == {"12": [f"r{i}-m12-a", f"r{i}-m12-b"], "40": [f"r{i}-m40-a", f"r{i}-m40-b"],
                                     "7": [f"r{i}-m7"]}
        assert payload["timings"] == {"12": [0.12, 0.24], "40": [0.4, 0.8], "7": [pytest.approx(0.21)]}
        assert payload["chunk_dicts_raw"]["40"] == [{"choices": [{"index": 0, "delta": {"content": f"r{i}-m40"}}]}]
    request = validators.requests[0]
    assert request.method == "POST" and request.url == f"http://{neuron.axon}/scoring"
    assert request.headers["content-type"] == "application/json"
    verifier = Verifier(neuron.hotkey, {signer.ss58})
    for request in validators.requests:
        assert verifier.verify(request.headers, request.content) == signer.ss58
    assert forwarder.health()["delivered"] == 3


async def test_configured_validator_wins_over_the_metagraph(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    forwarder = make(subnet_of(validator(1, 5000.0), validator(2, 9000.0)),
                     validator="192.168.5.5:9000", validator_hotkey=hotkey("Configured"))
    await nursery.start(forwarder.run)
    for i in range(5):
        forwarder.submit_nowait(organic(i))
    await until(lambda: len(validators.delivered) == 5)
    assert {axon for axon, _ in validators.delivered} == {"192.168.5.5:9000"}
    assert {r.headers["epistula-signed-for"] for r in validators.requests} == {hotkey("Configured")}


async def test_configured_validator_without_hotkey_takes_it_from_the_metagraph(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    listed = validator(3, 0.0, permit=False)  # no permit or stake needed when it is configured
    forwarder = make(subnet_of(validator(1, 5000.0), listed), validator=listed.axon)
    await nursery.start(forwarder.run)
    forwarder.submit_nowait(organic(0))
    await until(lambda: len(validators.delivered) == 1)
    assert validators.requests[0].headers["epistula-signed-for"] == listed.hotkey


async def test_metagraph_choice_is_weighted_by_stake_among_eligible_validators(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    small, big = validator(1, 1000.0), validator(2, 3000.0)
    ineligible = [
        validator(3, 999.0),  # below min_validator_stake
        validator(4, 9000.0, permit=False),
        validator(5, 9000.0, axon=None),  # serves nothing
    ]
    forwarder = make(subnet_of(small, big, *ineligible), rng=random.Random(1))
    await nursery.start(forwarder.run)
    for i in range(400):
        forwarder.submit_nowait(organic(i))
    await until(lambda: len(validators.delivered) == 400)
    counts = Counter(axon for axon, _ in validators.delivered)
    assert set(counts) == {small.axon, big.axon}
    assert 2.2 < counts[big.axon] / counts[small.axon] < 4.2


@pytest.mark.parametrize("failure", ["500", "hang", "refuse"])
async def test_a_failing_validator_backs_off_exponentially_then_gets_the_payload_once(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock,
        failure: str) -> None:
    neuron = validator(1, 5000.0)
    forwarder = make(subnet_of(neuron), inline_io=True, timeout_s=5.0)
    await nursery.start(forwarder.run)
    validators.default = failure
    start = trio.current_time()
    forwarder.submit_nowait(organic(0))
    def failures() -> int:
        state = forwarder.health()["validators"].get(neuron.hotkey)
        return 0 if state is None else int(state["consecutive_failures"])

    await until(lambda: failures() == 4, limit_s=600)
    assert 4.0 < forwarder.health()["validators"][neuron.hotkey]["backoff_remaining_s"] <= 8.0
    assert len(validators.attempts) == 4 and validators.delivered == []
    validators.default = "ok"
    await until(lambda: len(validators.delivered) == 1, limit_s=600)

    times = [t - start for _, t in validators.attempts]
    answer_time = 5.0 if failure == "hang" else 0.0  # a hanging validator is given up on after timeout_s
    gaps = [b - a - answer_time for a, b in itertools.pairwise(times)]
    # Never retried before its back-off is over. (Later is possible: the autojump clock moves on while
    # a worker thread writes the spool.)
    assert len(gaps) == 4
    assert all(gap >= want - 1e-6 for gap, want in zip(gaps, [1.0, 2.0, 4.0, 8.0], strict=True)), gaps
    assert validators.request_ids() == [0]
    await until(lambda: forwarder.spool.pending == 0)  # the cursor moves once the 200 is in
    stats = forwarder.health()
    assert stats["validators"][neuron.hotkey]["consecutive_failures"] == 0
    assert stats["attempts_failed"] == 4 and stats["delivered"] == 1 and stats["spool"]["pending"] == 0


async def test_a_validator_in_back_off_is_skipped_for_the_others(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock
) -> None:
    down, up = validator(1, 5000.0), validator(2, 5000.0)
    validators.modes[str(down.axon)] = "500"
    forwarder = make(subnet_of(down, up), inline_io=True, backoff_base_s=100.0, rng=random.Random(3))
    await nursery.start(forwarder.run)
    for i in range(50):
        forwarder.submit_nowait(organic(i))
        await trio.sleep(0.5)
    await until(lambda: len(validators.delivered) == 50)
    tried_down = [t for axon, t in validators.attempts if axon == down.axon]
    assert len(tried_down) == 1, "not tried again while in back-off"
    assert sorted(validators.request_ids()) == list(range(50))
    assert {axon for axon, _ in validators.delivered} == {up.axon}


async def test_concurrent_failures_of_one_outage_count_as_one_back_off_step(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock
) -> None:
    neuron = validator(1, 5000.0)
    validators.default = "500"
    validators.gate = trio.Event()
    forwarder = make(subnet_of(neuron), inline_io=True, concurrency=8)
    await nursery.start(forwarder.run)
    for i in range(8):
        forwarder.submit_nowait(organic(i))
    await until(lambda: len(validators.attempts) == 8)  # all eight are sent before any answer comes
    validators.gate.set()
    await until(lambda: forwarder.health()["spool"]["pending"] == 8)
    state = forwarder.health()["validators"][neuron.hotkey]
    assert state["failures"] == 8
    assert state["consecutive_failures"] == 1
    assert 0.0 < state["backoff_remaining_s"] <= 1.0  # one step: the first back-off, not 2**7 s


async def test_disabled_scoring_forwards_and_stores_nothing(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, tmp_path: Path) -> None:
    forwarder = make(enabled=False)
    await nursery.start(forwarder.run)
    for i in range(3):
        forwarder.submit_nowait(organic(i))
    await trio.sleep(0.05)
    assert validators.attempts == []
    assert not (tmp_path / "spool").exists()
    stats = forwarder.health()
    assert stats["ignored"]["disabled"] == 3 and stats["submitted"] == 0


async def test_only_inference_and_web_retrieval_results_are_forwarded(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    forwarder: ScoringForwarder = await nursery.start(make().run)
    forwarder.submit_nowait(organic(0, task="InferenceTask"))
    forwarder.submit_nowait(organic(1, task="MultiStepReasoningTask"))
    forwarder.submit_nowait(organic(2, task="WebRetrievalTask"))
    forwarder.submit_nowait(organic(3, task="ProgrammingTask"))
    forwarder.submit_nowait(organic(4, uids=()))  # nobody was asked: nothing to score
    await until(lambda: len(validators.delivered) == 2)
    await trio.sleep(0.05)
    assert sorted((p["body"]["seed"], p["body"]["task"]) for _, p in validators.delivered) == [
        (0, "InferenceTask"), (2, "WebRetrievalTask")]
    assert forwarder.health()["ignored"] == {"disabled": 0, "not_scored": 2, "no_miners": 1}


async def test_a_full_queue_spills_to_the_spool_and_nothing_is_lost(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    validators.gate = trio.Event()  # the validator is slow: nothing is answered yet
    forwarder = make(queue_size=2, concurrency=1, overflow_size=100)
    await nursery.start(forwarder.run)
    await trio.sleep(0.01)  # the delivery task is waiting for work
    for i in range(30):
        forwarder.submit_nowait(organic(i))  # synchronous: it cannot block the request's task
    stats = forwarder.health()
    # One went straight to the waiting delivery task, two fill the queue, the rest spill.
    assert (stats["queued"], stats["overflow"]) == (2, 27)
    await until(lambda: forwarder.spool.pending == 27)
    assert forwarder.health()["spooled"] == 27
    validators.gate.set()
    await until(lambda: len(validators.delivered) == 30)
    await trio.sleep(0.05)
    assert sorted(validators.request_ids()) == list(range(30))
    assert forwarder.health()["dropped"]["overflow"] == 0


async def test_when_even_the_overflow_buffer_is_full_results_are_dropped_and_counted(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    forwarder = make(queue_size=1, concurrency=1, overflow_size=3)
    await nursery.start(forwarder.run)
    await trio.sleep(0.01)  # the delivery task is waiting for work
    for i in range(10):
        forwarder.submit_nowait(organic(i))
    # Kept: one for the waiting delivery task, one in the queue, three in the overflow buffer.
    assert forwarder.health()["dropped"]["overflow"] == 5
    await until(lambda: len(validators.delivered) == 5)
    await trio.sleep(0.05)
    assert sorted(validators.request_ids()) == [0, 1, 2, 3, 4]


def spooled_seeds(folder: Path) -> list[int]:
    spool = Spool(folder, max_bytes=1 << 30)
    spool.open()
    try:
        return [json.loads(r.payload)["body"]["seed"] for r in spool.read(100_000).records]
    finally:
        spool.close()


async def test_shutdown_writes_queued_and_in_flight_payloads_to_the_spool(
        make: MakeForwarder, validators: Validators, tmp_path: Path) -> None:
    validators.default = "hang"  # deliveries are in flight when the shutdown comes
    forwarder = make(queue_size=100, concurrency=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        for i in range(20):
            forwarder.submit_nowait(organic(i))
        await until(lambda: forwarder.health()["in_flight"] == 2)
        nursery.cancel_scope.cancel()
    seeds = spooled_seeds(tmp_path / "spool")
    assert sorted(seeds) == list(range(20))
    # The spooled bytes are exactly what would have been sent.
    spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
    spool.open()
    assert {r.payload for r in spool.read(100).records} == {organic(i).encode() for i in range(20)}


async def test_a_spool_write_cut_short_by_shutdown_is_written_by_the_flush(
        make: MakeForwarder, validators: Validators, tmp_path: Path) -> None:
    validators.default = "500"
    held: list[Any] = []

    async def run_sync(sync_fn: Callable[..., T], *args: Any) -> T:
        if getattr(sync_fn, "__name__", "") == "_store" and not held:
            held.append(args)  # the spool writer's first batch waits (for a thread, say) and is cancelled
            await trio.sleep_forever()
        return await trio.to_thread.run_sync(sync_fn, *args)

    forwarder = make(run_sync=run_sync, concurrency=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        for i in range(5):
            forwarder.submit_nowait(organic(i))
        await until(lambda: bool(held) and forwarder.health()["queued"] == 0)
        nursery.cancel_scope.cancel()
    assert sorted(spooled_seeds(tmp_path / "spool")) == list(range(5))


async def test_a_payload_that_is_not_json_is_dropped_and_counted_the_rest_delivered(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    forwarder: ScoringForwarder = await nursery.start(make().run)
    broken = organic(1)
    broken.body["extra"] = {1, 2}  # a set: no JSON for it
    for result in (organic(0), broken, organic(2)):
        forwarder.submit_nowait(result)
    await until(lambda: len(validators.delivered) == 2)
    assert sorted(validators.request_ids()) == [0, 2]
    assert forwarder.health()["dropped"]["unencodable"] == 1


async def test_a_failing_spool_write_is_retried_and_reported(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    validators.default = "500"
    disk = FailingFiles()
    forwarder = make(inline_io=True, spool_files=disk)
    await nursery.start(forwarder.run)
    disk.fail("pwrite")
    forwarder.submit_nowait(organic(0))
    await until(lambda: forwarder.health()["spool"]["errors"] == 1)
    stats = forwarder.health()
    assert "No space left on device (ENOSPC)" in stats["spool"]["last_error"]
    assert stats["spool"]["failing"] is True and stats["overflow"] == 1, "held in memory"
    assert any("spool" in w and "failing" in w for w in stats["warnings"])
    disk.heal()
    await until(lambda: forwarder.spool.pending == 1, limit_s=60)
    assert forwarder.health()["spool"]["last_error"] is None
    assert forwarder.health()["warnings"] == []
    validators.default = "ok"
    await until(lambda: len(validators.delivered) == 1, limit_s=600)
    assert validators.request_ids() == [0]


async def test_outage_and_restart_deliver_every_payload_once(
        make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    """The validator is down; the gateway restarts meanwhile; once it is back everything arrives once."""
    validators.default = "500"
    first = make(inline_io=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        for i in range(25):
            first.submit_nowait(organic(i))
            await trio.sleep(0.3)
        await until(lambda: first.spool.pending == 25, limit_s=600)
        nursery.cancel_scope.cancel()
    assert validators.delivered == []

    second = make(inline_io=True)  # the restarted gateway: a new forwarder on the same spool folder
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        for i in range(25, 30):
            second.submit_nowait(organic(i))
        await trio.sleep(30)  # still down for a while
        assert validators.delivered == []
        validators.default = "ok"
        await until(lambda: len(validators.delivered) == 30, limit_s=600)
        await trio.sleep(120)  # long enough for any duplicate to show up
        nursery.cancel_scope.cancel()

    assert Counter(validators.request_ids()) == Counter(range(30)), "each payload exactly once"
    sent = {json.dumps(p, sort_keys=True) for _, p in validators.delivered}
    expected = {json.dumps(organic(i).scoring_payload(), sort_keys=True) for i in range(30)}
    assert sent == expected
    assert second.spool.pending == 0
    assert second.health()["replayed"] >= 25


async def test_a_corrupt_spooled_record_is_skipped_counted_and_the_rest_delivered(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    spool.open()
    spool.append([organic(i).encode() for i in range(3)])
    spool.close()
    (segment,) = (tmp_path / "spool").glob("*.seg")
    data = segment.read_bytes()
    segment.write_bytes(data.replace(b'"question 1"', b'"questiox 1"'))

    forwarder = make()
    await nursery.start(forwarder.run)
    await until(lambda: len(validators.delivered) == 2)
    await until(lambda: forwarder.spool.pending == 0)
    assert sorted(validators.request_ids()) == [0, 2]
    assert forwarder.health()["dropped"]["corrupt"] == 1


async def test_no_eligible_validator_spools_and_delivers_once_one_appears(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock
) -> None:
    subnet = subnet_of(validator(1, 10.0))  # below the stake threshold
    forwarder = make(subnet, inline_io=True)
    await nursery.start(forwarder.run)
    forwarder.submit_nowait(organic(0))
    await until(lambda: forwarder.spool.pending == 1)
    stats = forwarder.health()
    assert stats["no_validator"] == 1 and "validator permit" in stats["validator_problem"]
    assert validators.attempts == []
    subnet.publish(SubnetSnapshot.of(1, [validator(1, 10.0), validator(2, 2000.0)]))
    await until(lambda: len(validators.delivered) == 1)
    assert validators.request_ids() == [0]


# -- what a validator's answer means -------------------------------------------------------------


def attempts_to(validators: Validators, axon: str | None) -> list[float]:
    return [t for a, t in validators.attempts if axon is None or a == axon]


@pytest.mark.parametrize("status", ["401", "403"])
async def test_a_validator_refusing_our_hotkey_keeps_every_payload_and_is_probed_once_per_period(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock,
        signer: Signer, caplog: pytest.LogCaptureFixture, status: str) -> None:
    neuron = validator(1, 5000.0)
    validators.default = status
    forwarder = make(subnet_of(neuron), inline_io=True, backoff_max_s=300.0)
    await nursery.start(forwarder.run)
    start = trio.current_time()
    for i in range(20):
        forwarder.submit_nowait(organic(i))
        await trio.sleep(10)
    await trio.sleep(3600 - 200)

    times = attempts_to(validators, None)
    assert len(times) <= 1 + 3600 // 300, "one probe per back-off period, never the same batch again and again"
    assert all(b - a >= 300 - 1e-6 for a, b in itertools.pairwise(times)), times
    stats = forwarder.health()
    assert stats["spool"]["pending"] == 20 and stats["delivered"] == 0
    assert all(v == 0 for v in stats["dropped"].values()), "nothing is lost"
    state = stats["validators"][neuron.hotkey]
    assert state["refused_signer"] is True
    hint = (f"validator {neuron.hotkey} at {neuron.axon} refuses our hotkey {signer.ss58} (HTTP {status}): "
            f"set API_HOTKEY={signer.ss58} in that validator's environment and restart it")
    assert state["hint"] == hint
    assert hint in stats["warnings"] and stats["validators_refusing_signer"] == 1
    logged = [r for r in caplog.records if "refuses our hotkey" in r.getMessage()]
    assert 3600 / 60 - 2 <= len(logged) <= 3600 / 60 + 1, "said once a minute, not more often"
    assert all(hint in r.getMessage() for r in logged)

    validators.default = "ok"  # the operator set API_HOTKEY
    await until(lambda: len(validators.delivered) == 20, limit_s=400)
    assert trio.current_time() - start < 3600 + 301
    await trio.sleep(600)
    assert Counter(validators.request_ids()) == Counter(range(20)), "each exactly once"
    stats = forwarder.health()
    assert stats["spool"]["pending"] == 0 and stats["warnings"] == []
    assert stats["validators"][neuron.hotkey]["refused_signer"] is False


async def test_payloads_refused_by_one_validator_go_to_another_at_once(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock
) -> None:
    refusing, good = validator(1, 5000.0), validator(2, 5000.0)
    validators.modes[str(refusing.axon)] = "401"
    forwarder = make(subnet_of(refusing, good), inline_io=True, backoff_max_s=300.0, rng=random.Random(2))
    await nursery.start(forwarder.run)
    for i in range(50):
        forwarder.submit_nowait(organic(i))
        await trio.sleep(20)  # 1000 s in all
    await until(lambda: len(validators.delivered) == 50)
    assert sorted(validators.request_ids()) == list(range(50))
    assert {axon for axon, _ in validators.delivered} == {good.axon}
    assert 1 <= len(attempts_to(validators, refusing.axon)) <= 1 + 1000 // 300
    stats = forwarder.health()
    assert stats["spooled"] == 0, "never had to wait in the spool"
    assert stats["validators"][refusing.hotkey]["refused_signer"] is True
    assert stats["validators_refusing_signer"] == 1


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_payload_refused_with_another_4xx_is_dropped_counted_by_status_and_logged_once(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock,
        caplog: pytest.LogCaptureFixture, status: int) -> None:
    neuron = validator(1, 5000.0)
    validators.default = str(status)
    forwarder = make(subnet_of(neuron), inline_io=True)
    await nursery.start(forwarder.run)
    for i in range(5):
        forwarder.submit_nowait(organic(i))
        await trio.sleep(1)
    await trio.sleep(600)
    assert len(validators.attempts) == 5, "each sent once: it can never succeed"
    stats = forwarder.health()
    assert stats["dropped"][f"http_{status}"] == 5
    assert stats["spooled"] == 0 and stats["spool"]["pending"] == 0
    assert stats["validators"][neuron.hotkey]["consecutive_failures"] == 0, "the validator itself is fine"
    logged = [r for r in caplog.records if f"HTTP {status}" in r.getMessage()]
    assert len(logged) == 1, "once per status per minute"
    validators.default = "ok"
    forwarder.submit_nowait(organic(9))
    await until(lambda: len(validators.delivered) == 1)


async def test_a_refusal_echoing_the_payload_logs_its_status_and_length_never_the_prompt(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    validators.default = "echo_422"
    forwarder = make(subnet_of(validator(1, 5000.0)), inline_io=True)
    await nursery.start(forwarder.run)
    forwarder.submit_nowait(organic(0))
    await until(lambda: forwarder.health()["dropped"].get("http_422") == 1)
    (line,) = [r.getMessage() for r in caplog.records if "HTTP 422" in r.getMessage()]
    assert "question 0" not in caplog.text and "r0-m12" not in caplog.text  # before: 200 characters of it
    assert re.search(r"HTTP 422 \(a body of [0-9]+ bytes\)", line), line


async def test_429_is_retried_later_not_dropped(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    validators.default = "429"
    forwarder = make(inline_io=True)
    await nursery.start(forwarder.run)
    forwarder.submit_nowait(organic(0))
    await until(lambda: forwarder.spool.pending == 1)
    validators.default = "ok"
    await until(lambda: len(validators.delivered) == 1, limit_s=120)
    assert forwarder.health()["dropped"].get("http_429", 0) == 0


async def test_an_answer_over_the_cap_is_the_validators_failure_and_the_payload_is_kept(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    neuron = validator(1, 5000.0)
    validators.default = "big"
    forwarder = make(subnet_of(neuron), inline_io=True)
    await nursery.start(forwarder.run)
    forwarder.submit_nowait(organic(0))
    await until(lambda: forwarder.spool.pending == 1)
    state = forwarder.health()["validators"][neuron.hotkey]
    assert state["failures"] == 1 and "over the 65536 allowed" in state["last_error"]
    assert forwarder.health()["delivered"] == 0
    validators.default = "ok"
    await until(lambda: forwarder.health()["delivered"] == 1, limit_s=120)
    assert validators.request_ids() == [0]


async def test_a_payload_over_max_payload_bytes_goes_with_its_largest_answer_cut_short(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators) -> None:
    forwarder: ScoringForwarder = await nursery.start(make(max_payload_bytes=4096).run)
    big = organic(1)
    large = big.answers[0]
    for k in range(40):  # one miner said much; the others little
        text = f"x{k}-" + "x" * 100
        large.chunks.append(text)
        large.timings.append(0.5)
        large.raw_chunks.append(jsonio.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}))
    huge_body = organic(2)
    huge_body.body["messages"][0]["content"] = "q" * 5000  # the request itself is over: nothing to cut
    for result in (organic(0), big, huge_body):
        forwarder.submit_nowait(result)
    await until(lambda: len(validators.delivered) == 2)
    await trio.sleep(0.05)
    assert sorted(validators.request_ids()) == [0, 1]
    (sent,) = [payload for _, payload in validators.delivered if payload["body"]["seed"] == 1]
    assert len(json.dumps(sent)) <= 4096
    uid = str(large.uid)
    assert 0 < len(sent["chunks"][uid]) < len(large.chunks) + 0  # cut short, still aligned
    assert len(sent["chunks"][uid]) == len(sent["timings"][uid]) == len(sent["chunk_dicts_raw"][uid])
    others = [a for a in big.answers if a is not large]
    assert all(sent["chunks"][str(a.uid)] == a.chunks for a in others)  # the others whole
    stats = forwarder.health()
    assert stats["trimmed"] == 1 and stats["dropped"]["too_large"] == 1 and stats["spooled"] == 0


async def test_payloads_older_than_max_age_leave_the_spool_counted(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    wall = [1_750_000_000.0]
    validators.default = "500"
    forwarder = make(inline_io=True, max_age_s=3600.0, wall_clock=lambda: wall[0])
    await nursery.start(forwarder.run)
    for i in range(3):
        forwarder.submit_nowait(organic(i))
    await until(lambda: forwarder.spool.pending == 3)
    wall[0] += 3601  # an outage longer than max_age_s
    forwarder.submit_nowait(organic(3))
    await until(lambda: forwarder.spool.pending == 4)
    validators.default = "ok"
    await until(lambda: forwarder.spool.pending == 0, limit_s=600)
    assert validators.request_ids() == [3]
    assert forwarder.health()["dropped"]["expired"] == 3


async def test_no_eligible_validator_is_a_warning_at_start_and_on_health(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, caplog: pytest.LogCaptureFixture) -> None:
    forwarder: ScoringForwarder = await nursery.start(make(subnet_of(validator(1, 10.0, permit=False))).run)
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no validator is eligible for scoring" in m and "validator permit" in m for m in logged)
    (warning,) = forwarder.health()["warnings"]
    assert warning.startswith("no validator is eligible for scoring: no neuron in the metagraph has a validator "
                              "permit") and "payloads wait in the spool" in warning
    configured = make(validator="10.9.9.9:1")  # configured without a hotkey the metagraph knows
    assert "scoring.validator_hotkey is empty" in configured.warnings()[0]


# -- never the same payloads again and again -----------------------------------------------------


class StepCounter(trio.abc.Instrument):
    """Counts task steps; past `limit` it cancels `scope`, so a busy loop fails the test, not hangs it."""

    def __init__(self, limit: int, scope: trio.CancelScope) -> None:
        self.limit = limit
        self.scope = scope
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps > self.limit:
            self.scope.cancel()


@pytest.mark.parametrize("mode", ["401", "500", "hang", "refuse", "absent"])
async def test_replay_waits_in_every_state_over_simulated_time(
        make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock, mode: str) -> None:
    """An hour with a validator refusing our hotkey, failing, hanging, down, or none at all: attempts
    follow the back-off (base 1 s, max 60 s), disk work follows the attempts, and nothing spins."""
    neuron = validator(1, 5000.0)
    subnet = subnet_of(validator(1, 10.0) if mode == "absent" else neuron)  # too little stake: none eligible
    validators.default = mode
    disk_calls = 0

    async def counted(sync_fn: Callable[..., T], *args: Any) -> T:
        nonlocal disk_calls
        disk_calls += 1
        return await run_inline(sync_fn, *args)

    forwarder = make(subnet, run_sync=counted)
    hour = 3600.0
    with trio.CancelScope() as scope:
        counter = StepCounter(200_000, scope)
        trio.lowlevel.add_instrument(counter)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(forwarder.run)
                for i in range(30):
                    forwarder.submit_nowait(organic(i))
                await trio.sleep(hour)
                nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert counter.steps <= 200_000, "a busy loop"
    times = attempts_to(validators, None)
    later = [t for t in times if t > times[0]] if times else []
    if mode == "absent":
        assert times == [] and forwarder.no_validator >= 1
    else:
        # At most one batch of concurrent first attempts, then probes spaced by the back-off.
        assert len(times) - len(later) <= forwarder.settings.concurrency
        assert all(b - a >= 1.0 - 1e-6 for a, b in itertools.pairwise(later)), later
        assert len(later) <= 7 + hour / 60, len(later)
    assert disk_calls <= 3 * len(times) + 20, (disk_calls, len(times))
    assert counter.steps <= 50 * len(times) + 5_000, (counter.steps, len(times))
    stats = forwarder.health()
    assert stats["spool"]["pending"] == 30 and stats["delivered"] == 0
    assert all(v == 0 for v in stats["dropped"].values())


@pytest.mark.parametrize("mode", ["401", "500"])
async def test_probes_that_fail_leave_the_spool_as_it_was(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock,
        mode: str) -> None:
    """A probe that failed used to be appended to the spool again, once per back-off period: over a
    long outage the spool grew by a payload a period (and then dropped the oldest to stay in size)."""
    validators.default = mode
    forwarder = make(inline_io=True, backoff_max_s=60.0)
    await nursery.start(forwarder.run)
    for i in range(10):
        forwarder.submit_nowait(organic(i))
    await until(lambda: forwarder.spool.pending == 10, limit_s=600)
    size = forwarder.spool.bytes
    await trio.sleep(4 * 3600)
    assert len(validators.attempts) >= 3 * 60, "probed all along"
    stats = forwarder.health()
    assert stats["spooled"] == 10 and forwarder.spool.bytes == size, "nothing appended again"
    validators.default = "ok"
    await until(lambda: len(validators.delivered) == 10, limit_s=120)
    assert sorted(validators.request_ids()) == list(range(10))


async def test_a_payload_that_keeps_failing_at_the_head_of_the_spool_holds_up_no_other(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    """Failed probes leave their payload where it is, so the next probe takes the next one: a payload
    the validator answers 500 to, whenever it is probed, does not keep the others from it."""
    validators.default = "500"
    forwarder = make(inline_io=True, backoff_max_s=60.0)
    await nursery.start(forwarder.run)
    for i in range(1, 9):
        forwarder.submit_nowait(organic(i))
    await until(lambda: forwarder.spool.pending == 8, limit_s=600)
    validators.default = "odd_500"  # the oldest, seed 1, always fails
    await until(lambda: len(validators.delivered) == 4, limit_s=1800)
    assert sorted(validators.request_ids()) == [2, 4, 6, 8]


# -- a full disk (the audit's scenario) ----------------------------------------------------------

WRITES = ("create", "pwrite", "fsync", "fsync_dir", "write_atomic", "unlink")


async def test_a_full_disk_while_the_validator_is_down_loses_nothing_and_sends_nothing_twice(
        make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    """160 payloads while the validator is down and every disk write fails with ENOSPC; the disk is
    freed, then the validator comes back: each payload arrives exactly once, and the actor never
    restarted."""
    validators.default = "refuse"
    disk = FailingFiles()
    forwarder = make(inline_io=True, spool_files=disk, backoff_max_s=30.0)
    supervisor = Supervisor()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, forwarder)
        disk.fail(*WRITES)
        for i in range(160):
            forwarder.submit_nowait(organic(i))
            await trio.sleep(0.5)
        await trio.sleep(120)
        stats = forwarder.health()
        assert stats["spool"]["errors"] >= 3 and "No space left on device" in stats["spool"]["last_error"]
        assert stats["overflow"] + stats["writing"] + stats["in_flight"] == 160, "held in memory"
        assert any("spool" in w and "failing" in w for w in stats["warnings"])
        assert stats["spool"]["segments"] <= 1 and len(list(forwarder.spool.directory.glob("*.seg"))) <= 1
        disk.heal()  # space is freed
        await until(lambda: forwarder.spool.pending == 160, limit_s=120)
        validators.default = "ok"
        await until(lambda: len(validators.delivered) == 160, limit_s=600)
        await trio.sleep(600)  # long enough for any second delivery
        nursery.cancel_scope.cancel()
    ids = validators.request_ids()
    assert len(ids) == 160 and set(ids) == set(range(160)), "exactly N distinct, N deliveries"
    assert supervisor.states["scoring"].restarts == 0
    stats = forwarder.health()
    assert all(v == 0 for v in stats["dropped"].values()) and stats["spool"]["pending"] == 0
    assert stats["warnings"] == []


async def test_a_disk_that_fails_while_replaying_never_sends_a_delivered_payload_again(
        make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    """The cursor cannot be written after the 200s (and requeued payloads cannot be appended): what
    was taken is not read again, what was not is kept; after the disk is back a restart sends nothing
    again."""
    validators.default = "refuse"
    disk = FailingFiles()
    forwarder = make(inline_io=True, spool_files=disk, concurrency=4)
    supervisor = Supervisor()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, forwarder)
        for i in range(40):
            forwarder.submit_nowait(organic(i))
        await until(lambda: forwarder.spool.pending == 40, limit_s=120)
        disk.fail(*WRITES)
        validators.modes["10.0.0.1:8091"] = "ok"
        await until(lambda: len(validators.delivered) == 40, limit_s=600)
        await trio.sleep(300)
        assert forwarder.health()["spool"]["failing"] is True
        disk.heal()
        await until(lambda: not forwarder.spool.needs_sync, limit_s=120)
        nursery.cancel_scope.cancel()
    assert Counter(validators.request_ids()) == Counter(range(40))
    assert supervisor.states["scoring"].restarts == 0

    again = make(inline_io=True)  # a restart on the same spool: nothing is left to send
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    assert len(validators.delivered) == 40 and again.spool.pending == 0


async def test_a_replayed_batch_whose_requeue_cannot_be_written_holds_up_nothing_and_sends_nothing_twice(
        make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
    """Half of each replayed batch is taken, the other half must go back to the tail, and the disk
    refuses: those not taken are kept in memory and the replay goes on past them; what was taken is
    never read again. (A requeue the disk refused used to hold up every later replay.)"""
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    spool.open()
    spool.append([organic(i).encode() for i in range(20)])
    spool.close()
    validators.default = "odd_500"
    validators.gate = trio.Event()
    disk = FailingFiles()
    disk.fail(*WRITES)
    forwarder = make(inline_io=True, spool_files=disk, concurrency=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        await until(lambda: len(validators.attempts) == 4)  # the first batch is out
        validators.gate.set()
        await until(lambda: len(validators.delivered) == 10, limit_s=1200)  # the disk still refuses every write
        stats = forwarder.health()
        assert sorted(validators.request_ids()) == list(range(0, 20, 2)), "the even ones, each once"
        assert stats["requeues_kept"] >= 1 and stats["spool"]["errors"] >= 1
        held = stats["overflow"] + stats["writing"] + stats["in_flight"]
        assert held >= 1 and held + forwarder.spool.pending == 10, "every odd one kept, in memory or on disk"
        disk.heal()
        validators.default = "ok"
        await until(lambda: len(validators.delivered) == 20, limit_s=600)
        await trio.sleep(300)
        nursery.cancel_scope.cancel()
    assert Counter(validators.request_ids()) == Counter(range(20))
    assert forwarder.spool.pending == 0
    assert all(v == 0 for v in forwarder.health()["dropped"].values())


@pytest.mark.parametrize("failure", ["500", "hang"])
async def test_while_the_disk_is_full_memory_stays_bounded_and_every_drop_is_counted(
        make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock, failure: str) -> None:
    validators.default = failure
    disk = FailingFiles()
    forwarder = make(inline_io=True, spool_files=disk, queue_size=10, overflow_size=50, concurrency=2)
    supervisor = Supervisor()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, forwarder)
        disk.fail(*WRITES)
        for i in range(300):
            forwarder.submit_nowait(organic(i))
            await trio.sleep(0.1)
        stats = forwarder.health()
        held = stats["overflow"] + stats["writing"] + stats["in_flight"] + stats["queued"]
        assert held <= 50 + 10 + 2
        times = attempts_to(validators, None)
        later = [t for t in times if t > times[0]]
        assert later and all(b - a >= 1.0 - 1e-6 for a, b in itertools.pairwise(later)), \
            "one probe at a time, however many payloads wait in memory for it"
        disk.heal()
        validators.default = "ok"
        await until(lambda: forwarder.spool.pending == 0 and forwarder.health()["overflow"] == 0
                    and forwarder.health()["queued"] == 0, limit_s=600)
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    ids = validators.request_ids()
    assert len(ids) == len(set(ids)), "nothing twice"
    dropped = forwarder.health()["dropped"]
    assert len(ids) + dropped["overflow"] == 300, "every missing payload is a counted drop"
    assert supervisor.states["scoring"].restarts == 0


# -- memory, bounded in bytes --------------------------------------------------------------------


async def test_while_the_disk_is_full_memory_stays_within_its_bytes_and_every_drop_is_counted(
        make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    """Large organics while the validator is down and every disk write fails: what is held stays within
    `memory_max_bytes` (the count bounds are far away), the rest is dropped and counted; once the disk
    and the validator are back, every payload kept is delivered once."""
    validators.default = "500"
    disk = FailingFiles()
    limit = 1 << 20
    forwarder = make(inline_io=True, spool_files=disk, memory_max_bytes=limit, concurrency=2)
    supervisor = Supervisor()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, forwarder)
        disk.fail(*WRITES)
        for i in range(40):
            forwarder.submit_nowait(large_organic(i, chunks=12))  # about 200 KB each
            await trio.sleep(0.5)
            stats = forwarder.health()
            assert stats["memory_bytes"] <= limit + 256 * 1024, stats["memory_bytes"]  # one record over, at most
        assert stats["memory_max_bytes"] == limit
        assert 30 <= stats["dropped"]["memory"] < 40
        assert stats["overflow"] + stats["in_flight"] + stats["queued"] <= 6, "far below the count bounds"
        assert any("memory_max_bytes" in w for w in stats["warnings"])
        disk.heal()
        validators.default = "ok"
        await until(lambda: forwarder.spool.pending == 0 and forwarder.memory_bytes() == 0, limit_s=600)
        nursery.cancel_scope.cancel()
    ids = validators.request_ids()
    dropped = forwarder.health()["dropped"]
    assert len(ids) == len(set(ids)) and len(ids) + dropped["memory"] == 40
    assert supervisor.states["scoring"].restarts == 0


async def test_organics_beyond_half_the_memory_go_to_the_spool_at_once(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, autojump_clock: trio.abc.Clock) -> None:
    """A slow validator: deliveries from memory take half of `memory_max_bytes`; the organics coming
    meanwhile are written to the spool, none dropped, and delivered from there."""
    validators.gate = trio.Event()
    forwarder = make(inline_io=True, memory_max_bytes=4 << 20, timeout_s=600.0)
    await nursery.start(forwarder.run)
    for i in range(30):
        forwarder.submit_nowait(large_organic(i, chunks=12))  # about 200 KB each
        await trio.sleep(0.1)
    stats = forwarder.health()
    assert stats["memory_bytes"] <= (2 << 20) + 256 * 1024, "half of the bound for deliveries (and one more)"
    assert stats["spooled"] >= 20 and stats["dropped"]["memory"] == 0
    validators.gate.set()
    await until(lambda: len(validators.delivered) == 30, limit_s=600)
    assert sorted(validators.request_ids()) == list(range(30))


async def test_a_stop_writes_all_that_memory_holds_within_the_flush_budget(
        make: MakeForwarder, validators: Validators, tmp_path: Path) -> None:
    """A validator that never answers, organics of about 2 MB (1,024 tokens from one miner) coming on:
    at the stop, what memory holds (bounded by memory_max_bytes, 64 MiB) is all written to the spool
    within the shortest flush budget the gateway gives (1 s), in real time on the real disk."""
    validators.default = "hang"
    forwarder = make(timeout_s=600.0)
    forwarder.flush_deadline_s = 1.0  # what engine.gateway gives it when the drain took all the time
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        for i in range(48):
            forwarder.submit_nowait(large_organic(i, chunks=128))
            await trio.sleep(0.005)
        await until(lambda: forwarder.health()["in_flight"] >= 8)
        held = forwarder.memory_bytes()
        kept = forwarder.submitted - forwarder.dropped["memory"]
        nursery.cancel_scope.cancel()
        stopped_at = trio.current_time()
    took = trio.current_time() - stopped_at
    assert held >= 16 << 20 and took < 1.0, (held, took)
    dropped = forwarder.health()["dropped"]
    assert dropped["flush_timeout"] == 0 and dropped["flush_failed"] == 0
    seeds = spooled_seeds(tmp_path / "spool")
    assert len(seeds) == len(set(seeds)) == kept, "every organic kept is on disk, once"


async def test_the_spool_is_closed_at_shutdown_off_the_event_loop(
        nursery: trio.Nursery, make: MakeForwarder, validators: Validators, tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    closed_on: list[int] = []

    class Files(SpoolFiles):
        def close(self, fd: int) -> None:  # a slow disk blocks here: never on the loop's thread
            closed_on.append(threading.get_ident())
            super().close(fd)

    validators.gate = trio.Event()  # deliveries hang: the payload is in flight when the stop comes
    with trio.fail_after(20):
        forwarder = make(spool_files=Files())
        async with trio.open_nursery() as running:
            await running.start(forwarder.run)
            forwarder.submit_nowait(organic(0))
            await until(lambda: len(validators.attempts) == 1)
            running.cancel_scope.cancel()
    assert forwarder.health()["spool"]["pending"] == 1  # the flush at exit spooled it
    assert closed_on and loop_thread not in closed_on, closed_on  # before: closed on the loop's thread
