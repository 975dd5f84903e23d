"""ScoringForwarder: every finished fan-out goes to a validator's `/scoring`, and none is lost.

    fan-out pool --submit_nowait--> bounded channel --> delivery tasks --200--> delivered
                        | full                              | not delivered (or no validator)
                        v                                   v
                 overflow buffer (bounded) --------> spool writer --batches, fsync in a thread--> spool
                                                                                                   |
                 replay task <---- oldest first, once a validator is out of back-off -------------+
                      |--200--> the spool cursor moves past it (durably)

`submit_nowait` never blocks and never raises on overload: when the channel is full the result goes
to the overflow buffer, which the spool writer drains to disk; when even that is full it is dropped
and counted. A payload leaves memory only for a 200, a refusal that no retry can change, or the spool;
on shutdown whatever is still in memory (queued, in the overflow buffer, or in flight) is written to
the spool, and replayed on the next start. Delivery is therefore at least once; see `actors/scoring/spool.py`
for where duplicates can occur.

What a validator's answer means (docs/protocol.md, "The validator's answers"):
- 200: taken (its body is `null`; taken is not scored).
- 401/403: it refuses our hotkey (its `API_HOTKEY` names another). Resending cannot help until its
  operator fixes that: the validator is skipped for `backoff_max_s`, then sent ONE payload as a probe
  per period; the payloads wait in the spool, go to another validator when there is one, and flow
  again once a probe gets its 200. Reported with the fix on `/health/ready` and once a minute in the log.
- Any other 4xx (but 408 and 429, which ask to come back later): that payload can never succeed; it is
  dropped and counted by status (`dropped.http_422`, ...).
- 5xx, no answer within `timeout_s`, connection errors, an answer over 64 KiB: the validator is
  skipped for `backoff_base_s`, doubling per failure up to `backoff_max_s`; after the back-off one
  probe goes first and the others follow its 200.

Which validator: `actors/scoring/validators.py`. A payload a validator could not take is offered to
another one at once, up to three validators.

A failing disk never stops scoring: a spool write that fails keeps its payloads in the overflow buffer
(bounded by `overflow_size`; beyond it new ones are dropped and counted) and is retried with back-off;
a cursor that could not be written after a 200 is written later, and what was delivered is never read
from the spool again.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import trio

from actors.scoring.spool import Position, Spool, SpoolBatch, SpoolError, SpoolFiles
from actors.scoring.validators import LogEvery, Validator, ValidatorPicker
from config.settings import Settings
from wire.epistula import Signer
from wire.http1 import GatewayLimitError
from wire.metagraph import SubnetSnapshot
from wire.organic import OrganicResult
from wire.pool import ParsedUrls, post_streaming
from wire.snapshot import SnapshotCell

log = logging.getLogger("sn1_gateway.scoring")

T = TypeVar("T")

FLUSH_DEADLINE_S = 5.0  # how long the shutdown flush to the spool may take
SPOOL_RETRY_S = 1.0  # wait after a failed spool operation before trying again, doubling
SPOOL_RETRY_MAX_S = 30.0  # ... up to this
ANSWER_LIMIT_BYTES = 64 * 1024  # a validator's answer to /scoring is `null`; more than this is its failure
VALIDATORS_PER_SEND = 3  # a payload one validator could not take is offered to up to this many in all
LATER_STATUSES = frozenset({408, 429})  # 4xx that ask to come back later rather than refuse the payload
GATEWAY_RETRY_S = 1.0  # after the gateway's own failure to send (see `_post`)


class RunSync(Protocol):
    """Runs a blocking call without blocking the event loop: `trio.to_thread.run_sync`."""

    def __call__(self, sync_fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


def encode_payload(result: OrganicResult) -> bytes:
    """The `/scoring` body as the exact bytes that are signed, sent and spooled."""
    return result.encode()


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # a 200
    REJECTED = "rejected"  # a 4xx that no retry can change: dropped, counted
    RETRY = "retry"  # not taken now: keep it


@dataclass(frozen=True, slots=True)
class Pending:
    """An encoded payload not delivered yet, and when it was handed over (unix seconds), for its age."""

    payload: bytes
    created_at: float


async def wait_first(*waits: Callable[[], Awaitable[object]], deadline: float) -> None:
    """Until the first of `waits` returns, or `deadline` (trio time)."""
    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            async def one(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            for wait in waits:
                nursery.start_soon(one, wait)


@dataclass(slots=True)
class Backoff:
    """The wait before retrying a failing disk operation: doubling, reset by a success."""

    base_s: float = SPOOL_RETRY_S
    max_s: float = SPOOL_RETRY_MAX_S
    current_s: float = 0.0

    def next(self) -> float:
        self.current_s = self.base_s if not self.current_s else min(self.current_s * 2, self.max_s)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


@dataclass(slots=True)
class Stored:
    """What one spool write did (computed in the worker thread, counted on the event loop)."""

    written: list[Pending] = field(default_factory=list)  # encoded, and durably stored
    unwritten: list[Pending] = field(default_factory=list)  # encoded, not stored: the disk failed
    error: SpoolError | None = None
    unencodable: int = 0
    too_large: int = 0
    trimmed: int = 0
    expired: int = 0


class ScoringForwarder:
    """The actor. Its channel and buffers live on the object, so they survive a supervisor restart."""

    name = "scoring"

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient,
        signer: Signer,
        subnet: SnapshotCell[SubnetSnapshot],
        rng: random.Random | None = None,
        flush_deadline_s: float = FLUSH_DEADLINE_S,
        run_sync: RunSync = trio.to_thread.run_sync,
        spool_files: SpoolFiles | None = None,
        wall_clock: Callable[[], float] = time.time,
        spool_retry_s: float = SPOOL_RETRY_S,
    ) -> None:
        """`run_sync` runs the spool's file I/O; tests on the autojump clock may run it inline,
        since that clock moves on while a worker thread writes. `spool_files`, `wall_clock` (the
        age of payloads) and `spool_retry_s` (the first wait after a disk failure) are for tests."""
        self.settings = settings.scoring
        self.http = http
        self.signer = signer
        self.subnet = subnet
        self.log_every = LogEvery()
        self.picker = ValidatorPicker(self.settings, subnet, rng or random.Random(), own_hotkey=signer.ss58,
                                      log_every=self.log_every)
        self._urls = ParsedUrls()
        self.wall_clock = wall_clock
        self.spool = Spool(settings.resolve(self.settings.spool_dir), max_bytes=self.settings.spool_max_bytes,
                           max_age_s=self.settings.max_age_s, files=spool_files, clock=wall_clock)
        self.flush_deadline_s = flush_deadline_s
        self._run_sync = run_sync
        # The original ends are never closed: each delivery task receives on its own clone.
        self._send, self._receive = trio.open_memory_channel[tuple[OrganicResult, float]](self.settings.queue_size)
        self._overflow: deque[tuple[OrganicResult, float] | Pending] = deque()  # waiting for the spool writer
        self._writing: list[tuple[OrganicResult, float] | Pending] = []  # taken by the writer, not on disk yet
        self._overflow_added = trio.Event()  # wakes the spool writer
        self._overflow_room = trio.Event()  # wakes delivery tasks waiting for room in the buffer
        self._spooled = trio.Event()  # set when the spool writer stored something
        self._inflight: dict[int, Pending] = {}  # delivery attempts whose outcome is not known yet
        self._next_inflight = 0
        self._pending_commit: tuple[Position, list[Pending]] | None = None  # a replay commit the disk refused
        self._write_backoff = Backoff(spool_retry_s)
        self._replay_backoff = Backoff(spool_retry_s)
        self._spool_retry_at: float | None = None  # trio time of the next retry of a failed spool write
        self._stopped = False  # set once the shutdown flush is done
        self._problem_logged: str | None = None
        # Counters.
        self.submitted = 0
        self.trimmed = 0  # payloads over max_payload_bytes sent with their largest answers cut short
        self.gateway_errors = 0  # deliveries the gateway itself could not make (out of open files)
        self.delivered = 0
        self.replayed = 0  # of `delivered`, those that came from the spool
        self.attempts_failed = 0
        self.no_validator = 0
        self.spool_errors = 0
        self.ignored = {"disabled": 0, "not_scored": 0, "no_miners": 0}
        self.dropped: dict[str, int] = {"overflow": 0, "unencodable": 0, "too_large": 0, "expired": 0,
                                        "flush_timeout": 0, "flush_failed": 0, "stopped": 0}
        self.last_spool_error: str | None = None

    # -- the interface the fan-out pool calls ---------------------------------------------------

    def submit_nowait(self, result: OrganicResult) -> None:
        """Hand over a finished fan-out. Never blocks, never raises on overload; every outcome is counted."""
        if not self.settings.enabled:
            self.ignored["disabled"] += 1
            return
        if not result.scored:
            self.ignored["not_scored"] += 1
            return
        if not result.answers:
            self.ignored["no_miners"] += 1
            return
        if self._stopped:
            self.dropped["stopped"] += 1
            return
        self.submitted += 1
        item = (result, self.wall_clock())
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            if self._held() >= self.settings.overflow_size:
                self.dropped["overflow"] += 1
                return
            self._overflow.append(item)
            self._overflow_added.set()

    def _held(self) -> int:
        """Payloads waiting in memory for the spool (the bound of the overflow buffer)."""
        return len(self._overflow) + len(self._writing)

    def warnings(self) -> list[str]:
        """What an operator must know and probably fix, in plain words (also on `/health/ready`)."""
        if not self.settings.enabled:
            return []
        found: list[str] = []
        self.picker.candidates()  # brings `problem` up to date with the metagraph
        if self.picker.problem:
            found.append(f"no validator is eligible for scoring: {self.picker.problem}; payloads wait in "
                         f"the spool until one is")
        for hotkey in self.picker.refusing():
            hint = self.picker.hint(hotkey)
            if hint is not None:
                found.append(hint)
        spool_error = self.last_spool_error or (self.spool.last_error if self.spool.failing else None)
        if spool_error is None and self.spool.needs_sync:
            spool_error = f"{self.spool.last_error}; until the cursor is written, a restart sends the last " \
                          f"delivered payloads again"
        if spool_error is not None:
            found.append(f"the scoring spool in {self.spool.directory} is failing ({spool_error}); "
                         f"{self._held()} payloads are held in memory (at most {self.settings.overflow_size}, "
                         f"then new ones are dropped) and the write is retried")
        return found

    def health(self) -> dict[str, Any]:
        channel = self._send.statistics()
        now = trio.current_time()
        warnings = self.warnings()
        spool = self.spool.statistics()
        return {
            "enabled": self.settings.enabled,
            "warnings": warnings,
            "warning_count": len(warnings),
            "submitted": self.submitted,
            "trimmed": self.trimmed,
            "gateway_errors": self.gateway_errors,
            "queued": channel.current_buffer_used,
            "queue_size": channel.max_buffer_size,
            "overflow": len(self._overflow),
            "writing": len(self._writing),
            "in_flight": len(self._inflight),
            "delivered": self.delivered,
            "replayed": self.replayed,
            "spooled": self.spool.appended,
            "attempts_failed": self.attempts_failed,
            "no_validator": self.no_validator,
            "validators_refusing_signer": len(self.picker.refusing()),
            "ignored": dict(self.ignored),
            "dropped": {
                **self.dropped,
                "too_large": self.dropped["too_large"] + self.spool.dropped_too_large,
                "expired": self.dropped["expired"] + self.spool.expired,
                "spool_full": self.spool.dropped_full,
                "corrupt": self.spool.corrupt,
            },
            "spool": {
                **spool,
                "failing": spool["failing"] or self.last_spool_error is not None,
                "errors": self.spool_errors,
                "last_error": self.last_spool_error,
                "retry_in_s": (round(max(0.0, self._spool_retry_at - now), 3)
                               if self._spool_retry_at is not None else None),
            },
            "validators": self.picker.report(now),
            "validator_problem": self.picker.problem,
        }

    # -- the actor -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[ScoringForwarder] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.settings.enabled:
            task_status.started(self)
            await trio.sleep_forever()
        await self._run_sync(self.spool.open)
        self._stopped = False
        if self.spool.pending:
            log.info("scoring spool holds %d undelivered payloads; replaying them", self.spool.pending)
        self._log_validator_problem()
        stopping = True
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.settings.concurrency):
                    nursery.start_soon(self._deliver_live, self._receive.clone())
                nursery.start_soon(self._write_spool)
                nursery.start_soon(self._replay)
                nursery.start_soon(self._watch_validators)
                nursery.start_soon(self._remind)
                task_status.started(self)
        except Exception:
            stopping = False  # a crash: the supervisor restarts this actor, so keep taking results
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._flush_to_spool(final=stopping)

    def _log_validator_problem(self) -> None:
        self.picker.candidates()
        problem = self.picker.problem
        if problem != self._problem_logged:
            if problem is not None:
                log.warning("scoring: no validator is eligible for scoring: %s; payloads wait in the spool",
                            problem)
            elif self._problem_logged is not None:
                log.info("scoring: a validator is eligible again")
            self._problem_logged = problem

    async def _watch_validators(self) -> None:
        """Logs when the metagraph leaves no validator to score with (and when it has one again)."""
        while True:
            await self.subnet.wait_newer(self.subnet.version)
            self._log_validator_problem()

    async def _remind(self) -> None:
        """Once a minute, what still needs the operator (each problem at most once a minute)."""
        while True:
            await trio.sleep(self.log_every.period_s)
            now = trio.current_time()
            for hotkey in self.picker.refusing():
                hint = self.picker.hint(hotkey)
                if hint is not None and self.log_every.due(("refused", hotkey), now):
                    log.warning("scoring: %s; its payloads wait in the spool", hint)
            if self.last_spool_error is not None and self.log_every.due("spool", now):
                log.error("scoring: the spool is still failing (%s); %d payloads held in memory",
                          self.last_spool_error, self._held())

    async def _flush_to_spool(self, *, final: bool) -> None:
        """Write everything still in memory to the spool, within `flush_deadline_s`.

        Collects again after each write: fan-outs cancelled by the same shutdown may still hand over
        their results meanwhile. A write that has started is not abandoned (the payloads are out of
        memory already); the deadline stops further rounds, and what is left then is counted as dropped.
        """
        total = 0
        unwritten: list[tuple[OrganicResult, float] | Pending] = []
        with trio.move_on_after(self.flush_deadline_s):
            if self._pending_commit is not None and (error := await self._finish_commit()) is not None:
                log.error("scoring: the spool cursor cannot be written at shutdown (%s); the last replayed "
                          "payloads will be sent again after the restart", error)
            while unwritten := self._take_all_in_memory():
                stored = await self._run_sync(self._store, unwritten)
                self._count_stored(stored)
                total += len(stored.written)
                if stored.error is not None:
                    self.dropped["flush_failed"] += len(stored.unwritten)
                    log.error("scoring: cannot write %d payloads to the spool at shutdown (%s); lost",
                              len(stored.unwritten), stored.error)
                    unwritten = []
                    break
        self._stopped = final
        if unwritten:
            self.dropped["flush_timeout"] += len(unwritten)
            log.error("scoring: %d payloads not written to the spool within %.0fs; lost",
                      len(unwritten), self.flush_deadline_s)
        if total:
            log.info("scoring: %d payloads written to the spool for the next start", total)
        self.spool.close()  # closing a file: no fsync, nothing to wait for

    def _take_all_in_memory(self) -> list[tuple[OrganicResult, float] | Pending]:
        items: list[tuple[OrganicResult, float] | Pending] = [*self._writing, *self._inflight.values(),
                                                              *self._overflow]
        self._writing = []
        self._inflight.clear()
        self._overflow.clear()
        while True:
            try:
                items.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return items

    # -- encoding ------------------------------------------------------------------------------

    def _encode(self, item: tuple[OrganicResult, float] | Pending, now: float, stored: Stored) -> Pending | None:
        """The payload to send or spool, or None when it is dropped (counted in `stored`)."""
        if isinstance(item, Pending):
            pending = item
        else:
            result, created_at = item
            try:
                pending = Pending(encode_payload(result), created_at)
            except (TypeError, ValueError) as exc:
                stored.unencodable += 1
                log.error("scoring: request %s cannot be encoded (%s); dropped", result.request_id, exc)
                return None
            if len(pending.payload) > self.settings.max_payload_bytes:
                fitted = result.trimmed(self.settings.max_payload_bytes)
                if fitted is None:
                    stored.too_large += 1
                    log.error("scoring: the payload of request %s is %d bytes, over scoring.max_payload_bytes "
                              "(%d); dropped", result.request_id, len(pending.payload),
                              self.settings.max_payload_bytes)
                    return None
                stored.trimmed += 1
                log.warning("scoring: the payload of request %s was %d bytes, over scoring.max_payload_bytes; "
                            "its largest answers were cut short to fit", result.request_id, len(pending.payload))
                pending = Pending(fitted[1], created_at)
        if pending.created_at < now - self.settings.max_age_s:
            stored.expired += 1
            return None
        return pending

    def _store(self, items: Sequence[tuple[OrganicResult, float] | Pending]) -> Stored:
        """Encode (in this worker thread) and append durably; what was stored and what was not."""
        stored = Stored()
        now = self.wall_clock()
        encoded = [p for item in items if (p := self._encode(item, now, stored)) is not None]
        try:
            self.spool.append([p.payload for p in encoded], [p.created_at for p in encoded])
        except SpoolError as exc:
            stored.error = exc
            stored.written, stored.unwritten = encoded[:exc.done], encoded[exc.done:]
        else:
            stored.written = encoded
        return stored

    def _count_stored(self, stored: Stored) -> None:
        self.dropped["unencodable"] += stored.unencodable
        self.dropped["too_large"] += stored.too_large
        self.trimmed += stored.trimmed
        self.dropped["expired"] += stored.expired

    # -- live delivery -------------------------------------------------------------------------

    async def _deliver_live(self, receive: trio.MemoryReceiveChannel[tuple[OrganicResult, float]]) -> None:
        async with receive:
            async for item in receive:
                counts = Stored()
                pending = self._encode(item, self.wall_clock(), counts)
                self._count_stored(counts)
                if pending is None:
                    continue
                key = self._next_inflight
                self._next_inflight += 1
                self._inflight[key] = pending
                # The fan-out that produced this result has just woken its request's handler too: let
                # the client's answer go out before the signing and sending below.
                await trio.lowlevel.checkpoint()
                if await self._send_payload(pending.payload) is not Outcome.RETRY:
                    del self._inflight[key]
                    continue
                await self._park(key, pending)

    async def _park(self, key: int, pending: Pending) -> None:
        """Move a payload that was not taken to the overflow buffer, for the spool. While the buffer is
        full (the spool is failing), offer it again whenever a validator may take it."""
        while self._held() >= self.settings.overflow_size:
            now = trio.current_time()
            if self.picker.available(now):
                if await self._send_payload(pending.payload) is not Outcome.RETRY:
                    del self._inflight[key]
                    return
                continue
            retry_at = self.picker.next_retry_at(now)
            await wait_first(self._overflow_room.wait, self.picker.changed.wait,
                             newer_metagraph(self.subnet),
                             deadline=retry_at if retry_at is not None else now + self.settings.backoff_max_s)
        # No checkpoint between these two: the payload is always in one place or the other.
        self._overflow.append(pending)
        del self._inflight[key]
        self._overflow_added.set()

    async def _send_payload(self, body: bytes) -> Outcome:
        """Offer a payload to validators not in back-off, a different one after each failure."""
        tried: list[str] = []
        while len(tried) < VALIDATORS_PER_SEND:
            validator = self.picker.choose(trio.current_time(), exclude=tried)
            if validator is None:
                break
            tried.append(validator.hotkey)
            try:
                outcome = await self._post(validator, body)
            finally:
                self.picker.release(validator)
            if outcome is Outcome.DELIVERED:
                self.delivered += 1
            if outcome is not Outcome.RETRY:
                return outcome
        if not tried:
            self.no_validator += 1
        return Outcome.RETRY

    async def _post(self, validator: Validator, body: bytes) -> Outcome:
        headers = self.signer.headers(body, validator.hotkey)
        headers["Content-Type"] = "application/json"
        url = self._urls(f"http://{validator.axon}/scoring")
        reason: str | None = None
        status = 0
        answer = b""
        try:
            with trio.fail_after(self.settings.timeout_s):
                async with post_streaming(self.http, url, body, headers, bounded=True) as response:
                    status = response.status_code
                    answer = await response.aread(max_bytes=ANSWER_LIMIT_BYTES)
        except trio.TooSlowError:
            reason = f"no answer within {self.settings.timeout_s:g}s"
        except GatewayLimitError as exc:
            # The gateway's own resources ran out (open files): nothing the validator did. No back-off
            # for it; a pause before this task tries again, so that a lasting shortage cannot spin.
            self.gateway_errors += 1
            self.picker.release(validator)
            if self.log_every.due("gateway", trio.current_time()):
                log.error("scoring: cannot reach validator %s at %s: %s", validator.hotkey, validator.axon, exc)
            await trio.sleep(GATEWAY_RETRY_S)
            return Outcome.RETRY
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        now = trio.current_time()
        if reason is None and status == 200:
            self.picker.succeeded(validator)
            return Outcome.DELIVERED
        if reason is None and status in (401, 403):
            self.attempts_failed += 1
            self.picker.refused(validator, status, now)
            return Outcome.RETRY
        if reason is None and 400 <= status < 500 and status not in LATER_STATUSES:
            name = f"http_{status}"
            self.dropped[name] = self.dropped.get(name, 0) + 1
            self.picker.rejected(validator, status)
            if self.log_every.due(("rejected", status), now):
                log.error("scoring: validator %s at %s refused a payload with HTTP %d (%s); such payloads "
                          "are dropped (counted in dropped.%s)", validator.hotkey, validator.axon, status,
                          answer[:200].decode("utf-8", "replace"), name)
            return Outcome.REJECTED
        self.attempts_failed += 1
        self.picker.failed(validator, reason or f"HTTP {status}", now)
        return Outcome.RETRY

    # -- the spool -----------------------------------------------------------------------------

    def _spool_failed(self, exc: SpoolError, now: float, delay: float) -> None:
        self.spool_errors += 1
        self.last_spool_error = str(exc)
        self._spool_retry_at = now + delay
        if self.log_every.due("spool", now):
            log.error("scoring: the spool is failing (%s); %d payloads held in memory; retrying %s",
                      exc, self._held(), f"in {delay:.0f}s" if delay else "with the next write")

    def _spool_recovered(self) -> None:
        if self.last_spool_error is not None:
            log.warning("scoring: the spool works again")
        self.last_spool_error = None
        self._spool_retry_at = None

    async def _write_spool(self) -> None:
        """Drain the overflow buffer to disk in batches, one fsync per batch, in a worker thread."""
        while True:
            while not self._overflow:
                self._overflow_added = trio.Event()
                await self._overflow_added.wait()
            count = min(len(self._overflow), self.settings.spool_batch)
            batch = [self._overflow.popleft() for _ in range(count)]
            # Until the write returns, the shutdown flush finds the batch here (the thread call can be
            # cancelled before it starts; once started it is not abandoned).
            self._writing = batch
            stored = await self._run_sync(self._store, batch)
            self._writing = []
            self._count_stored(stored)
            if stored.error is not None:
                # The payloads not written go back to the front, in order; the buffer's bound holds,
                # since they were counted in it while being written.
                self._overflow.extendleft(reversed(stored.unwritten))
                delay = self._write_backoff.next()
                self._spool_failed(stored.error, trio.current_time(), delay)
                self._wake_room()
                await trio.sleep(delay)
                continue
            self._write_backoff.reset()
            self._spool_recovered()
            self._wake_room()
            spooled, self._spooled = self._spooled, trio.Event()
            spooled.set()

    def _wake_room(self) -> None:
        room, self._overflow_room = self._overflow_room, trio.Event()
        room.set()

    async def _replay(self) -> None:
        """Deliver spooled payloads, oldest first, whenever a validator is out of back-off."""
        while True:
            # A batch whose commit the disk refused comes first: until its cursor moves, reading
            # would send what was taken again.
            if self._pending_commit is not None and (error := await self._finish_commit()) is not None:
                await self._replay_wait(error)
                continue
            if self.spool.pending == 0:
                if not self.spool.needs_sync:
                    await self._spooled.wait()
                elif (error := await self._finish_commit()) is not None:
                    delay = self._replay_backoff.next()
                    self._spool_failed(error, trio.current_time(), delay)
                    await wait_first(self._spooled.wait, deadline=trio.current_time() + delay)
                continue
            now = trio.current_time()
            if not self.picker.available(now):
                retry_at = self.picker.next_retry_at(now)
                await wait_first(self.picker.changed.wait, newer_metagraph(self.subnet),
                                 deadline=retry_at if retry_at is not None else now + self.settings.backoff_max_s)
                continue
            # After a back-off, one payload probes; a batch follows its 200.
            limit = self.settings.concurrency if self.picker.healthy() else 1
            start = self.spool.cursor
            try:
                batch = await self._run_sync(self.spool.read, limit)
            except SpoolError as exc:
                await self._replay_wait(exc)
                continue
            if (error := await self._replay_batch(batch)) is not None:
                if self._pending_commit is not None:
                    await self._replay_wait(error)
                    continue
                # The cursor moved (in memory) and only its write failed: go on, the next commit
                # writes it again.
                self._spool_failed(error, trio.current_time(), 0.0)
            if not batch.records and batch.end == start:  # nothing readable: do not spin
                log.error("scoring: %d spooled payloads cannot be read; waiting for new ones", self.spool.pending)
                await self._spooled.wait()

    async def _replay_wait(self, error: SpoolError) -> None:
        delay = self._replay_backoff.next()
        self._spool_failed(error, trio.current_time(), delay)
        await trio.sleep(delay)

    async def _replay_batch(self, batch: SpoolBatch) -> SpoolError | None:
        outcomes = [Outcome.RETRY] * len(batch.records)

        async def replay_one(i: int) -> None:
            outcomes[i] = await self._send_payload(batch.records[i].payload)
            if outcomes[i] is Outcome.DELIVERED:
                self.replayed += 1

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(batch.records)):
                    nursery.start_soon(replay_one, i)
        finally:
            # Whatever was not taken (failed, or cut short by shutdown) goes back to the tail,
            # in the same call that moves the cursor past the batch.
            again = [Pending(r.payload, r.created_at)
                     for r, outcome in zip(batch.records, outcomes, strict=True) if outcome is Outcome.RETRY]
            self._pending_commit = (batch.end, again)
            with trio.CancelScope(shield=True):
                error = await self._finish_commit()
        return error

    async def _finish_commit(self) -> SpoolError | None:
        """Move the spool's cursor past the last replayed batch (or write what a failure left unwritten).
        When the disk refuses, what is left stays in `_pending_commit` (nothing replayed is read again)."""
        pending = self._pending_commit
        try:
            if pending is not None:
                through, again = pending
                await self._run_sync(self.spool.commit, through, [p.payload for p in again],
                                     [p.created_at for p in again])
            elif self.spool.needs_sync:
                await self._run_sync(self.spool.sync)
        except SpoolError as exc:
            if pending is not None:
                self._pending_commit = None if exc.committed else (pending[0], pending[1][exc.done:])
            return exc
        self._pending_commit = None
        if not self.spool.failing and not self._write_backoff.current_s:
            self._spool_recovered()
        self._replay_backoff.reset()
        return None


def newer_metagraph(subnet: SnapshotCell[SubnetSnapshot]) -> Callable[[], Awaitable[object]]:
    """A wait for the next metagraph after the one published now."""
    version = subnet.version

    async def wait() -> object:
        return await subnet.wait_newer(version)

    return wait
