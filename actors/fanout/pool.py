"""FanoutPool: asks several miners the same request at once and tells the caller about the winner.

Each request becomes a `FanoutJob` whose miner streams run in the pool's own nursery, not in the
HTTP handler: the client's response ends when the winner ends, while the other miners go on (bounded by
the request's timeout) so that every answer can be scored. When all of a job's miners are done, the
job's `OrganicResult` goes to the scoring forwarder.

Modes:
- "stream": the first miner to send text wins (`actors/fanout/race.py`: stalls and takeovers).
- "complete": the winner is the first miner to finish a valid answer.
- "all": no winner; the caller waits for `finished` (mixture of miners, first round; web retrieval).

Miners asked only for scoring (`scoring_only`) are never a winner nor a successor.

Every miner's answer is bounded (`AnswerBounds`, from the request's token budget): bytes, events, one
event's size, and time. Going over is that miner's failure; its connection is closed. One request's
answers together are bounded too (the largest still coming gives way), and so are the answers of every
fan-out running, together (`answers_max_bytes`): while they hold more, an answer still coming that is
past its share of the budget (the budget over the miner streams open) is cut at its next read; the
miner's failure when its answer is also past what its request typically takes (more than an honest
miner sends), else the gateway's own limit (`cut_at_pool_budget`, no breaker moves). A cut winner is
handled as any winner that breaks (a successor, or an error event). Counted with integer updates per
read, so memory held stays near the budget (at most about twice it: answers under their share go on).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import trio

from actors.fanout.bounds import AnswerBounds, request_timeout_s
from actors.fanout.breaker import MinerHealth
from actors.fanout.events import Complete, Failed
from actors.fanout.job import FanoutJob, Mode
from wire import jsonio
from wire.chunks import NotAChunk, read_events, usage_counts
from wire.epistula import Signer, body_digest, routing_headers
from wire.http1 import GatewayLimitError
from wire.ids import uuid4_hex
from wire.metagraph import Neuron
from wire.organic import MinerAnswer, OrganicResult
from wire.pool import ParsedUrls, post_streaming
from wire.sse import SseData, SseTooLarge

log = logging.getLogger("sn1_gateway.fanout")

DRAIN_AFTER_DONE_S = 0.25  # how long the end of a miner's body may lag behind its [DONE]
# Answers the miner gives because of what the client sent: not the miner's failure.
CLIENT_CAUSED_STATUSES = frozenset({400, 413, 422})


class MinerFailure(Exception):
    """One miner's answer is unusable; the message says why."""


class ClientCaused(MinerFailure):
    """The miner refused the request for what the client sent (a 4xx): not held against the miner."""


class OverBounds(MinerFailure):
    """The miner's answer went over its bounds (`AnswerBounds`): its connection is closed."""


class PoolBudgetCut(MinerFailure):
    """The gateway held too much of its miners' answers and this answer, of an ordinary size, was past
    its share: cut for the gateway's own limit, not held against the miner."""


STILL_STREAMING_S = 5.0  # a miner that sent text this recently when its time ran out was still answering


def still_streaming(answer: MinerAnswer, now_s: float) -> bool:
    """Whether the miner sent text within `STILL_STREAMING_S` of `now_s` (seconds from the request's start)."""
    return bool(answer.timings) and now_s - answer.timings[-1] <= STILL_STREAMING_S


class FanoutPool:
    name = "fanout"

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
        answers_max_bytes: int = 512 * 1024 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.http = http
        self.signer = signer
        self.miner_health = health
        self.submit = submit
        self.max_serving = max_serving
        self.max_jobs = max_jobs
        self.stall_s = stall_s
        self.answers_max_bytes = answers_max_bytes
        self.answers_bytes = 0  # what the miners of every running fan-out have sent, together
        self.miner_streams = 0  # miners being asked now, over every fan-out
        self.answers_cut = 0  # answers cut because the running fan-outs held more than answers_max_bytes
        self._jobs: dict[int, FanoutJob] = {}  # running jobs, oldest first
        self.jobs_serving = 0
        self.jobs_evicted = 0
        self._nursery: trio.Nursery | None = None
        self.jobs_running = 0
        self.jobs_total = 0
        self.jobs_refused = 0
        self.results_unscored = 0  # results with nowhere to go (no scoring forwarder)
        self.miner_failures: dict[str, int] = {"failed": 0, "client_caused": 0, "over_bounds": 0, "cut_at_budget": 0,
                                               "cut_at_pool_budget": 0}
        self.gateway_errors = 0  # asks that failed on the gateway's side (not held against the miner)
        self._idle = trio.Event()
        self._idle.set()
        self._urls = ParsedUrls()
        self._rng = rng or random.Random()  # which miner of a fan-out is asked in the job's own task

    async def run(self, *, task_status: trio.TaskStatus[FanoutPool] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def start(self, body: dict[str, Any], miners: Sequence[Neuron], *, mode: Mode, task: str,
              request_id: str | None = None, timeout_s: float | None = None,
              scoring_only: Sequence[Neuron] = (), moves_breakers: bool = True) -> FanoutJob:
        """Start asking `miners` (and `scoring_only`, whose answers only go to scoring); returns at
        once. Raises `PoolBusy` when the pool cannot take it.

        Admitted, each miner is noted as being asked: a half-open one gets one trial at a time, and
        the job remembers which trials it holds (`trials`), to give back any that ends undecided.
        `moves_breakers=False` (a request naming its miners) leaves every breaker as it is.
        """
        nursery = self._admit()
        bounds = AnswerBounds.for_request(task, body)
        job = FanoutJob(
            request_id=request_id or uuid4_hex(), task=task, body=body,
            miners=[*miners, *scoring_only], mode=mode, timeout_s=timeout_s or request_timeout_s(body),
            bounds=bounds, max_bytes_held=bounds.request_bytes(len(miners) + len(scoring_only)), stall_s=self.stall_s,
            moves_breakers=moves_breakers, scoring_only=len(scoring_only), _on_release=self._released,
        )
        if moves_breakers:
            job.trials = {i: trial for i, neuron in enumerate(miners)
                          if (trial := self.miner_health.asking(neuron.uid)) is not None}
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
        """The job's miners, asked within its cancel scope, whose deadline is the request's time budget:
        one deadline for them all (a cancel scope per miner cost as much as reading its answer). At it,
        the miners still answering are settled (`_ask` has said why each failed); when the job is cut
        short instead, they are not, and the job ends as it stands."""
        body_bytes = jsonio.dumps(job.body)
        routing = routing_headers(job.body, client_timeout_s=job.timeout_s)
        job.cancel_scope.deadline = job.started + job.timeout_s
        try:
            with job.cancel_scope:
                if job.race is None:
                    await self._ask_all(job, body_bytes, routing)
                else:
                    async with trio.open_nursery() as watch:
                        watch.start_soon(job.race.watch)
                        await self._ask_all(job, body_bytes, routing)
                        watch.cancel_scope.cancel()
            if job.cancel_scope.cancelled_caught:
                if job.out_of_time:  # each miner still answering has said why (`_ask`)
                    for i in range(len(job.miners)):
                        if not job.settled[i] and job.answers[i].error is not None:
                            self._settle(job, i)
                for answer in job.answers:
                    if answer.error is None and not answer.completed:
                        answer.error = job.cut_reason or "collection cut short"
        finally:
            del self._jobs[id(job)]
            self.answers_bytes -= job.bytes_held
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

    async def _ask_all(self, job: FanoutJob, body_bytes: bytes, routing: dict[str, str]) -> None:
        """Every miner at once: one in this task, the others each in one of their own (`_ask` raises
        nothing but cancellation). The one asked here goes first by a few microseconds (its request is
        signed and sent before the others' tasks start), so it is drawn at random, never by its place
        in the list (the selection's order)."""
        digest = body_digest(body_bytes)
        count = len(job.miners)
        if count == 1:
            await self._ask(job, 0, body_bytes, digest, routing)
            return
        lead = self._rng.randrange(count)
        async with trio.open_nursery() as nursery:
            for i in range(count):
                if i != lead:
                    nursery.start_soon(self._ask, job, i, body_bytes, digest, routing)
            await self._ask(job, lead, body_bytes, digest, routing)

    async def _ask(self, job: FanoutJob, i: int, body_bytes: bytes, digest: str, routing: dict[str, str]) -> None:
        neuron, answer = job.miners[i], job.answers[i]
        headers = {**routing, **self.signer.headers(body_bytes, neuron.hotkey, digest=digest),
                   "Content-Type": "application/json", "Accept": "text/event-stream"}
        # "ok" and "failed" are the miner's doing; "neutral" (the client's input, the gateway's own
        # failure, a cancelled request) moves no breaker.
        outcome = "neutral"
        self.miner_streams += 1
        try:
            await self._stream(job, i, body_bytes, headers)
            if not answer.completed and answer.finish_reason is None:
                raise MinerFailure("stream ended without a finish_reason or [DONE]")
            if not answer.chunks:
                raise MinerFailure("answered no content")
            outcome = "ok"
        except ClientCaused as exc:
            answer.error = str(exc)
            self.miner_failures["client_caused"] += 1
        except PoolBudgetCut as exc:
            answer.error = str(exc)
            self.miner_failures["cut_at_pool_budget"] += 1
        except MinerFailure as exc:
            answer.error, outcome = str(exc), "failed"
            self.miner_failures["over_bounds" if isinstance(exc, OverBounds) else "failed"] += 1
        except GatewayLimitError as exc:
            answer.error = f"gateway error: {exc}"
            self.gateway_errors += 1
        except httpx.HTTPError as exc:
            answer.error, outcome = describe_http_error(exc), "failed"
            self.miner_failures["failed"] += 1
        except Exception as exc:  # a defect must cost one miner's answer, not every request in the pool
            log.exception("unexpected error asking uid %d", neuron.uid)
            answer.error = f"gateway error: {type(exc).__name__}"
            self.gateway_errors += 1
        finally:
            if outcome == "neutral" and answer.error is None and job.out_of_time:
                outcome = self._out_of_time(job, i)
            self.miner_streams -= 1
            trial, moves = job.trials.get(i), job.moves_breakers
            if outcome == "ok":
                self.miner_health.succeeded(neuron.uid, answer.timings[0] if answer.timings else None, trial, moves=moves)
            elif outcome == "failed":
                self.miner_health.failed(neuron.uid, answer.error or "failed", trial, moves=moves)
            elif trial is not None:
                self.miner_health.released(neuron.uid, trial)
        self._settle(job, i)

    def _out_of_time(self, job: FanoutJob, i: int) -> str:
        """Miner i was still answering when the request's time budget ran out: cut at the budget when
        it is still sending text (an honest miner writing a long answer at its own pace), else failed.
        Returns the outcome for its breaker."""
        answer = job.answers[i]
        if still_streaming(answer, trio.current_time() - job.started):
            answer.error = f"still answering at the end of the {job.timeout_s:g}s budget"
            self.miner_failures["cut_at_budget"] += 1
            return "neutral"
        answer.error = f"no complete answer within {job.timeout_s:g}s"
        self.miner_failures["failed"] += 1
        return "failed"

    async def _stream(self, job: FanoutJob, i: int, body_bytes: bytes, headers: dict[str, str]) -> None:
        url = self._urls(f"http://{job.miners[i].axon}/v1/chat/completions")
        bounds = job.bounds
        async with post_streaming(self.http, url, body_bytes, headers, bounded=True) as response:  # job.timeout_s
            status = response.status_code
            if status != 200:
                raise (ClientCaused if status in CLIENT_CAUSED_STATUSES else MinerFailure)(f"HTTP {status}")
            body = response.aiter_bytes()
            parser = SseData(bounds.max_event_bytes)
            try:
                async for piece in body:
                    self._count(job, i, response.wire_bytes)
                    events = parser.feed(piece)
                    if events and self._take(job, i, events):
                        break
                else:
                    self._take(job, i, parser.end())
                    return
            except SseTooLarge as exc:
                raise OverBounds(str(exc)) from None
            # Read on to the end of the body (it follows [DONE] at once), or the connection cannot go
            # back to the pool and the next request to this miner pays for a new one. Usually it came
            # with [DONE]: then no deadline is needed (nor its cost).
            with contextlib.nullcontext() if response.end_received else trio.move_on_after(DRAIN_AFTER_DONE_S):
                async for _ in body:
                    if response.wire_bytes > bounds.max_bytes:
                        break

    def _count(self, job: FanoutJob, i: int, wire_bytes: int) -> None:
        """What miner i has sent so far, against its bound and the request's: when the request's
        answers hold too much together, the largest one still coming gives way (most likely the
        miner making it so), never the first to have a byte over."""
        answer, bounds = job.answers[i], job.bounds
        grown = wire_bytes - answer.received_bytes
        job.bytes_held += grown
        self.answers_bytes += grown
        answer.received_bytes = wire_bytes
        if wire_bytes > bounds.max_bytes:
            raise OverBounds(f"answer over {bounds.max_bytes} bytes")
        if self.answers_bytes > self.answers_max_bytes and wire_bytes * self.miner_streams > self.answers_max_bytes:
            self._cut_for_the_pool(bounds, wire_bytes)
        if i in job.over_budget:
            raise OverBounds(f"the request's answers over {job.max_bytes_held} bytes together; this one the largest")
        if job.bytes_held > job.max_bytes_held:
            coming = [j for j in range(len(job.answers)) if not job.settled[j] and j not in job.over_budget]
            largest = max(coming, key=lambda j: job.answers[j].received_bytes)
            job.over_budget.add(largest)
            if largest == i:
                raise OverBounds(f"the request's answers over {job.max_bytes_held} bytes together; "
                                 "this one the largest")

    def _cut_for_the_pool(self, bounds: AnswerBounds, wire_bytes: int) -> None:
        """Every running fan-out's answers hold more than `answers_max_bytes`, and this one is past its
        share: it stops here. Past its request's typical size too, it is the miner's doing."""
        self.answers_cut += 1
        if wire_bytes > bounds.typical_bytes:
            raise OverBounds(f"answer of {wire_bytes} bytes, over the {bounds.typical_bytes} typical of this "
                             f"request, while the gateway held over {self.answers_max_bytes} bytes of answers")
        raise PoolBudgetCut(f"cut at {wire_bytes} bytes: the gateway held over {self.answers_max_bytes} bytes "
                            "of miners' answers")

    def _take(self, job: FanoutJob, i: int, events: list[bytes]) -> bool:
        """The events one read brought (so they arrived at one time); True once [DONE] has come."""
        answer = job.answers[i]
        answer.events += len(events)
        if answer.events > job.bounds.max_events:
            raise OverBounds(f"answer over {job.bounds.max_events} events")
        at = round(trio.current_time() - job.started, 6)
        try:
            read, done = read_events(events)
        except NotAChunk as exc:
            raise MinerFailure(f"sent a chunk that is {exc}") from None
        race = job.race if job.streaming and not answer.scoring_only else None
        max_chars = job.bounds.max_chunk_chars
        chunks, timings, raw_chunks = answer.chunks, answer.timings, answer.raw_chunks
        for data, chunk, text, finish, choice in read:
            if max_chars is not None and len(text) > max_chars:
                raise OverBounds(f"sent a chunk of over {max_chars} characters")
            if "usage" in chunk:
                answer.usage = usage_counts(chunk["usage"]) or answer.usage
            if text:
                chunks.append(text)
                timings.append(at)
                # As received; a chunk sent over several data lines holds newlines: written compactly.
                raw_chunks.append(jsonio.dumps(chunk) if b"\n" in data else data)
            if finish is not None:
                answer.finish_reason = finish
            if race is not None:
                race.on_chunk(i, text, finish, choice)
        answer.completed = answer.completed or done
        return done

    def _settle(self, job: FanoutJob, i: int) -> None:
        """One miner is done: tell the handler what that changes."""
        answer = job.answers[i]
        job.settled[i] = True
        if answer.scoring_only:
            return
        job.pending -= 1
        if not answer.error:
            job.first_done.set()
        if job.race is not None:
            job.race.on_settled(i)
        elif job.mode == "complete" and job.winner is None and not answer.error:
            job.winner = i
            job.emit(Complete(answer))
        if job.pending == 0 and job.winner is None and job.mode != "all":
            job.emit(Failed(job.errors()))

    async def wait_idle(self) -> None:
        """Wait until no fan-out is running (background collections included)."""
        await self._idle.wait()

    def health(self) -> dict[str, Any]:
        return {"running": self.jobs_running, "serving": self.jobs_serving, "total": self.jobs_total,
                "refused": self.jobs_refused, "collections_cut_short": self.jobs_evicted,
                "unscored": self.results_unscored, "miner_failures": dict(self.miner_failures),
                "gateway_errors": self.gateway_errors, "answers_bytes": self.answers_bytes,
                "answers_max_bytes": self.answers_max_bytes, "miner_streams": self.miner_streams,
                "answers_cut": self.answers_cut}


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
