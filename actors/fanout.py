"""FanoutPool: asks several miners the same request at once and tells the caller about the winner.

Each request becomes a `FanoutJob` whose miner streams run in the pool's own nursery, not in the
HTTP handler: the client's response ends when the winner ends, while the other miners go on (bounded by
the request's timeout) so that every answer can be scored. When all of a job's miners are done, the
job's `OrganicResult` goes to the scoring forwarder.

Modes:
- "stream": the winner is the first miner to send a content chunk; its chunks are passed on as they
  arrive. Subnet 1 miners answer a seeded request with the same text, so when the winner breaks or
  stalls (no chunk for `stall_s`), another miner whose answer so far begins with exactly what the
  client has received takes over from that point. Without such a miner the stream ends in an error.
- "complete": the winner is the first miner to finish a valid answer.
- "all": no winner; the caller waits for `finished` (mixture of miners, first round).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio

from actors.breaker import MinerHealth
from engine import jsonio
from engine.epistula import Signer, routing_headers
from engine.keepalive import ParsedUrls, post_streaming
from engine.organic import MinerAnswer, OrganicResult
from engine.sse import DONE, SseData
from engine.subnet import Neuron

log = logging.getLogger("sn1_gateway.fanout")

Mode = Literal["stream", "complete", "all"]
DRAIN_AFTER_DONE_S = 0.25  # how long the end of a miner's body may lag behind its [DONE]
JOB_EVENTS = 64  # winner events buffered towards the handler; beyond that the winner's stream waits


def request_timeout_s(body: dict[str, Any]) -> float:
    """The predecessor's budget: 30 s, plus 10 s per doubling of max_new_tokens beyond 512."""
    params = body.get("sampling_parameters")
    limit = params.get("max_new_tokens") if isinstance(params, dict) else None
    if not isinstance(limit, int | float) or isinstance(limit, bool):
        limit = body.get("max_tokens")
    if not isinstance(limit, int | float) or isinstance(limit, bool) or limit <= 0:
        limit = 256
    return float(max(30, 10 * max(0, math.floor(math.log2(limit / 256))) + 30))


class MinerFailure(Exception):
    """One miner's answer is unusable; the message says why."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk of the winner's stream."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class End:
    """The winner finished; `finish_reason` as it sent it (None if it only sent [DONE])."""

    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Broken:
    """The winner failed after it had started answering."""

    error: str


@dataclass(frozen=True, slots=True)
class Failed:
    """Every miner failed before any usable answer."""

    errors: dict[int, str]


@dataclass(frozen=True, slots=True)
class Complete:
    """A whole valid answer (mode "complete")."""

    answer: MinerAnswer


Event = Chunk | End | Broken | Failed | Complete


def content_of(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """The text delta and finish_reason of an OpenAI chat chunk (empty text when there is none)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None
    choice = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        delta = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = delta.get("content") if isinstance(delta, dict) else None
    finish = choice.get("finish_reason")
    return (text if isinstance(text, str) else ""), (finish if isinstance(finish, str) else None)


@dataclass
class FanoutJob:
    request_id: str
    task: str
    body: dict[str, Any]
    miners: list[Neuron]
    mode: Mode
    timeout_s: float
    started: float = field(default_factory=trio.current_time)
    answers: list[MinerAnswer] = field(default_factory=list)
    winner: int | None = None
    stall_s: float = 1.5
    finished: trio.Event = field(default_factory=trio.Event)
    first_done: trio.Event = field(default_factory=trio.Event)  # a miner finished well, or the job ended
    client_gone: bool = False
    winner_broken: bool = False
    takeovers: int = 0
    _sent: list[str] = field(default_factory=list)  # the text the client has received
    _winner_seen_at: float = 0.0  # when the winner last sent a chunk
    _pending: int = 0
    released: bool = False  # the handler is done with the job; what remains is collection for scoring
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cut_reason: str | None = None  # why the job was cut short, when it was
    trials: dict[int, int] = field(default_factory=dict)  # miner index -> number of the half-open trial it holds
    _on_release: Callable[[], None] | None = None
    _send: trio.MemorySendChannel[Event] = field(init=False)
    receive: trio.MemoryReceiveChannel[Event] = field(init=False)

    def __post_init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel[Event](JOB_EVENTS)
        self.answers = [MinerAnswer(uid=n.uid, hotkey=n.hotkey) for n in self.miners]
        self._pending = len(self.miners)

    def successor(self, now: float) -> int | None:
        """A miner that can continue the client's stream: the winner is broken or stalled, and this
        miner's answer so far begins with exactly what the client received (and it has not failed)."""
        if self.winner is None or self.client_gone:
            return None
        if not self.winner_broken and now - self._winner_seen_at < self.stall_s:
            return None
        sent = "".join(self._sent)
        for j, answer in enumerate(self.answers):
            if j != self.winner and answer.error is None and answer.chunks and answer.text.startswith(sent):
                return j
        return None

    def release(self) -> None:
        """The handler is done: no more events for it; the miners go on only for scoring."""
        self.receive.close()
        if not self.released:
            self.released = True
            if self._on_release is not None:
                self._on_release()

    @property
    def winner_answer(self) -> MinerAnswer | None:
        return None if self.winner is None else self.answers[self.winner]

    def errors(self) -> dict[int, str]:
        return {a.uid: a.error or "no answer" for a in self.answers if a.error or not a.chunks}

    async def _emit(self, event: Event) -> None:
        if self.client_gone:
            return
        try:
            await self._send.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.client_gone = True  # the handler left (client disconnect, timeout): keep collecting

    def result(self) -> OrganicResult:
        return OrganicResult(
            request_id=self.request_id, task=self.task, body=self.body, answers=tuple(self.answers),
            created_at=time.time(),
        )


class FanoutPool:
    def __init__(
        self,
        http: httpx.AsyncClient,
        signer: Signer,
        health: MinerHealth,
        submit: Callable[[OrganicResult], None] | None,
        *,
        max_serving: int = 512,
        max_jobs: int = 4096,
        stall_s: float = 1.5,
    ) -> None:
        self.http = http
        self.signer = signer
        self.health = health
        self.submit = submit
        self.max_serving = max_serving
        self.max_jobs = max_jobs
        self.stall_s = stall_s
        self._jobs: dict[int, FanoutJob] = {}  # running jobs, oldest first
        self.jobs_serving = 0
        self.jobs_evicted = 0
        self._nursery: trio.Nursery | None = None
        self.jobs_running = 0
        self.jobs_total = 0
        self.jobs_refused = 0
        self.results_unscored = 0  # results with nowhere to go (no scoring forwarder)
        self._idle = trio.Event()
        self._idle.set()
        self._urls = ParsedUrls()

    async def run(self, *, task_status: trio.TaskStatus[FanoutPool] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def start(self, body: dict[str, Any], miners: Sequence[Neuron], *, mode: Mode, task: str,
              request_id: str | None = None, timeout_s: float | None = None) -> FanoutJob:
        """Start asking `miners`; returns at once. Raises `PoolBusy` when the pool cannot take it.

        Admitted, each miner is noted as being asked: a half-open one gets one trial at a time, and
        the job remembers which trials it holds (`trials`), to give back any that ends undecided.
        """
        nursery = self._admit()
        job = FanoutJob(
            request_id=request_id or uuid.uuid4().hex, task=task, body=body, miners=list(miners),
            mode=mode, timeout_s=timeout_s or request_timeout_s(body), stall_s=self.stall_s,
            _on_release=self._released,
        )
        job.trials = {i: trial for i, neuron in enumerate(job.miners)
                      if (trial := self.health.asking(neuron.uid)) is not None}
        self._jobs[id(job)] = job
        self.jobs_serving += 1
        if self.jobs_running == 0:
            self._idle = trio.Event()
        self.jobs_running += 1
        self.jobs_total += 1
        nursery.start_soon(self._run_job, job)
        return job

    def _admit(self) -> trio.Nursery:
        if self._nursery is None:
            raise PoolBusy("the fan-out pool is restarting")
        if self.jobs_serving >= self.max_serving:
            self.jobs_refused += 1
            raise PoolBusy(f"{self.jobs_serving} requests are being served")
        if self.jobs_running >= self.max_jobs:
            self._evict_oldest_collection()
        return self._nursery

    def _released(self) -> None:
        self.jobs_serving -= 1

    def _evict_oldest_collection(self) -> None:
        """At capacity: cut short the oldest collection whose client is already served (counted)."""
        for job in self._jobs.values():
            if job.released and not job.cancel_scope.cancel_called:
                self._cut(job, "collection cut short: the gateway was at capacity")
                self.jobs_evicted += 1
                return
        self.jobs_refused += 1
        raise PoolBusy(f"{self.jobs_running} fan-outs are running already")

    def cut_short(self, reason: str) -> int:
        """Stop every running fan-out now; each still goes to scoring with what it has. Returns how many."""
        jobs = [job for job in self._jobs.values() if not job.cancel_scope.cancel_called]
        for job in jobs:
            self._cut(job, reason)
        return len(jobs)

    @staticmethod
    def _cut(job: FanoutJob, reason: str) -> None:
        job.cut_reason = reason
        job.cancel_scope.cancel()

    async def _run_job(self, job: FanoutJob) -> None:
        body_bytes = jsonio.dumps(job.body)
        routing = routing_headers(job.body, client_timeout_s=job.timeout_s)
        try:
            with job.cancel_scope:
                async with trio.open_nursery() as watch:
                    if job.mode == "stream":
                        watch.start_soon(self._watch_stalls, job)
                    async with trio.open_nursery() as nursery:
                        for i in range(len(job.miners)):
                            nursery.start_soon(self._ask, job, i, body_bytes, routing)
                    watch.cancel_scope.cancel()
            if job.cancel_scope.cancelled_caught:
                for answer in job.answers:
                    if answer.error is None and not answer.completed:
                        answer.error = job.cut_reason or "collection cut short"
        finally:
            del self._jobs[id(job)]
            if not job.released:  # the pool is stopping under a handler still attached
                job.released = True
                self.jobs_serving -= 1
            self.jobs_running -= 1
            if self.jobs_running == 0:
                self._idle.set()
            job._send.close()
            job.first_done.set()
            job.finished.set()
            if self.submit is not None:
                self.submit(job.result())
            else:
                self.results_unscored += 1

    async def _ask(self, job: FanoutJob, i: int, body_bytes: bytes, routing: dict[str, str]) -> None:
        neuron, answer = job.miners[i], job.answers[i]
        headers = {**routing, **self.signer.headers(body_bytes, neuron.hotkey),
                   "Content-Type": "application/json", "Accept": "text/event-stream"}
        outcome = "cancelled"
        try:
            with trio.move_on_after(job.timeout_s) as scope:
                await self._stream(job, i, body_bytes, headers)
            if scope.cancelled_caught:
                raise MinerFailure(f"no complete answer within {job.timeout_s:g}s")
            if not answer.completed and answer.finish_reason is None:
                raise MinerFailure("stream ended without a finish_reason or [DONE]")
            if not answer.chunks:
                raise MinerFailure("answered no content")
            outcome = "ok"
        except MinerFailure as exc:
            answer.error, outcome = str(exc), "failed"
        except httpx.HTTPError as exc:
            answer.error, outcome = describe_http_error(exc), "failed"
        except Exception as exc:  # a defect must cost one miner's answer, not every request in the pool
            log.exception("unexpected error asking uid %d", neuron.uid)
            answer.error, outcome = f"gateway error: {type(exc).__name__}", "failed"
        finally:
            if outcome == "ok":
                self.health.succeeded(neuron.uid, answer.timings[0] if answer.timings else None)
            elif outcome == "failed":
                self.health.failed(neuron.uid, answer.error or "failed")
            elif i in job.trials:
                self.health.released(neuron.uid, job.trials[i])
        await self._settle(job, i)

    async def _stream(self, job: FanoutJob, i: int, body_bytes: bytes, headers: dict[str, str]) -> None:
        url = self._urls(f"http://{job.miners[i].axon}/v1/chat/completions")
        async with post_streaming(self.http, url, body_bytes, headers, bounded=True) as response:  # job.timeout_s
            if response.status_code != 200:
                raise MinerFailure(f"HTTP {response.status_code}")
            body = response.aiter_bytes()
            parser = SseData()
            async for piece in body:
                events = parser.feed(piece)
                if events and await self._take(job, i, events):
                    break
            else:
                await self._take(job, i, parser.end())
                return
            # Read on to the end of the body (it follows [DONE] at once), or the connection cannot go
            # back to the pool and the next request to this miner pays for a new one.
            with trio.move_on_after(DRAIN_AFTER_DONE_S):
                async for _ in body:
                    pass

    async def _take(self, job: FanoutJob, i: int, events: list[bytes]) -> bool:
        """The events one read brought (so they arrived at one time); True once [DONE] has come."""
        answer = job.answers[i]
        at = round(trio.current_time() - job.started, 6)
        for data in events:
            if data == DONE:
                answer.completed = True
                return True
            try:
                chunk = jsonio.loads(data)
            except ValueError:
                raise MinerFailure("sent a chunk that is not valid JSON") from None
            if not isinstance(chunk, dict):
                raise MinerFailure("sent a chunk that is not a JSON object")
            text, finish = content_of(chunk)
            answer.raw_chunks.append(chunk)
            if text:
                answer.chunks.append(text)
                answer.timings.append(at)
            if finish is not None:
                answer.finish_reason = finish
            if job.mode == "stream":
                await self._forward(job, i, chunk, text, finish)
        return False

    async def _forward(self, job: FanoutJob, i: int, chunk: dict[str, Any], text: str, finish: str | None) -> None:
        if job.client_gone:
            return
        if job.winner is None:
            if not text:
                return
            job.winner = i
        elif job.winner != i:
            if job.successor(trio.current_time()) == i:
                await self._take_over(job, i)
            return
        job._winner_seen_at = trio.current_time()
        if text:
            job._sent.append(text)
        await job._emit(Chunk(chunk))
        if finish is not None:
            await job._emit(End(finish))
            job.client_gone = True  # the client's answer is whole; the rest is for scoring only

    async def _watch_stalls(self, job: FanoutJob) -> None:
        """A stalled winner is noticed even when no other chunk arrives to prompt the check."""
        while not job.client_gone:
            await trio.sleep(job.stall_s / 2)
            successor = job.successor(trio.current_time())
            if successor is not None:
                await self._take_over(job, successor)

    async def _take_over(self, job: FanoutJob, j: int) -> None:
        """Continue the client's stream from miner j, which has already said what the client has."""
        answer = job.answers[j]
        log.info("request %s: uid %d takes over the stream from uid %d", job.request_id, answer.uid,
                 job.answers[job.winner or 0].uid)
        job.winner, job.winner_broken, job.takeovers = j, False, job.takeovers + 1
        job._winner_seen_at = trio.current_time()
        rest = answer.text[len("".join(job._sent)):]
        if rest:
            job._sent.append(rest)
            await job._emit(Chunk({"choices": [{"index": 0, "delta": {"content": rest}, "finish_reason": None}]}))
        if answer.finish_reason is not None or answer.completed:
            await job._emit(End(answer.finish_reason))
            job.client_gone = True

    async def _settle(self, job: FanoutJob, i: int) -> None:
        """One miner is done: tell the handler what that changes."""
        answer = job.answers[i]
        job._pending -= 1
        if not answer.error:
            job.first_done.set()
        if job.mode == "stream":
            if job.winner == i:
                if answer.error:
                    job.winner_broken = True
                else:
                    await job._emit(End(answer.finish_reason))
                    job.client_gone = True
            if job.winner_broken and not job.client_gone:
                successor = job.successor(trio.current_time())
                if successor is not None:
                    await self._take_over(job, successor)
                elif job._pending == 0:
                    await job._emit(Broken(job.answers[job.winner or 0].error or "the answer broke off"))
                    job.client_gone = True
        elif job.mode == "complete" and job.winner is None and not answer.error:
            job.winner = i
            await job._emit(Complete(answer))
        if job._pending == 0 and job.winner is None and job.mode != "all":
            await job._emit(Failed(job.errors()))

    async def wait_idle(self) -> None:
        """Wait until no fan-out is running (background collections included)."""
        await self._idle.wait()

    def statistics(self) -> dict[str, Any]:
        return {"running": self.jobs_running, "serving": self.jobs_serving, "total": self.jobs_total,
                "refused": self.jobs_refused, "collections_cut_short": self.jobs_evicted,
                "unscored": self.results_unscored}


class PoolBusy(Exception):
    """The pool refuses new work (overloaded or restarting)."""


def describe_http_error(exc: httpx.HTTPError) -> str:
    kinds = {
        httpx.ConnectError: "connection failed",
        httpx.ConnectTimeout: "connect timed out",
        httpx.ReadTimeout: "read timed out",
        httpx.RemoteProtocolError: "broke the HTTP protocol (stopped mid-stream?)",
        httpx.ReadError: "connection broke while reading",
    }
    for kind, text in kinds.items():
        if isinstance(exc, kind):
            return text
    return f"{type(exc).__name__}: {exc}".rstrip(": ")
