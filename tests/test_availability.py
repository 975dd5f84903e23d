"""The availability actor against hostile validators and miners: real loopback servers answering
every bad way, read through the gateway's own pool. No answer whatever crashes the actor, one
miner's bad answer costs only that miner, and each is counted."""

from __future__ import annotations

import dataclasses
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import trio
from bittensor_core import Keypair

from actors.availability import AvailabilityActor
from config.settings import AvailabilitySettings, ScoringSettings, Settings
from engine.gateway import make_http_client
from tests.raw_servers import RawServer, start
from wire.epistula import Signer
from wire.metagraph import Neuron, SubnetSnapshot
from wire.snapshot import SnapshotCell

MODEL = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
GOOD = {"task_availabilities": {"InferenceTask": True, "WebRetrievalTask": False},
        "llm_model_availabilities": {MODEL: True}}
TIMEOUT_S = 0.5
VALIDATOR = Keypair.create_from_uri("//V").ss58_address

Answer = Callable[[trio.SocketStream], Awaitable[None]]


def body(status: bytes, payload: bytes, *headers: bytes) -> Answer:
    async def send(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(payload)
                              + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + payload)
    return send


def json_body(value: Any) -> Answer:
    return body(b"200 OK", orjson.dumps(value), b"Content-Type: application/json")


def gzip_bomb() -> Answer:
    """As reproduced: a small gzip answer that decodes to far more (here 64 MiB; 1.5 GB in the audit)."""
    member = gzip.compress(b" " * (1 << 20))
    return body(b"200 OK", member * 64, b"Content-Encoding: gzip", b"Content-Type: application/json")


def endless(head: bytes) -> Answer:
    async def send(stream: trio.SocketStream) -> None:
        await stream.send_all(head)
        while True:
            await stream.send_all(b"1" * 65536)
    return send


def drip(payload: bytes) -> Answer:
    async def send(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(len(payload)):
            await stream.send_all(payload[i:i + 1])
            await trio.sleep(TIMEOUT_S / 4)
    return send


async def serve(nursery: trio.Nursery, answer: Answer) -> RawServer:
    async def handler(stream: trio.SocketStream, _: int) -> None:
        pending: list[bytes] = []
        while await server.read_request(stream, pending) is not None:
            await answer(stream)

    server = await start(nursery, handler)
    return server


def miner(uid: int, port: int) -> Neuron:
    return Neuron(uid=uid, hotkey=f"hk{uid}", axon=f"127.0.0.1:{port}", incentive=0.5)


def actor_for(source: str, neurons: list[Neuron], **availability: Any) -> AvailabilityActor:
    settings = dataclasses.replace(
        Settings(),
        availability=AvailabilitySettings(source=source, timeout_s=TIMEOUT_S, **availability),  # type: ignore[arg-type]
        scoring=ScoringSettings(validator=neurons[-1].axon or "", validator_hotkey=VALIDATOR),
    )
    return AvailabilityActor(settings, SnapshotCell(SubnetSnapshot.of(1, neurons)), make_http_client(settings),
                             Signer(Keypair.create_from_uri("//G")))


@pytest.fixture
async def closing() -> AsyncIterator[list[AvailabilityActor]]:
    actors: list[AvailabilityActor] = []
    yield actors
    for actor in actors:
        await actor.http.aclose()


HOSTILE: dict[str, tuple[Answer, str]] = {  # how it answers, what the gateway says about it
    "gzip bomb with Content-Encoding": (gzip_bomb(), "Content-Encoding"),
    "huge body, length given": (endless(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n"), "over"),
    "huge body, chunked": (endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000\r\n"), "over"),
    "huge body, until the close": (endless(b"HTTP/1.1 200 OK\r\n\r\n"), "over"),
    "deep nesting": (body(b"200 OK", b"[" * 60_000), "objects and arrays"),  # under a miner's byte cap; refused before parsing
    "nesting just too deep": (json_body({"task_availabilities": {"a": [[[True]]]}, "llm_model_availabilities": {}}),
                              "invalid JSON"),
    "non-object JSON": (json_body([GOOD]), "not a JSON object"),
    "a map that is a list": (json_body({**GOOD, "task_availabilities": ["InferenceTask"]}), "not an object"),
    "huge maps": (json_body({**GOOD, "llm_model_availabilities": {f"m{i}": True for i in range(1000)}}),
                  "more than 64"),
    "a name too long": (json_body({**GOOD, "llm_model_availabilities": {"m" * 129: True}}), "longer than 128"),
    "invalid UTF-8": (body(b"200 OK", b'{"task_availabilities": {"\xff\xfe": true}, "llm_model_availabilities": {}}'),
                      "invalid JSON"),
    "not JSON at all": (body(b"200 OK", b"<html>hello</html>"), "invalid JSON"),
    "a broken chunked body": (body(b"200 OK", b"", b"Transfer-Encoding: chunked\r\n\r\nzz"), "RemoteProtocolError"),
    "slow drip beyond the poll timeout": (drip(orjson.dumps(GOOD)), "timed out"),
    "HTTP 500": (body(b"500 Internal Server Error", b"{}"), "HTTP 500"),
}
BAD_CONTENT = {name for name, (_, said) in HOSTILE.items()
               if said not in ("timed out", "HTTP 500", "RemoteProtocolError")}
# The ones that fail a validator's whole answer (its entries are miners' answers: tested below).
WHOLE = [name for name in HOSTILE if name not in ("a map that is a list", "huge maps", "a name too long")]


@pytest.mark.parametrize("case", HOSTILE)
async def test_a_hostile_miner_costs_only_its_own_answer(nursery: trio.Nursery, closing: list[AvailabilityActor],
                                                         case: str) -> None:
    hostile, said = HOSTILE[case]
    good = await serve(nursery, json_body(GOOD))
    bad = await serve(nursery, hostile)
    also_good = await serve(nursery, json_body(GOOD))
    actor = actor_for("miners", [miner(1, good.port), miner(2, bad.port), miner(3, also_good.port)])
    closing.append(actor)
    with trio.fail_after(10):
        await actor.poll_miners(spread_s=0)
    snapshot = actor.cell.get()
    assert snapshot.ever_known and not snapshot.everyone
    assert snapshot.serves(1, "InferenceTask", MODEL) and snapshot.serves(3, "InferenceTask", MODEL)
    assert not snapshot.serves(2, "InferenceTask", None)
    health = actor.health()
    assert health["miners_known"] == 2 and "uid 2: " in health["last_error"] and said in health["last_error"]
    assert health["bad_answers"] == (case in BAD_CONTENT)


@pytest.mark.parametrize("case", WHOLE)
async def test_a_hostile_validator_fails_the_poll_and_the_last_answers_stay(
        nursery: trio.Nursery, closing: list[AvailabilityActor], case: str) -> None:
    answers = [json_body({"1": GOOD, "2": None}), HOSTILE[case][0]]

    async def validator(stream: trio.SocketStream) -> None:
        await answers[min(len(server.requests), 2) - 1](stream)

    server = await serve(nursery, validator)
    actor = actor_for("validator", [miner(1, 9001), miner(2, 9002), miner(3, server.port)])
    closing.append(actor)
    with trio.fail_after(10):
        assert await actor.poll_validator()
        known = actor.cell.get()
        assert not await actor.poll_validator()
    assert actor.cell.get() is known and known.serves(1, "InferenceTask", MODEL)
    health = actor.health()
    assert health["stale"] and HOSTILE[case][1] in health["last_error"]
    assert health["bad_answers"] == (case in BAD_CONTENT)


async def test_the_validators_bad_entries_cost_only_their_uids(nursery: trio.Nursery,
                                                               closing: list[AvailabilityActor]) -> None:
    server = await serve(nursery, json_body({
        "1": GOOD,
        "2": {**GOOD, "task_availabilities": {f"t{i}": True for i in range(65)}},
        "3": "not an object",
        "4": None,
        "99": GOOD,  # not asked for: not kept
        "-1": GOOD, "x": GOOD, "9" * 5000: GOOD,
    }))
    actor = actor_for("validator", [miner(uid, 9000 + uid) for uid in (1, 2, 3, 4)] + [miner(5, server.port)])
    closing.append(actor)
    with trio.fail_after(10):
        assert await actor.poll_validator()
    snapshot = actor.cell.get()
    assert snapshot.serves(1, "InferenceTask", MODEL)
    assert {uid: snapshot.miners[uid] for uid in (2, 3, 4)} == {2: None, 3: None, 4: None}
    assert sorted(snapshot.miners) == [1, 2, 3, 4]
    assert actor.health()["bad_answers"] == 2


async def test_the_validators_answer_for_1024_uids_fits_its_cap_and_a_larger_one_does_not(
        nursery: trio.Nursery, closing: list[AvailabilityActor]) -> None:
    full = {  # as the validator answers: every task and model named, true or false
        "task_availabilities": {task: task == "InferenceTask" for task in (
            "InferenceTask", "WebRetrievalTask", "MultiStepReasoningTask", "ProgrammingTask",
            "WebQuestionAnsweringTask", "QuestionAnsweringTask", "WikiQuestionAnsweringTask", "MultiChoiceTask")},
        "llm_model_availabilities": {MODEL: True, "mrfakename/mistral-small-3.1-24b-instruct-2503-hf": False},
    }
    neurons = [miner(uid, 9000) for uid in range(1024)]
    payload = {str(n.uid): full for n in neurons}
    server = await serve(nursery, json_body(payload))
    actor = actor_for("validator", [*neurons, miner(2000, server.port)])
    closing.append(actor)
    with trio.fail_after(10):
        assert await actor.poll_validator()
    assert actor.health()["miners_known"] == 1024
    size = len(orjson.dumps(payload))
    small = actor_for("validator", [*neurons, miner(2000, server.port)], validator_max_bytes=size - 1)
    closing.append(small)
    with trio.fail_after(10):
        assert not await small.poll_validator()
    assert "over" in small.health()["last_error"] and small.health()["bad_answers"] == 1


async def test_the_actor_keeps_polling_through_answers_that_used_to_crash_it(
        nursery: trio.Nursery, closing: list[AvailabilityActor]) -> None:
    """`[` x 100,000 raised RecursionError out of the actor on every poll, so it restarted in a loop."""
    server = await serve(nursery, body(b"200 OK", b"[" * 100_000))
    actor = actor_for("validator", [miner(1, 9001), miner(2, server.port)], interval_s=1.0)
    closing.append(actor)
    with trio.fail_after(10):
        await nursery.start(actor.run)
        await trio.sleep(1.5)
    assert len(server.requests) == 2 and actor.health()["failures"] == 2
    assert actor.health()["bad_answers"] == 2 and actor.health()["fallback_every_serving_miner"]


async def test_the_requests_ask_for_identity(nursery: trio.Nursery, closing: list[AvailabilityActor]) -> None:
    server = await serve(nursery, json_body(GOOD))
    actor = actor_for("miners", [miner(1, server.port)])
    closing.append(actor)
    with trio.fail_after(10):
        await actor.poll_miners(spread_s=0)
    assert actor.cell.get().serves(1, "InferenceTask", MODEL)
    assert b"\r\nAccept-Encoding: identity\r\n" in server.requests[0]

