"""FanoutPool: asks several miners the same request at once and tells the caller about the winner.

Each request becomes a `FanoutJob` whose miner streams run in the pool's own nursery, not in the
HTTP handler: the client's response ends when the winner ends, while the other miners go on (bounded by
the request's timeout) so that every answer can be scored. When all of a job's miners are done, the
job's `OrganicResult` goes to the scoring forwarder.

Modes:
- "stream": the winner is the first miner to send a content chunk; its chunks are passed on as they
  arrive. Subnet 1 miners answer a seeded request with the same text, so when the winner breaks or
  stalls (no chunk for `stall_s`), another miner whose answer so far begins with exactly what the
  client has received takes over from that point. Without such a miner the stream ends in an error,
  at once when no miner that has said something can still catch up, else after `stall_s`.
- "complete": the winner is the first miner to finish a valid answer.
- "all": no winner; the caller waits for `finished` (mixture of miners, first round; web retrieval).

Miners asked only for scoring (`scoring_only`) are never a winner nor a successor.

Every miner's answer is bounded (`AnswerBounds`, from the request's token budget): bytes, events, one
event's size, and time. Going over is that miner's failure; its connection is closed.
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

from actors.fanout.breaker import MinerHealth
from wire import jsonio
from wire.epistula import Signer, routing_headers
from wire.http1 import GatewayLimitError
from wire.metagraph import Neuron
from wire.organic import MinerAnswer, OrganicResult
from wire.pool import ParsedUrls, post_streaming
from wire.sse import DONE, SseData, SseTooLarge

log = logging.getLogger("sn1_gateway.fanout")

Mode = Literal["stream", "complete", "all"]
DRAIN_AFTER_DONE_S = 0.25  # how long the end of a miner's body may lag behind its [DONE]
JOB_EVENTS = 64  # winner events buffered towards the handler; beyond that the winner's stream waits
DEFAULT_MAX_NEW_TOKENS = 1024
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 60.0, 300.0
# Answers the miner gives because of what the client sent: not the miner's failure.
CLIENT_CAUSED_STATUSES = frozenset({400, 413, 422})
MAX_USAGE_TOKENS = 2**31 - 1
RETRIEVAL_TASK = "WebRetrievalTask"
RETRIEVAL_MAX_BYTES = 8 * 1024 * 1024


def token_budget(body: dict[str, Any]) -> int:
    """The request's `max_new_tokens` (OpenAI's `max_tokens` counts too), else upstream's default."""
    params = body.get("sampling_parameters")
    limit = params.get("max_new_tokens") if isinstance(params, dict) else None
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        limit = DEFAULT_MAX_NEW_TOKENS
    return limit


def request_timeout_s(body: dict[str, Any]) -> float:
    """Upstream v2.19's budget for one miner's answer (also the wait for its first chunk):
    clamp(max(30, 10 * floor(log2(max_new_tokens / 256)) + 30), 60, 300) seconds, or the client's
    `timeout` field clamped the same way."""
    given = body.get("timeout")
    if isinstance(given, int | float) and not isinstance(given, bool) and math.isfinite(given) and given > 0:
        seconds = float(given)
    else:
        seconds = float(max(30, 10 * math.floor(math.log2(token_budget(body) / 256)) + 30))
    return min(max(seconds, MIN_TIMEOUT_S), MAX_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class AnswerBounds:
    """What one miner's answer may hold, derived from the token budget with a generous margin: a
    Subnet 1 miner streams a token per chunk, a chunk with logprobs is well under 4 KiB."""

    max_bytes: int
    max_events: int
    max_event_bytes: int = 64 * 1024
    max_chunk_chars: int | None = 8192  # one chunk's text: a token, or a few; never passed on beyond it

    @classmethod
    def for_request(cls, task: str, body: dict[str, Any]) -> AnswerBounds:
        if task == RETRIEVAL_TASK:  # one chunk holding every result's page text as a JSON list
            return cls(max_bytes=RETRIEVAL_MAX_BYTES, max_events=256, max_event_bytes=RETRIEVAL_MAX_BYTES,
                       max_chunk_chars=None)
        tokens = token_budget(body)
        return cls(max_bytes=min(64 * 1024 + 4096 * tokens, 32 * 1024 * 1024), max_events=2 * tokens + 64)


class MinerFailure(Exception):
    """One miner's answer is unusable; the message says why."""


class ClientCaused(MinerFailure):
    """The miner refused the request for what the client sent (a 4xx): not held against the miner."""


class OverBounds(MinerFailure):
    """The miner's answer went over its bounds (`AnswerBounds`): its connection is closed."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Text of the winner's stream, with the miner's chunk choice it came in (None for text a successor
    supplied at a takeover): only ever read through an allowlist."""

    text: str
    choice: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class End:
    """The winner finished; `finish_reason` as it sent it (None if it only sent [DONE])."""

    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Broken:
    """The winner failed after it had started answering, and no miner could take over."""

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


def content_of(chunk: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None]:
    """The text delta, finish_reason and choice of an OpenAI chat chunk (empty text when there is none)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None, None
    choice = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        delta = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = delta.get("content") if isinstance(delta, dict) else None
    finish = choice.get("finish_reason")
    return (text if isinstance(text, str) else ""), (finish if isinstance(finish, str) else None), choice


def usage_counts(value: Any) -> dict[str, int] | None:
    """A miner's `usage`, kept only when each count is a plausible non-negative integer."""
    if not isinstance(value, dict):
        return None
    counts = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        count = value.get(name)
        if count is None:
            continue
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_USAGE_TOKENS:
            return None
        counts[name] = count
    return counts or None


@dataclass
class FanoutJob:
    request_id: str
    task: str
    body: dict[str, Any]
    miners: list[Neuron]
    mode: Mode
    timeout_s: float
    bounds: AnswerBounds
    started: float = field(default_factory=trio.current_time)
    answers: list[MinerAnswer] = field(default_factory=list)
    winner: int | None = None
    stall_s: float = 1.5
    moves_breakers: bool = True  # False for requests that name their miners
    scoring_only: int = 0  # how many of `miners`, at the end, are asked only for scoring
    finished: trio.Event = field(default_factory=trio.Event)
    first_done: trio.Event = field(default_factory=trio.Event)  # a miner finished well, or the job ended
    answered: bool = False  # the handler has had its last event (the answer is whole, broken or failed)
    handler_left: bool = False  # the handler stopped reading (client gone, timeout, released)
    winner_broken: bool = False
    broken_at: float | None = None  # when the winner broke with no successor ready
    takeovers: int = 0
    released: bool = False  # the handler is done with the job; what remains is collection for scoring
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cut_reason: str | None = None  # why the job was cut short, when it was
    trials: dict[int, int] = field(default_factory=dict)  # miner index -> number of the half-open trial it holds
    _sent: list[str] = field(default_factory=list)  # the text the client has received, in pieces
    _sent_len: int = 0
    _sent_text: str = ""  # "".join(_sent), joined again only when _sent has grown
    _sent_joined: int = 0  # pieces in _sent_text
    _winner_seen_at: float = 0.0  # when the winner last sent a chunk
    _settled: list[bool] = field(default_factory=list)
    _checked: list[tuple[int, int]] = field(default_factory=list)  # per answer: chunks, chars agreeing with _sent
    _diverged: list[bool] = field(default_factory=list)
    _pending: int = 0  # primary miners (not scoring-only) still answering
    _on_release: Callable[[], None] | None = None
    _send: trio.MemorySendChannel[Event] = field(init=False)
    receive: trio.MemoryReceiveChannel[Event] = field(init=False)

    def __post_init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel[Event](JOB_EVENTS)
        primaries = len(self.miners) - self.scoring_only
        self.answers = [MinerAnswer(uid=n.uid, hotkey=n.hotkey, scoring_only=i >= primaries)
                        for i, n in enumerate(self.miners)]
        self._pending = primaries
        self._settled = [False] * len(self.miners)
        self._checked = [(0, 0)] * len(self.miners)
        self._diverged = [False] * len(self.miners)

    @property
    def streaming(self) -> bool:
        """Whether events still go to the handler."""
        return not (self.answered or self.handler_left)

    def sent_text(self) -> str:
        if self._sent_joined != len(self._sent):
            self._sent_text, self._sent_joined = "".join(self._sent), len(self._sent)
        return self._sent_text

    def _send_text(self, text: str) -> None:
        self._sent.append(text)
        self._sent_len += len(text)

    def covers(self, j: int) -> bool:
        """Whether answer j so far begins with everything the client has received. Incremental: each
        of its chunks is compared once (a chunk reaching past the received text again until it is
        passed), so watching a stalled winner costs no more than the text that arrives."""
        if self._diverged[j]:
            return False
        chunks = self.answers[j].chunks
        sent = self.sent_text()
        n, pos = self._checked[j]
        while n < len(chunks) and pos < len(sent):
            piece = chunks[n]
            if pos + len(piece) > len(sent):  # reaches past what was sent: compare the part within
                if not sent.startswith(piece[:len(sent) - pos], pos):
                    self._diverged[j] = True
                    return False
                self._checked[j] = (n, pos)
                return True
            if not sent.startswith(piece, pos):
                self._diverged[j] = True
                return False
            n, pos = n + 1, pos + len(piece)
        self._checked[j] = (n, pos)
        return pos >= len(sent)

    def _rest_of(self, j: int) -> str:
        """What answer j (which covers the received text) says beyond it."""
        n, pos = self._checked[j]
        return "".join(self.answers[j].chunks[n:])[self._sent_len - pos:]

    def _candidate(self, j: int) -> bool:
        answer = self.answers[j]
        return j != self.winner and not answer.scoring_only and answer.error is None

    def successor(self, now: float) -> int | None:
        """A miner that can continue the client's stream: the winner is broken or stalled, and this
        miner's answer so far begins with exactly what the client received (and it has not failed)."""
        if self.winner is None or not self.streaming:
            return None
        if not self.winner_broken and now - self._winner_seen_at < self.stall_s:
            return None
        for j in range(len(self.answers)):
            if self._candidate(j) and self.answers[j].chunks and self.covers(j):
                return j
        return None

    def may_catch_up(self) -> bool:
        """Whether a miner still answering has said nothing yet that differs from what the client has:
        it may yet reach it (the stall watcher waits for that at most `stall_s`)."""
        return any(self._candidate(j) and not self._settled[j] and (self.covers(j) or not self._diverged[j])
                   for j in range(len(self.answers)))

    def release(self) -> None:
        """The handler is done: no more events for it; the miners go on only for scoring."""
        self.receive.close()
        self.handler_left = True
        if not self.released:
            self.released = True
            if self._on_release is not None:
                self._on_release()

    @property
    def winner_answer(self) -> MinerAnswer | None:
        return None if self.winner is None else self.answers[self.winner]

    def errors(self) -> dict[int, str]:
        return {a.uid: a.error or "no answer" for a in self.answers
                if not a.scoring_only and (a.error or not a.chunks)}

    async def _emit(self, event: Event) -> None:
        if not self.streaming:
            return
        if isinstance(event, End | Broken | Failed | Complete):
            self.answered = True
        try:
            await self._send.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.handler_left = True  # the handler left (client disconnect, timeout): keep collecting

    def result(self) -> OrganicResult:
        return OrganicResult(
            request_id=self.request_id, task=self.task, body=self.body, answers=tuple(self.answers),
            created_at=time.time(),
        )


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
    ) -> None:
        self.http = http
        self.signer = signer
        self.miner_health = health
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
        self.miner_failures: dict[str, int] = {"failed": 0, "client_caused": 0, "over_bounds": 0}
        self.gateway_errors = 0  # asks that failed on the gateway's side (not held against the miner)
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
              request_id: str | None = None, timeout_s: float | None = None,
              scoring_only: Sequence[Neuron] = (), moves_breakers: bool = True) -> FanoutJob:
        """Start asking `miners` (and `scoring_only`, whose answers only go to scoring); returns at
        once. Raises `PoolBusy` when the pool cannot take it.

        Admitted, each miner is noted as being asked: a half-open one gets one trial at a time, and
        the job remembers which trials it holds (`trials`), to give back any that ends undecided.
        `moves_breakers=False` (a request naming its miners) leaves every breaker as it is.
        """
        nursery = self._admit()
        job = FanoutJob(
            request_id=request_id or uuid.uuid4().hex, task=task, body=body,
            miners=[*miners, *scoring_only], mode=mode, timeout_s=timeout_s or request_timeout_s(body),
            bounds=AnswerBounds.for_request(task, body), stall_s=self.stall_s,
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
        # "ok" and "failed" are the miner's doing; "neutral" (the client's input, the gateway's own
        # failure, a cancelled request) moves no breaker.
        outcome = "neutral"
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
        except ClientCaused as exc:
            answer.error = str(exc)
            self.miner_failures["client_caused"] += 1
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
            trial, moves = job.trials.get(i), job.moves_breakers
            if outcome == "ok":
                self.miner_health.succeeded(neuron.uid, answer.timings[0] if answer.timings else None, trial, moves=moves)
            elif outcome == "failed":
                self.miner_health.failed(neuron.uid, answer.error or "failed", trial, moves=moves)
            elif trial is not None:
                self.miner_health.released(neuron.uid, trial)
        await self._settle(job, i)

    async def _stream(self, job: FanoutJob, i: int, body_bytes: bytes, headers: dict[str, str]) -> None:
        url = self._urls(f"http://{job.miners[i].axon}/v1/chat/completions")
        answer, bounds = job.answers[i], job.bounds
        async with post_streaming(self.http, url, body_bytes, headers, bounded=True) as response:  # job.timeout_s
            status = response.status_code
            if status != 200:
                raise (ClientCaused if status in CLIENT_CAUSED_STATUSES else MinerFailure)(f"HTTP {status}")
            body = response.aiter_bytes()
            parser = SseData(bounds.max_event_bytes)
            try:
                async for piece in body:
                    answer.received_bytes += len(piece)
                    if answer.received_bytes > bounds.max_bytes:
                        raise OverBounds(f"answer over {bounds.max_bytes} bytes")
                    events = parser.feed(piece)
                    if events and await self._take(job, i, events):
                        break
                else:
                    await self._take(job, i, parser.end())
                    return
            except SseTooLarge as exc:
                raise OverBounds(str(exc)) from None
            # Read on to the end of the body (it follows [DONE] at once), or the connection cannot go
            # back to the pool and the next request to this miner pays for a new one.
            with trio.move_on_after(DRAIN_AFTER_DONE_S):
                async for piece in body:
                    answer.received_bytes += len(piece)
                    if answer.received_bytes > bounds.max_bytes:
                        break

    async def _take(self, job: FanoutJob, i: int, events: list[bytes]) -> bool:
        """The events one read brought (so they arrived at one time); True once [DONE] has come."""
        answer = job.answers[i]
        answer.events += len(events)
        if answer.events > job.bounds.max_events:
            raise OverBounds(f"answer over {job.bounds.max_events} events")
        at = round(trio.current_time() - job.started, 6)
        forward = job.mode == "stream" and not answer.scoring_only
        for data in events:
            if data == DONE:
                answer.completed = True
                return True
            try:
                chunk = jsonio.loads_bounded(data)
            except ValueError:
                raise MinerFailure("sent a chunk that is not valid JSON (or nested too deep)") from None
            if not isinstance(chunk, dict):
                raise MinerFailure("sent a chunk that is not a JSON object")
            text, finish, choice = content_of(chunk)
            if job.bounds.max_chunk_chars is not None and len(text) > job.bounds.max_chunk_chars:
                raise OverBounds(f"sent a chunk of over {job.bounds.max_chunk_chars} characters")
            if "usage" in chunk:
                answer.usage = usage_counts(chunk["usage"]) or answer.usage
            if text:
                answer.chunks.append(text)
                answer.timings.append(at)
                # As received; a chunk sent over several data lines holds newlines: written compactly.
                answer.raw_chunks.append(jsonio.dumps(chunk) if b"\n" in data or b"\r" in data else data)
            if finish is not None:
                answer.finish_reason = finish
            if forward and job.streaming:
                await self._forward(job, i, text, finish, choice)
        return False

    async def _forward(self, job: FanoutJob, i: int, text: str, finish: str | None,
                       choice: dict[str, Any] | None) -> None:
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
            job._send_text(text)
            await job._emit(Chunk(text, choice))
        if finish is not None:
            await job._emit(End(finish))  # the client's answer is whole; the rest is for scoring only

    async def _watch_stalls(self, job: FanoutJob) -> None:
        """A stalled winner is noticed even when no other chunk arrives to prompt the check, and a
        broken winner that nobody can continue ends the stream within `stall_s`."""
        while job.streaming:
            wake = trio.current_time() + job.stall_s / 2
            if job.broken_at is not None:
                wake = min(wake, job.broken_at + job.stall_s)
            await trio.sleep_until(wake)
            now = trio.current_time()
            successor = job.successor(now)
            if successor is not None:
                await self._take_over(job, successor)
            elif job.broken_at is not None and (now - job.broken_at >= job.stall_s or not job.may_catch_up()):
                await self._end_broken(job)

    async def _take_over(self, job: FanoutJob, j: int) -> None:
        """Continue the client's stream from miner j, which has already said what the client has."""
        answer = job.answers[j]
        log.info("request %s: uid %d takes over the stream from uid %d", job.request_id, answer.uid,
                 job.answers[job.winner or 0].uid)
        rest = job._rest_of(j)
        job.winner, job.winner_broken, job.broken_at = j, False, None
        job.takeovers += 1
        job._winner_seen_at = trio.current_time()
        if rest:
            job._send_text(rest)
            await job._emit(Chunk(rest))
        if answer.finish_reason is not None or answer.completed:
            await job._emit(End(answer.finish_reason))

    async def _end_broken(self, job: FanoutJob) -> None:
        await job._emit(Broken(job.answers[job.winner or 0].error or "the answer broke off"))

    async def _settle(self, job: FanoutJob, i: int) -> None:
        """One miner is done: tell the handler what that changes."""
        answer = job.answers[i]
        job._settled[i] = True
        if answer.scoring_only:
            return
        job._pending -= 1
        if not answer.error:
            job.first_done.set()
        if job.mode == "stream":
            if job.winner == i:
                if answer.error:
                    job.winner_broken = True
                else:
                    await job._emit(End(answer.finish_reason))
            if job.winner_broken and job.streaming:
                successor = job.successor(trio.current_time())
                if successor is not None:
                    await self._take_over(job, successor)
                elif not job.may_catch_up():
                    await self._end_broken(job)
                elif job.broken_at is None:
                    job.broken_at = trio.current_time()  # the stall watcher ends it after `stall_s`
        elif job.mode == "complete" and job.winner is None and not answer.error:
            job.winner = i
            await job._emit(Complete(answer))
        if job._pending == 0 and job.winner is None and job.mode != "all":
            await job._emit(Failed(job.errors()))

    async def wait_idle(self) -> None:
        """Wait until no fan-out is running (background collections included)."""
        await self._idle.wait()

    def health(self) -> dict[str, Any]:
        return {"running": self.jobs_running, "serving": self.jobs_serving, "total": self.jobs_total,
                "refused": self.jobs_refused, "collections_cut_short": self.jobs_evicted,
                "unscored": self.results_unscored, "miner_failures": dict(self.miner_failures),
                "gateway_errors": self.gateway_errors}


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
