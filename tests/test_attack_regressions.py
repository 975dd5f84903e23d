"""Defects found by attacking a running gateway as hostile miners, validators and clients would.

Each test reproduces one finding at its smallest and fails while the defect is there; the attack
scripts that found them, and the figures measured against a live gateway, are in the attack report.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from actors.availability import AvailabilityActor
from actors.fanout.bounds import AnswerBounds
from actors.fanout.breaker import MinerHealth
from actors.fanout.job import FanoutJob
from actors.fanout.pool import FanoutPool
from actors.scoring.forwarder import ScoringForwarder
from config.settings import AvailabilitySettings, ScoringSettings, Settings
from tests.scoring_support import Validators, organic, run_inline, settings_for, subnet_of, validator
from tests.scripted_miners import DONE, Miners, chunk
from tests.spool_faults import FailingFiles
from wire import jsonio
from wire.epistula import Signer
from wire.metagraph import Neuron, SubnetSnapshot
from wire.organic import MinerAnswer, OrganicResult
from wire.pool import KeepAliveTransport
from wire.snapshot import SnapshotCell
from wire.sse import SseData, SseTooLarge

# -- an SSE event of many `data:` lines -----------------------------------------------------------


def test_empty_data_lines_count_against_the_event_limit() -> None:
    """`data:` lines with nothing after them add a newline each to the event's data, but the limit
    counted only the text, so an event of empty data lines (and no blank line) never ended and its
    list of lines grew with every line the miner sent."""
    parser = SseData(max_event_bytes=1000)
    with pytest.raises(SseTooLarge):
        parser.feed(b"data:\n" * 2000)  # 1,999 bytes of data once joined, twice the limit


def test_an_event_of_many_short_data_lines_costs_linear_time() -> None:
    """Each `data:` line re-summed the lengths of every line before it in the same event: one miner
    sending `data: x` lines froze the gateway's event loop (measured: 520 KB took 99 s of CPU, all
    clients and /health/ready waited). 12,000 lines (96 KB) must take a moment, not seconds."""
    parser = SseData(max_event_bytes=1 << 20)
    started = time.process_time()
    parser.feed(b"data: x\n" * 12_000)
    assert time.process_time() - started < 0.5


# -- memory held for one request's miners -------------------------------------------------------


def neuron(uid: int) -> Neuron:
    return Neuron(uid=uid, hotkey=Keypair.create_from_uri(f"//miner{uid}").ss58_address,
                  axon=f"127.0.0.1:{9000 + uid}", incentive=0.1)


def largest_valid_answer(bounds: AnswerBounds) -> list[tuple[float, str]]:
    """A well-formed answer as large as the bounds let a miner make it: chunks of the longest text
    allowed, up to just under `max_bytes`, then a finish and [DONE]."""
    event = chunk("a" * (bounds.max_chunk_chars or 8192))
    count = min((bounds.max_bytes - 1000) // len(event), bounds.max_events - 2)
    return [(0.0, event)] * count + [(0.0, chunk(None, "stop")), (0.0, DONE)]


async def test_requests_to_hostile_miners_hold_bounded_memory(nursery: trio.Nursery) -> None:
    """Every miner's answer is bounded, but only one by one: at the default token budget each may
    send 4.2 MB of valid chunks (1.1 MB at 256 tokens), all kept (text and raw bytes) until the
    fan-out ends, with no budget across miners or requests. Measured on a live gateway: one such
    miner among five took the gateway to 823 MB with 50 streaming clients, five such miners to
    2.6 GB. For RSS to stay under 300 MB at 50 concurrent requests, a request may hold about 6 MB."""
    miners = Miners()
    body: dict[str, Any] = {"model": None, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "seed": 7, "task": "InferenceTask", "sampling_parameters": {"max_new_tokens": 256}}
    bounds = AnswerBounds.for_request("InferenceTask", body)
    asked = [neuron(uid) for uid in range(1, 6)]
    for n in asked:
        miners.scripts[9000 + n.uid] = largest_valid_answer(bounds)
    submitted: list[int] = []
    http = httpx.AsyncClient(transport=miners.transport())
    pool: FanoutPool = await nursery.start(FanoutPool(
        http, Signer(Keypair.create_from_uri("//Gateway")), MinerHealth(failure_threshold=1000, cooldown_s=1.0),
        lambda result: submitted.append(len(result.answers))).run)

    async def client(job: FanoutJob) -> None:
        async for _ in job.receive:  # reads the winner's stream as fast as it comes
            pass
        job.release()
        await job.finished.wait()

    tracemalloc.start()
    try:
        async with trio.open_nursery() as clients:
            for _ in range(10):
                clients.start_soon(client, pool.start(body, asked, mode="stream", task="InferenceTask"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert submitted == [5] * 10
    assert peak < 60 * 1024 * 1024, f"10 requests held {peak / 2**20:.0f} MiB of miners' answers"


# -- one organic's scoring payload --------------------------------------------------------------


class Validator:
    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.payloads.append(json.loads(request.content))
        return httpx.Response(200, json=None)


def answer_at_bounds(uid: int, bounds: AnswerBounds) -> MinerAnswer:
    """What the pool keeps of a miner whose answer is as large as its bounds allow."""
    text = "a" * (bounds.max_chunk_chars or 8192)
    raw = jsonio.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})
    count = (bounds.max_bytes - 1000) // (len(raw) + 8)
    return MinerAnswer(uid=uid, hotkey=f"hotkey{uid}", chunks=[text] * count, timings=[0.1] * count,
                       raw_chunks=[raw] * count, finish_reason="stop", completed=True,
                       received_bytes=count * (len(raw) + 8))


def honest_answer(uid: int) -> MinerAnswer:
    raw = [jsonio.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}) for w in ("Hi", " there")]
    return MinerAnswer(uid=uid, hotkey=f"hotkey{uid}", chunks=["Hi", " there"], timings=[0.1, 0.2],
                       raw_chunks=raw, finish_reason="stop", completed=True)


async def test_two_large_answers_do_not_cost_the_honest_miners_their_scoring(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Two miners answering within their bounds (4.2 MB each at the default token budget) make the
    organic's payload larger than `scoring.max_payload_bytes` (16 MiB), and the whole payload was
    dropped: the honest miners of that request were never scored. Measured on a live gateway with
    two such miners among five: 55 of 55 organics dropped as too_large, none delivered."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 1, "task": "InferenceTask",
            "sampling_parameters": {"max_new_tokens": 1024}}
    bounds = AnswerBounds.for_request("InferenceTask", body)
    answers = (answer_at_bounds(1, bounds), answer_at_bounds(2, bounds), honest_answer(3), honest_answer(4),
               honest_answer(5))
    assert all(a.received_bytes <= bounds.max_bytes for a in answers)
    result = OrganicResult(request_id="r1", task="InferenceTask", body=body, answers=answers, created_at=time.time())

    validator = Validator()
    hotkey = Keypair.create_from_uri("//validator").ss58_address
    settings = Settings(scoring=ScoringSettings(validator="127.0.0.1:9999", validator_hotkey=hotkey),
                        base_dir=str(tmp_path))
    forwarder: ScoringForwarder = await nursery.start(ScoringForwarder(
        settings, http=httpx.AsyncClient(transport=httpx.MockTransport(validator.handle)),
        signer=Signer(Keypair.create_from_uri("//Gateway")), subnet=SnapshotCell(SubnetSnapshot(netuid=1)),
    ).run)
    forwarder.submit_nowait(result)
    with trio.move_on_after(10):
        while not validator.payloads and forwarder.health()["dropped"]["too_large"] == 0:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert validator.payloads, f"nothing delivered; dropped: {forwarder.health()['dropped']}"
    chunks = validator.payloads[0]["chunks"]
    assert all(chunks[str(uid)] == ["Hi", " there"] for uid in (3, 4, 5))


# -- framing that carries no answer -------------------------------------------------------------


async def test_chunk_framing_counts_against_the_answers_bounds(nursery: trio.Nursery) -> None:
    """An answer's byte bound counted only the body's data, never the chunked framing around it, and a
    chunk-size line may carry 4 KiB of extensions: a miner sending one byte of data per chunk had the
    gateway read and parse 4 KB per byte of answer (7 us of CPU a byte of data; measured on a live
    gateway: one such miner among five cut throughput from 1,300 to 367 requests in 20 s and made
    /health/ready time out). At 16 tokens the bound is 128 KiB: the miner must fail long before
    it has made the gateway read 32 MB."""
    sent = [0]
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "seed": 1, "task": "InferenceTask",
            "sampling_parameters": {"max_new_tokens": 16}}

    async def miner(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        line = b"1;" + b"e" * 4000 + b"\r\n:\r\n"  # one byte of data (an SSE comment) per chunk
        try:
            while sent[0] < 1 << 30:
                await stream.send_all(line * 64)
                sent[0] += len(line) * 64
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, miner, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    http = httpx.AsyncClient(transport=KeepAliveTransport())
    results: list[OrganicResult] = []
    pool: FanoutPool = await nursery.start(FanoutPool(
        http, Signer(Keypair.create_from_uri("//Gateway")), MinerHealth(failure_threshold=1000, cooldown_s=1.0),
        results.append).run)
    hostile = Neuron(uid=1, hotkey=Keypair.create_from_uri("//miner1").ss58_address, axon=f"127.0.0.1:{port}")
    job = pool.start(body, [hostile], mode="stream", task="InferenceTask", timeout_s=20.0)
    with trio.fail_after(30):
        await job.finished.wait()
    assert job.answers[0].error is not None
    assert sent[0] < 32 * 1024 * 1024, f"the gateway read {sent[0] / 2**20:.0f} MiB for a 128 KiB answer"


# -- the validator's availability answer --------------------------------------------------------


async def test_a_validators_availability_answer_costs_bounded_memory(tmp_path: Path) -> None:
    """The validator's availability answer is read up to `availability.validator_max_bytes` (8 MiB)
    and parsed whole, although only the asked uids' entries are kept: 8 MiB of `{}` is 2.8 million
    objects, about 390 MB and 3.5 s of the event loop (measured on a live gateway polling every 2 s:
    75 MB became 508 MB and /health/ready timed out four times in 20 s)."""
    validator_hotkey = Keypair.create_from_uri("//validator").ss58_address
    real = {"0": {"task_availabilities": {"InferenceTask": True}, "llm_model_availabilities": {"m": True}}}
    prefix = json.dumps(real).encode()[:-1] + b',"pad":['
    answer = prefix + b",".join([b"{}"] * ((8 * 1024 * 1024 - len(prefix) - 4096) // 3)) + b"]}"

    async def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    settings = Settings(availability=AvailabilitySettings(source="validator"),
                        scoring=ScoringSettings(validator="127.0.0.1:9999", validator_hotkey=validator_hotkey),
                        base_dir=str(tmp_path))
    subnet = SnapshotCell(SubnetSnapshot.of(1, [neuron(0)]))
    actor = AvailabilityActor(settings, subnet, httpx.AsyncClient(transport=httpx.MockTransport(handle)),
                              Signer(Keypair.create_from_uri("//Gateway")))
    before = peak_rss_reset()
    await actor.poll_validator()
    grown = vm_kib("VmHWM") - before
    assert grown < 100 * 1024, f"one availability poll took {grown / 1024:.0f} MiB"


def vm_kib(name: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(name + ":"))


def peak_rss_reset() -> int:
    """The process's RSS now, with its peak (VmHWM) reset to it (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return vm_kib("VmRSS")


# -- a client's long answer and an honest miner's breaker ---------------------------------------


async def test_a_long_answer_cut_at_its_time_budget_opens_no_breaker(nursery: trio.Nursery,
                                                                     autojump_clock: Any) -> None:
    """A client asking 4,096 tokens gives each miner upstream's budget of 70 s; an honest miner
    streaming a valid token a second is still answering when that budget ends, and that was counted
    as its failure. Measured on a live gateway: three such requests (the clients leaving after the
    first token) opened the breaker of all five honest miners; every other client got 503
    miners_unhealthy for the next 60 s."""
    miners = Miners()
    miners.scripts[9001] = [(1.0, chunk(f"w{i} ")) for i in range(200)]  # steady, valid, slower than the budget
    http = httpx.AsyncClient(transport=miners.transport())
    health = MinerHealth(failure_threshold=3, cooldown_s=60.0)
    pool: FanoutPool = await nursery.start(FanoutPool(
        http, Signer(Keypair.create_from_uri("//Gateway")), health, None).run)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "seed": 1, "task": "InferenceTask",
            "sampling_parameters": {"max_new_tokens": 4096}}
    for _ in range(3):
        job = pool.start(body, [neuron(1)], mode="stream", task="InferenceTask")
        job.release()  # the client left after its first token: the miner goes on for scoring
        await job.finished.wait()
        assert len(job.answers[0].chunks) >= 60  # it was streaming all along
    assert health.allows(1), f"the honest miner's breaker is {health.state(1)}"


# -- a number too large for a float -------------------------------------------------------------


def test_a_timeout_beyond_a_floats_range_is_a_400() -> None:
    """`timeout` as an integer of 400 digits (valid JSON, within the parser's 4,300-digit limit) reached
    `math.isfinite`, which raised OverflowError: a 500 `internal_error`, with its traceback logged."""
    from web.chat_request import parse_chat_request
    from web.errors import ApiError

    with pytest.raises(ApiError) as caught:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "timeout": 10**400},
                           default_model="m")
    assert caught.value.status == 400 and caught.value.param == "timeout"


# -- a WebSocket upgrade -----------------------------------------------------------------------


async def test_a_websocket_upgrade_gets_an_http_error_not_a_dropped_connection(
        tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    """Hypercorn hands a WebSocket upgrade to the app as a websocket scope; no route serves one, and
    the OpenAI-style error handler read `request.path` outside a request context: RuntimeError, a
    500 with an empty body, and ~70 lines of traceback logged per attempt, for any unauthenticated
    client on any path (the failed-auth throttle never sees it)."""
    from tests.chat_stack import open_stack

    async with open_stack(tmp_path, nursery) as stack:
        host, port = stack.gateway.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        answer = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in answer:
                piece = await stream.receive_some(65536)
                if not piece:
                    break
                answer += piece
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 4"), f"answer to a WebSocket upgrade: {answer[:80]!r}"
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


# -- the gateway's own failure and the validator's back-off -------------------------------------


async def test_the_gateways_own_failures_put_no_validator_in_back_off(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A delivery that fails for the gateway's own reason (out of open files: `GatewayLimitError`)
    counted as the validator's failure: back-off doubling up to `backoff_max_s` (300 s), so a
    moment of EMFILE stalled scoring for minutes (measured on a live gateway at the open-files
    limit: "validator ... failed (GatewayLimitError: ... EMFILE); skipping it")."""
    from wire.http1 import GatewayLimitError

    delivered: list[bytes] = []
    failing = [True]

    async def handle(request: httpx.Request) -> httpx.Response:
        if failing[0]:
            raise GatewayLimitError("cannot connect: the gateway is out of EMFILE")
        delivered.append(request.content)
        return httpx.Response(200, json=None)

    hotkey = Keypair.create_from_uri("//validator").ss58_address
    settings = Settings(scoring=ScoringSettings(validator="127.0.0.1:9999", validator_hotkey=hotkey,
                                                backoff_base_s=5.0), base_dir=str(tmp_path))
    forwarder: ScoringForwarder = await nursery.start(ScoringForwarder(
        settings, http=httpx.AsyncClient(transport=httpx.MockTransport(handle)),
        signer=Signer(Keypair.create_from_uri("//Gateway")), subnet=SnapshotCell(SubnetSnapshot(netuid=1)),
    ).run)
    answers = (honest_answer(3),)
    forwarder.submit_nowait(OrganicResult(request_id="r0", task="InferenceTask", body={"seed": 0},
                                          answers=answers, created_at=time.time()))
    with trio.fail_after(5):
        while not any(forwarder.health()[n] for n in ("attempts_failed", "no_validator", "gateway_errors")):  # noqa: ASYNC110
            await trio.sleep(0.01)
    failing[0] = False
    state = forwarder.health()["validators"].get(hotkey, {})
    assert state.get("consecutive_failures", 0) == 0 and state.get("backoff_remaining_s", 0) == 0, state


# -- scoring with a full disk, and with a slow validator -----------------------------------------


async def test_a_full_disk_does_not_keep_payloads_from_a_validator_that_is_back(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """While the validator was down, a replayed probe that failed had to be appended to the spool again,
    which the full disk refused, and that pending commit held up every later replay; the payloads held
    in memory only ever drained into the spool. Measured on a live gateway with the validator back and
    the disk still full: 0 of 300 organics delivered in 60 s, and the 150 in memory lost at the next stop."""
    validators = Validators(default="500")
    disk = FailingFiles()  # tests/spool_faults.py
    forwarder = ScoringForwarder(
        settings_for(tmp_path), http=httpx.AsyncClient(transport=httpx.MockTransport(validators.handle)),
        signer=Signer(Keypair.create_from_uri("//Gateway")), subnet=subnet_of(validator(1, 5000.0)),
        run_sync=run_inline, spool_files=disk)
    await nursery.start(forwarder.run)
    for i in range(3):
        forwarder.submit_nowait(organic(i))
    with trio.fail_after(600):
        while forwarder.spool.pending < 3:  # noqa: ASYNC110
            await trio.sleep(0.1)
    disk.fail("pwrite")  # the disk is full from here on
    for i in range(3, 6):
        forwarder.submit_nowait(organic(i))
    await trio.sleep(300)  # the outage goes on: probes fail, the spool's writes fail
    validators.default = "ok"  # the validator is back; the disk is still full
    with trio.move_on_after(900):
        while len(validators.delivered) < 6:  # noqa: ASYNC110
            await trio.sleep(0.1)
    assert sorted(validators.request_ids()) == [0, 1, 2, 3, 4, 5], forwarder.health()["spool"]


async def test_organics_waiting_for_a_slow_validator_hold_bounded_memory(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The scoring queue (1,024) and its overflow buffer (4,096) were bounded by count, but a miner
    decides how large each organic is. Measured on a live gateway with a validator taking 9 s per
    payload and one large-answer miner: 1.57 GB of RSS, and at SIGINT the flush could not finish in
    time (about 155 organics lost)."""
    validators = Validators(gate=trio.Event())  # every delivery waits: a validator that is slow to answer
    forwarder: ScoringForwarder = await nursery.start(ScoringForwarder(
        settings_for(tmp_path, timeout_s=60.0), signer=Signer(Keypair.create_from_uri("//Gateway")),
        http=httpx.AsyncClient(transport=httpx.MockTransport(validators.handle)),
        subnet=subnet_of(validator(1, 5000.0))).run)
    tracemalloc.start()
    try:
        for i in range(24):
            raw = bytes([97 + i % 26]) * (4 << 20)  # one miner's 4 MiB of raw chunks, its own bytes
            big = MinerAnswer(uid=1, hotkey="h1", chunks=[raw.decode()], timings=[0.1], raw_chunks=[raw],
                              finish_reason="stop", completed=True)
            forwarder.submit_nowait(OrganicResult(request_id=f"r{i}", task="InferenceTask", body={"seed": i},
                                                  answers=(big, honest_answer(2)), created_at=time.time()))
            del raw, big
        await trio.sleep(0.5)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 48 * 1024 * 1024, f"{held / 2**20:.0f} MiB held for 24 organics waiting for a slow validator"
