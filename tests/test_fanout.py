"""The fan-out pool against scripted miners (httpx.MockTransport, autojump clock)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import trio
from bittensor_core import Keypair

from actors.fanout.bounds import request_timeout_s
from actors.fanout.breaker import MinerHealth
from actors.fanout.events import Broken, Chunk, Complete, End, Failed
from actors.fanout.pool import FanoutPool, PoolBusy
from config.settings import Settings
from engine.gateway import make_http_client
from tests.scripted_miners import DONE, Miners, answer, chunk
from wire.epistula import Signer
from wire.metagraph import Neuron
from wire.organic import OrganicResult


def neuron(uid: int) -> Neuron:
    return Neuron(uid=uid, hotkey=Keypair.create_from_uri(f"//miner{uid}").ss58_address,
                  axon=f"127.0.0.1:{9000 + uid}", incentive=0.1)


@pytest.fixture
async def miners(nursery: trio.Nursery) -> Miners:
    """Scripted miners on loopback, for uids 1 to 5."""
    served = Miners()
    await served.serve(nursery, range(1, 6))
    return served


@pytest.fixture
def results() -> list[OrganicResult]:
    return []


@pytest.fixture
async def pool(miners: Miners, results: list[OrganicResult], nursery: trio.Nursery) -> FanoutPool:
    http = make_http_client(Settings())
    health = MinerHealth(failure_threshold=2, cooldown_s=30.0)
    started: FanoutPool = await nursery.start(
        FanoutPool(http, Signer(Keypair.create_from_uri("//Gateway")), health, results.append).run
    )
    return started


BODY: dict[str, Any] = {"model": None, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "seed": 7, "task": "InferenceTask", "sampling_parameters": {"max_new_tokens": 16}}


async def collect(job: Any) -> list[Any]:
    events = []
    async for event in job.receive:
        events.append(event)
        if isinstance(event, End | Broken | Failed | Complete):
            break
    return events


async def finished(job: Any) -> None:
    with trio.fail_after(120):
        await job.finished.wait()


async def test_winner_is_first_content_not_first_headers(
        pool: FanoutPool, miners: Miners, results: list[OrganicResult], autojump_clock: Any) -> None:
    # uid 1 sends headers at once but its first text only after 2 s; uid 2 is slower to answer but
    # sends text first.
    miners.scripts[9001] = [(0.0, chunk(None)), *answer(["slow", "one"], first_delay=2.0)]
    miners.header_delay[9002] = 0.3
    miners.scripts[9002] = answer(["fast", "one"], first_delay=0.1)
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    events = await collect(job)
    texts = [e.text for e in events if isinstance(e, Chunk)]
    assert [t for t in texts if t] == ["fast", "one"]
    assert job.miners[job.winner or 0].uid == 2
    await finished(job)
    (result,) = results
    assert {a.uid: a.text for a in result.answers} == {1: "slowone", 2: "fastone"}


async def test_finish_reason_is_passed_on(pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = answer(["a", "b"], finish="length")
    events = await collect(pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask"))
    assert [e.text for e in events if isinstance(e, Chunk)] == ["a", "b"]
    assert isinstance(events[-1], End) and events[-1].finish_reason == "length"


async def test_winner_breaking_mid_stream_is_reported(pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = [(0.0, chunk("par")), (0.1, chunk("tial")), (0.1, "BREAK")]
    miners.scripts[9002] = answer(["late"], first_delay=5.0)
    events = await collect(pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask"))
    assert [type(e) for e in events] == [Chunk, Chunk, Broken]
    assert "connection" in events[-1].error


async def test_all_fail_lists_each_reason(pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = 500
    miners.scripts[9002] = 0
    miners.scripts[9003] = [(0.0, "data: {not json\n\n")]
    events = await collect(pool.start(BODY, [miners.neuron(1), miners.neuron(2), miners.neuron(3)], mode="stream", task="InferenceTask"))
    (failed,) = events
    assert isinstance(failed, Failed)
    assert failed.errors[1] == "HTTP 500"
    assert "connection" in failed.errors[2]  # refused (or reset at once, on loopback)
    assert "not valid JSON" in failed.errors[3]


async def test_complete_mode_takes_first_finished_answer(
        pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = answer(["first", "token", "but", "slow"], first_delay=0.01, step=1.0)
    miners.scripts[9002] = answer(["quick", "whole"], first_delay=0.2, step=0.01)
    (event,) = await collect(pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="complete", task="InferenceTask"))
    assert isinstance(event, Complete) and event.answer.uid == 2 and event.answer.text == "quickwhole"


async def test_client_gone_collection_goes_on(
        pool: FanoutPool, miners: Miners, results: list[OrganicResult], autojump_clock: Any) -> None:
    miners.scripts[9001] = answer(["x"] * 50, step=0.1)
    miners.scripts[9002] = answer(["y"] * 5, first_delay=3.0)
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    first = await job.receive.receive()
    assert isinstance(first, Chunk)
    await job.receive.aclose()  # the client disconnected
    await finished(job)
    answers = {a.uid: a for a in results[0].answers}
    assert answers[1].text == "x" * 50 and answers[1].error is None
    assert answers[2].text == "yyyyy"
    assert len(answers[1].timings) == 50 and answers[1].timings == sorted(answers[1].timings)


async def test_requests_are_signed_with_routing_headers(pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = answer(["ok"])
    await collect(pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask"))
    (request,) = miners.received
    assert request.headers["task"] == "InferenceTask"
    assert request.headers["seed"] == "7"
    assert request.headers["Epistula-Signed-For"] == miners.neuron(1).hotkey
    assert json.loads(request.content) == BODY


async def test_failing_miner_opens_its_breaker(pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = 500
    miners.scripts[9002] = answer(["ok"])
    for _ in range(2):
        job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
        await collect(job)
        await finished(job)
    assert pool.miner_health.state(1) == "open" and pool.miner_health.state(2) == "closed"
    await trio.sleep(31)
    assert pool.miner_health.state(1) == "half_open" and pool.miner_health.allows(1)


async def test_one_time_budget_ends_every_miner_still_answering_each_as_it_deserves(
        pool: FanoutPool, miners: Miners, results: list[OrganicResult], autojump_clock: Any) -> None:
    """The request's budget (60 s here) is one deadline for all its miners: at it, a miner that has
    sent nothing fails, one still streaming text at an honest pace is cut without blame, and the
    answers that ended before it stand; the handler has its event and the job ends at the budget."""
    miners.scripts[9001] = answer(["quick", "whole"], first_delay=0.1)
    miners.scripts[9002] = [(600.0, chunk("never"))]  # headers, then nothing within the budget
    miners.scripts[9003] = answer([f"w{i} " for i in range(200)], step=1.0)  # still streaming at 60 s
    started = trio.current_time()
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2), miners.neuron(3)], mode="complete",
                     task="InferenceTask")
    (event,) = await collect(job)
    assert isinstance(event, Complete) and event.answer.uid == 1
    await finished(job)
    assert trio.current_time() - started == pytest.approx(60, abs=0.5)
    answers = {a.uid: a for a in results[0].answers}
    assert answers[1].error is None and answers[1].text == "quickwhole"
    assert answers[2].error == "no complete answer within 60s"
    assert answers[3].error == "still answering at the end of the 60s budget" and len(answers[3].chunks) >= 55
    assert pool.miner_failures["failed"] == 1 and pool.miner_failures["cut_at_budget"] == 1
    assert pool.miner_health.figures(2)[1] > 0 and pool.miner_health.figures(3) == (None, 0.0)
    assert pool.miner_streams == 0


async def test_at_the_budget_with_no_answer_the_handler_hears_that_all_failed(
        pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    """Miners settled at the budget (after their tasks are gone) still tell the handler: one `Failed`."""
    miners.scripts[9001] = [(600.0, chunk("never"))]
    miners.scripts[9002] = [(600.0, chunk("never"))]
    (event,) = await collect(pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream",
                                        task="InferenceTask"))
    assert isinstance(event, Failed)
    assert event.errors == {1: "no complete answer within 60s", 2: "no complete answer within 60s"}


async def test_a_stream_still_coming_at_the_budget_ends_with_an_error_event_after_its_text(
        pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    """The client of a stream whose winner is still writing when the budget ends has every chunk sent
    so far, then `Broken` saying why (no takeover: every miner still answering is out of time too)."""
    miners.scripts[9001] = answer([f"w{i} " for i in range(200)], step=1.0)
    miners.scripts[9002] = answer([f"w{i} " for i in range(200)], first_delay=0.5, step=1.0)
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    events = await collect(job)
    assert isinstance(events[-1], Broken) and "end of the 60s budget" in events[-1].error
    assert text_of(events) == "".join(f"w{i} " for i in range(len(job.answers[0].chunks)))
    assert job.race is not None and job.race.takeovers == 0


@pytest.mark.parametrize("mode", ["complete", "stream"])
async def test_a_cut_just_before_the_budget_ends_is_a_cut_however_late_the_job_task_resumes(
        pool: FanoutPool, miners: Miners, results: list[OrganicResult], autojump_clock: Any,
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The gateway cuts a fan-out 50 ms before its budget ends, and its task is resumed only after the
    deadline: the answers cut short are neither settled as out of time (a partial answer as `Complete`,
    or `End`, for the client) nor held against their miners."""
    miners.scripts[9001] = answer([f"a{i} " for i in range(200)], step=1.0)
    miners.scripts[9002] = answer([f"a{i} " for i in range(200)], step=1.0)
    ask = pool._ask

    async def resumed_late(job: Any, i: int, *args: Any) -> None:
        try:
            await ask(job, i, *args)
        finally:
            if job.cut_reason and i == 1:
                autojump_clock.jump(0.1)  # a long batch of other tasks before the job's task runs again

    monkeypatch.setattr(pool, "_ask", resumed_late)
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode=mode, task="InferenceTask")
    await trio.sleep_until(job.started + job.timeout_s - 0.05)
    pool.cut_short("collection cut short: the gateway was stopping")
    events = [event async for event in job.receive]
    await finished(job)
    assert not any(isinstance(e, Complete | End) for e in events)
    assert [a.error for a in results[0].answers] == ["collection cut short: the gateway was stopping"] * 2
    assert pool.miner_failures["failed"] == 0 and pool.miner_failures["cut_at_budget"] == 0
    assert pool.miner_health.figures(1) == (None, 0.0)


async def test_the_miner_asked_first_is_drawn_at_random_not_by_its_place_in_the_list(
        miners: Miners, nursery: trio.Nursery, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One miner of a fan-out is asked in the job's own task, ahead of the others by a few
    microseconds: which one is drawn per fan-out, so no place in the selection's order gets the lead."""
    pool: FanoutPool = await nursery.start(FanoutPool(
        make_http_client(Settings()), Signer(Keypair.create_from_uri("//Gateway")),
        MinerHealth(failure_threshold=2, cooldown_s=30.0), None, rng=random.Random(3)).run)
    for port in (9001, 9002, 9003):
        miners.scripts[port] = answer(["ok"])
    first: dict[int, int] = {}  # per fan-out, the uid of the miner whose ask began first
    ask = pool._ask

    async def noted(job: Any, i: int, *args: Any) -> None:
        first.setdefault(id(job), job.answers[i].uid)
        await ask(job, i, *args)

    monkeypatch.setattr(pool, "_ask", noted)
    jobs = [pool.start(BODY, [miners.neuron(1), miners.neuron(2), miners.neuron(3)], mode="complete",
                       task="InferenceTask") for _ in range(30)]
    for job in jobs:
        await finished(job)
    assert len(first) == 30 and set(first.values()) == {1, 2, 3}


def test_timeout_budget_is_upstreams() -> None:
    # clamp(max(30, 10 * floor(log2(max_new_tokens / 256)) + 30), 60, 300); default 1024 tokens
    assert request_timeout_s({}) == 60
    assert request_timeout_s({"sampling_parameters": {"max_new_tokens": 1024}}) == 60
    assert request_timeout_s({"sampling_parameters": {"max_new_tokens": 8}}) == 60
    assert request_timeout_s({"max_tokens": 4096}) == 70
    assert request_timeout_s({"sampling_parameters": {"max_new_tokens": 16384}}) == 90
    assert request_timeout_s({"sampling_parameters": {"max_new_tokens": 2**40}}) == 300
    # the client's `timeout` field, clamped the same way
    assert request_timeout_s({"timeout": 10, "sampling_parameters": {"max_new_tokens": 16384}}) == 60
    assert request_timeout_s({"timeout": 120}) == 120
    assert request_timeout_s({"timeout": 1000}) == 300


def text_of(events: list[Any]) -> str:
    return "".join(e.text or "" for e in events if isinstance(e, Chunk))


async def test_a_broken_winner_is_continued_by_a_miner_that_said_the_same(
        pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = [(0.0, chunk("The ")), (0.01, chunk("same ")), (0.01, "BREAK")]
    miners.scripts[9002] = answer(["The ", "same ", "answer"], first_delay=0.5, step=0.2)
    job = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    events = await collect(job)
    assert text_of(events) == "The same answer"
    assert isinstance(events[-1], End) and job.race is not None and job.race.takeovers == 1 and job.answers[job.winner or 0].uid == 2


async def test_a_stalled_winner_is_overtaken(pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = answer(["a ", "b ", "c"], first_delay=0.0, step=60.0)  # a token a minute
    miners.scripts[9002] = answer(["a ", "b ", "c"], first_delay=0.1, step=0.01)
    events = await collect(pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask"))
    assert text_of(events) == "a b c" and isinstance(events[-1], End)
    assert trio.current_time() < 10  # not a minute per token


async def test_no_takeover_by_a_miner_that_said_something_else(
        pool: FanoutPool, miners: Miners, autojump_clock: Any) -> None:
    miners.scripts[9001] = [(0.0, chunk("Mine ")), (0.01, "BREAK")]
    miners.scripts[9002] = answer(["Other ", "words"], first_delay=0.5)
    events = await collect(pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask"))
    assert text_of(events) == "Mine "
    assert isinstance(events[-1], Broken)


async def test_capacity_cuts_short_the_oldest_finished_collection(
        miners: Miners, results: list[OrganicResult], nursery: trio.Nursery, autojump_clock: Any) -> None:
    http = make_http_client(Settings())
    pool: FanoutPool = await nursery.start(FanoutPool(
        http, Signer(Keypair.create_from_uri("//Gateway")), MinerHealth(failure_threshold=5, cooldown_s=1),
        results.append, max_serving=1, max_jobs=2).run)
    miners.scripts[9001] = answer(["quick"])
    miners.scripts[9002] = [(0.5, chunk("hang")), (1000.0, DONE)]  # keeps every collection open
    first = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    with pytest.raises(PoolBusy):  # one request is being served: the second is refused
        pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask")
    await collect(first)
    first.release()
    second = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    await collect(second)
    second.release()
    await trio.sleep(1)  # the hanging miner has said something by now
    third = pool.start(BODY, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")  # first is cut
    await finished(first)
    assert pool.health()["collections_cut_short"] == 1
    cut = {a.uid: a for a in results[0].answers}
    assert cut[1].error is None and cut[2].error is not None and "capacity" in cut[2].error
    assert cut[2].text == "hang"  # what had arrived is still scored
    await collect(third)
    third.release()
    pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask").release()  # the oldest again
    await finished(second)
    assert pool.health()["collections_cut_short"] == 2


async def test_half_open_trials_are_taken_once_and_given_back_only_by_their_holder(
        miners: Miners, results: list[OrganicResult], nursery: trio.Nursery, autojump_clock: Any) -> None:
    http = make_http_client(Settings())
    health = MinerHealth(failure_threshold=1, cooldown_s=5.0)
    pool: FanoutPool = await nursery.start(FanoutPool(
        http, Signer(Keypair.create_from_uri("//Gateway")), health, results.append, max_serving=2).run)
    miners.scripts[9001] = 500
    await finished(pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask"))
    await trio.sleep(6)
    assert health.state(1) == "half_open" and health.allows(1)
    miners.scripts[9001] = [(0.0, chunk("slow")), (1000.0, DONE)]
    trial = pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask")
    assert trial.trials == {0: 1} and not health.allows(1)
    explicit = pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask")  # uids named by a client
    assert explicit.trials == {}
    with pytest.raises(PoolBusy):  # refused: it took nothing, so it gives nothing back
        pool.start(BODY, [miners.neuron(1)], mode="stream", task="InferenceTask")
    explicit.cancel_scope.cancel()
    await finished(explicit)
    assert not health.allows(1), "the trial still runs in the first request"
    trial.cancel_scope.cancel()
    await finished(trial)
    assert health.allows(1), "cut short undecided, the trial is given back"


async def test_a_client_reading_slowly_neither_delays_the_winners_timings_nor_looks_like_a_stall(
        pool: FanoutPool, miners: Miners, results: list[OrganicResult], autojump_clock: Any) -> None:
    words = [f"w{i} " for i in range(100)]  # more than a small buffer would hold
    miners.scripts[9001] = answer(words, first_delay=0.0, step=0.01)
    miners.scripts[9002] = answer(words, first_delay=0.5, step=0.01)  # could take over, if asked to
    body = {**BODY, "sampling_parameters": {"max_new_tokens": 200}}
    job = pool.start(body, [miners.neuron(1), miners.neuron(2)], mode="stream", task="InferenceTask")
    await trio.sleep(5.0)  # the client reads nothing for longer than stall_timeout_s
    events = await collect(job)
    assert text_of(events) == "".join(words) and isinstance(events[-1], End)
    assert job.race is not None and job.race.takeovers == 0
    await finished(job)
    winner = next(a for a in results[0].answers if a.uid == 1)
    assert winner.timings[-1] < 2.0  # read at the miner's pace: 100 tokens 10 ms apart
