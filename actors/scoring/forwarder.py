"""ScoringForwarder: every finished fan-out goes to a validator's `/scoring`, and none is lost.

    fan-out pool --submit_nowait--> bounded channel --> delivery tasks --200--> delivered
                        | full, or over half            | not delivered (or no validator)
                        | of memory_max_bytes           v
                        v
                 overflow buffer (bounded) --------> spool writer --batches, fsync in a thread--> spool
                        |                                                                          |
                 replay task <---- held in memory, and spooled ones, when a validator may take them -+
                      |--200--> gone from memory, or the spool cursor moves past it (durably)

`submit_nowait` never blocks and never raises on overload. Memory is bounded in bytes,
`memory_max_bytes`, over everything held: the channel, the overflow buffer, deliveries in flight, the
batch being written (an organic weighs what it holds: its raw chunks and their text). Payloads are
delivered from memory while that takes at most half the bound (`_delivering_max`); beyond it, or when
the channel is full, they go to the overflow buffer, which the spool writer drains to disk at once;
beyond the whole bound (the disk fails, or cannot keep up) they are dropped and counted
(`dropped.memory`), as they are past `overflow_size` (`dropped.overflow`). A payload leaves memory only
for a 200, a refusal that no retry can change, or the spool; on shutdown whatever is still in memory
(queued, in the overflow buffer, or in flight) is written to the spool, in batches, within the flush's
budget (bounded, since memory is), and replayed on the next start. Delivery is therefore at least once;
see `actors/scoring/spool.py` for where duplicates can occur.

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
and is retried with back-off, and the replay task offers them to validators from there (each batch
shares its room between them and spooled payloads, so neither source holds up the other). A replayed
payload that was not taken and cannot be appended to the spool again is kept in memory too, and the
replay goes on past it; a cursor that could not be written after a 200 is written later, and what was
delivered is never read from the spool again. A failed probe leaves the spool as it was (nothing is
appended once more per back-off period); the next probe takes the next payload, so that one a validator
keeps failing holds up no other.
"""

from __future__ import annotations

import enum
import logging
import math
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
CHUNK_OVERHEAD_BYTES = 100  # what a chunk holds beyond its text and raw bytes: the objects, their list slots


class RunSync(Protocol):
    """Runs a blocking call without blocking the event loop: `trio.to_thread.run_sync`."""

    def __call__(self, sync_fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # a 200
    REJECTED = "rejected"  # a 4xx that no retry can change: dropped, counted
    RETRY = "retry"  # not taken now: keep it


@dataclass(frozen=True, slots=True)
class Pending:
    """An encoded payload not delivered yet, and when it was handed over (unix seconds), for its age."""

    payload: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class Organic:
    """A result as handed over, not encoded yet, with what it weighs in memory (`organic_weight`)."""

    result: OrganicResult
    created_at: float
    weight: int


Item = Organic | Pending


def organic_weight(result: OrganicResult) -> int:
    """The memory a result holds, estimated without copying: each answer's raw chunks (the bytes it
    received, which hold them, or their lengths when it counted none), their text, and the objects
    around every chunk. A miner decides how large this is, so it is what memory counts. (About 0.1 ms
    for 5 answers of 1,024 chunks, a tenth of encoding them.)"""
    return sum((a.received_bytes or sum(map(len, a.raw_chunks))) + sum(map(len, a.chunks))
               + CHUNK_OVERHEAD_BYTES * len(a.chunks) for a in result.answers)


def weight_of(item: Item) -> int:
    return item.weight if isinstance(item, Organic) else len(item.payload)


def batch_length(items: Sequence[Item], max_count: int, max_bytes: int) -> int:
    """How many items from the front make one batch: at most `max_count` and `max_bytes` (but one
    at least, whatever it weighs)."""
    count = size = 0
    for item in items:
        size += weight_of(item)
        if count and (count >= max_count or size > max_bytes):
            break
        count += 1
    return count


class Held:
    """Payloads in memory, oldest first, and the bytes they weigh."""

    __slots__ = ("bytes", "items")

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def append(self, item: Item) -> None:
        self.items.append(item)
        self.bytes += weight_of(item)

    def extendleft(self, items: Sequence[Item]) -> None:
        """Put `items` back at the front, in their order."""
        for item in reversed(items):
            self.items.appendleft(item)
            self.bytes += weight_of(item)

    def first(self) -> Item:
        return self.items[0]

    def popleft(self) -> Item:
        item = self.items.popleft()
        self.bytes -= weight_of(item)
        return item

    def take(self, count: int) -> list[Item]:
        return [self.popleft() for _ in range(count)]

    def take_all(self) -> list[Item]:
        items = list(self.items)
        self.items.clear()
        self.bytes = 0
        return items


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

    written: int = 0  # encoded, and durably stored
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
        self.memory_max_bytes = self.settings.memory_max_bytes
        self._delivering_max = self.memory_max_bytes // 2  # delivered from memory; past it, to the spool
        self._batch_max_bytes = max(1, self.memory_max_bytes // 4)  # one spool write, one replay batch
        # The original ends are never closed: each delivery task receives on its own clone.
        self._send, self._receive = trio.open_memory_channel[Organic](self.settings.queue_size)
        self._queued_bytes = 0  # of what is in the channel (or handed to a delivery task, not taken yet)
        self._overflow = Held()  # waiting for the spool writer, or for the replay to offer it to a validator
        self._writing: list[Item] = []  # taken by the writer, not on disk yet
        self._writing_bytes = 0
        self._overflow_added = trio.Event()  # wakes the spool writer
        self._overflow_room = trio.Event()  # wakes delivery tasks waiting for room in the buffer
        self._spooled = trio.Event()  # set when the spool writer stored something
        self._memory_added = trio.Event()  # set when payloads come into the overflow buffer (for the replay)
        self._inflight: dict[int, Pending] = {}  # delivery attempts (from the channel or the buffer) not over
        self._inflight_bytes = 0
        self._replaying_bytes = 0  # spooled payloads read for a delivery under way
        self._resending = 0  # payloads the replay took from the overflow buffer, in flight
        self._next_inflight = 0
        self._write_backoff = Backoff(spool_retry_s)
        self._replay_backoff = Backoff(spool_retry_s)
        self._read_backoff = Backoff(spool_retry_s)
        self._read_retry_at: float | None = None  # trio time before which the spool is not read again
        self._probe_from_memory = False  # a probe alternates between the buffer and the spool
        self._probe_depth = 0  # which spooled record the next probe takes: one further after each failure
        self._spool_retry_at: float | None = None  # trio time of the next retry of a failed spool write
        self._stopped = False  # set once the shutdown flush is done
        self._problem_logged: str | None = None
        # Counters.
        self.submitted = 0
        self.trimmed = 0  # payloads over max_payload_bytes sent with their largest answers cut short
        self.gateway_errors = 0  # deliveries the gateway itself could not make (out of open files)
        self.delivered = 0
        self.replayed = 0  # of `delivered`, those that came from the spool
        self.resent_from_memory = 0  # of `delivered`, those that waited in the overflow buffer
        self.attempts_failed = 0
        self.no_validator = 0
        self.spool_errors = 0
        self.requeues_kept = 0  # replayed payloads the disk refused to take back, kept in memory instead
        self.ignored = {"disabled": 0, "not_scored": 0, "no_miners": 0}
        self.dropped: dict[str, int] = {"overflow": 0, "memory": 0, "unencodable": 0, "too_large": 0,
                                        "expired": 0, "flush_timeout": 0, "flush_failed": 0, "stopped": 0}
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
        weight = organic_weight(result)
        if self.memory_bytes() + weight > self.memory_max_bytes:
            self.dropped["memory"] += 1
            if self.log_every.due("memory", trio.current_time()):
                log.error("scoring: %d bytes held in memory, and a payload of %d more would pass "
                          "scoring.memory_max_bytes (%d): dropped (counted in dropped.memory); the spool %s",
                          self.memory_bytes(), weight, self.memory_max_bytes,
                          "is failing" if self._spool_failing() else "cannot keep up")
            return
        item = Organic(result, self.wall_clock(), weight)
        if self._delivering_bytes() + weight <= self._delivering_max:
            try:
                self._send.send_nowait(item)
            except trio.WouldBlock:
                pass
            else:
                self._queued_bytes += weight
                return
        if self._held() >= self.settings.overflow_size:
            self.dropped["overflow"] += 1
            return
        self._to_overflow(item)

    def _held(self) -> int:
        """Payloads waiting in memory for the spool (the count bound of the overflow buffer), those the
        replay took from it for a delivery under way included."""
        return len(self._overflow) + len(self._writing) + self._resending

    def memory_bytes(self) -> int:
        """What scoring holds in memory now: the bound `memory_max_bytes` is over this."""
        return (self._queued_bytes + self._inflight_bytes + self._replaying_bytes + self._overflow.bytes
                + self._writing_bytes)

    def _delivering_bytes(self) -> int:
        """Of `memory_bytes`, what is queued for delivery or being delivered."""
        return self._queued_bytes + self._inflight_bytes + self._replaying_bytes

    def _spool_failing(self) -> bool:
        return self.last_spool_error is not None or self.spool.failing

    def _to_overflow(self, item: Item) -> None:
        self._overflow.append(item)
        self._overflow_added.set()
        self._wake_replay()

    def _wake_replay(self) -> None:
        """Payloads came into the overflow buffer: the replay may offer them to a validator."""
        added, self._memory_added = self._memory_added, trio.Event()
        added.set()

    def _add_inflight(self, pending: Pending) -> int:
        key = self._next_inflight
        self._next_inflight += 1
        self._inflight[key] = pending
        self._inflight_bytes += len(pending.payload)
        return key

    def _remove_inflight(self, key: int) -> None:
        pending = self._inflight.pop(key)
        self._inflight_bytes -= len(pending.payload)

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
                         f"{self._held()} payloads ({self.memory_bytes() / 2**20:.1f} MiB in all) are held in "
                         f"memory and offered to validators from there (at most {self.settings.overflow_size} "
                         f"payloads and scoring.memory_max_bytes = {self.memory_max_bytes / 2**20:.0f} MiB, "
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
            "memory_bytes": self.memory_bytes(),
            "memory_max_bytes": self.memory_max_bytes,
            "delivered": self.delivered,
            "replayed": self.replayed,
            "resent_from_memory": self.resent_from_memory,
            "spooled": self.spool.appended,
            "requeues_kept": self.requeues_kept,
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
        self._read_retry_at = None
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
                log.error("scoring: the spool is still failing (%s); %d payloads (%d bytes) held in memory",
                          self.last_spool_error, self._held(), self.memory_bytes())

    async def _flush_to_spool(self, *, final: bool) -> None:
        """Write everything still in memory to the spool, within `flush_deadline_s`.

        Collects again after each round: fan-outs cancelled by the same shutdown may still hand over
        their results meanwhile. Writes go in batches of at most a quarter of `memory_max_bytes`, so
        the deadline is looked at between them; a write that has started is not abandoned (the
        payloads are out of memory already). What is left at the deadline is counted as dropped.
        """
        total = 0
        left: list[Item] = []
        failed = False
        with trio.move_on_after(self.flush_deadline_s):
            if self.spool.needs_sync and (error := await self._sync_spool()) is not None:
                log.error("scoring: the spool cursor cannot be written at shutdown (%s); the last replayed "
                          "payloads will be sent again after the restart", error)
            while not failed and (left := self._take_all_in_memory()):
                while left:
                    count = batch_length(left, len(left), self._batch_max_bytes)
                    stored = await self._run_sync(self._store, left[:count])
                    del left[:count]  # only now: a write cancelled before it started leaves them here
                    self._count_stored(stored)
                    total += stored.written
                    if stored.error is not None:
                        lost = len(stored.unwritten) + len(left) + len(self._take_all_in_memory())
                        self.dropped["flush_failed"] += lost
                        log.error("scoring: cannot write %d payloads to the spool at shutdown (%s); lost",
                                  lost, stored.error)
                        left, failed = [], True
                        break
        self._stopped = final
        left += self._take_all_in_memory()
        if left:
            self.dropped["flush_timeout"] += len(left)
            log.error("scoring: %d payloads not written to the spool within %.1fs; lost",
                      len(left), self.flush_deadline_s)
        if total:
            log.info("scoring: %d payloads written to the spool for the next start", total)
        await self._run_sync(self.spool.close)  # it takes the spool's lock and may cut a torn tail: off the loop

    def _take_all_in_memory(self) -> list[Item]:
        items: list[Item] = [*self._writing, *self._inflight.values(), *self._overflow.take_all()]
        self._writing = []
        self._writing_bytes = 0
        self._inflight.clear()
        self._inflight_bytes = 0
        self._resending = 0  # (those the replay had, cut short by the stop, were in `_inflight`)
        while True:
            try:
                items.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                self._queued_bytes = 0
                return items

    # -- encoding ------------------------------------------------------------------------------

    def _encode(self, item: Item, now: float, stored: Stored) -> Pending | None:
        """The payload to send or spool, or None when it is dropped (counted in `stored`)."""
        if isinstance(item, Pending):
            pending = item
        else:
            result, created_at = item.result, item.created_at
            try:
                pending = Pending(result.encode(), created_at)  # the bytes signed, sent and spooled
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

    def _encoded(self, item: Item) -> Pending | None:
        """`_encode` on the event loop, counted at once."""
        counts = Stored()
        pending = self._encode(item, self.wall_clock(), counts)
        self._count_stored(counts)
        return pending

    def _store(self, items: Sequence[Item]) -> Stored:
        """Encode (in this worker thread) and append durably; what was stored and what was not."""
        stored = Stored()
        now = self.wall_clock()
        encoded = [p for item in items if (p := self._encode(item, now, stored)) is not None]
        try:
            self.spool.append([p.payload for p in encoded], [p.created_at for p in encoded])
        except SpoolError as exc:
            stored.error = exc
            stored.written, stored.unwritten = exc.done, encoded[exc.done:]
        else:
            stored.written = len(encoded)
        return stored

    def _count_stored(self, stored: Stored) -> None:
        self.dropped["unencodable"] += stored.unencodable
        self.dropped["too_large"] += stored.too_large
        self.trimmed += stored.trimmed
        self.dropped["expired"] += stored.expired

    # -- live delivery -------------------------------------------------------------------------

    async def _deliver_live(self, receive: trio.MemoryReceiveChannel[Organic]) -> None:
        async with receive:
            while True:
                try:
                    item = await receive.receive()
                except trio.EndOfChannel:
                    return
                self._queued_bytes -= item.weight
                pending = self._encoded(item)
                del item  # from here on only the payload is held, not the result's chunks
                if pending is not None:
                    await self._deliver(pending)
                    del pending

    async def _deliver(self, pending: Pending) -> None:
        key = self._add_inflight(pending)
        # The fan-out that produced this result has just woken its request's handler too: let
        # the client's answer go out before the signing and sending below.
        await trio.lowlevel.checkpoint()
        if await self._send_payload(pending.payload) is not Outcome.RETRY:
            self._remove_inflight(key)
            return
        await self._park(key, pending)

    async def _park(self, key: int, pending: Pending) -> None:
        """Move a payload that was not taken to the overflow buffer, for the spool. While the buffer is
        full (the spool is failing), offer it again whenever a validator may take it."""
        while self._held() >= self.settings.overflow_size:
            now = trio.current_time()
            if self.picker.available(now):
                if await self._send_payload(pending.payload) is not Outcome.RETRY:
                    self._remove_inflight(key)
                    return
                continue
            retry_at = self.picker.next_retry_at(now)
            await wait_first(self._overflow_room.wait, self.picker.changed.wait,
                             newer_metagraph(self.subnet),
                             deadline=retry_at if retry_at is not None else now + self.settings.backoff_max_s)
        # No checkpoint between these two: the payload is always in one place or the other.
        self._to_overflow(pending)
        self._remove_inflight(key)

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
                # Its body is not logged: a validator's error may echo the payload, prompts included.
                log.error("scoring: validator %s at %s refused a payload with HTTP %d (a body of %d bytes); "
                          "such payloads are dropped (counted in dropped.%s)", validator.hotkey, validator.axon,
                          status, len(answer), name)
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
            log.error("scoring: the spool is failing (%s); %d payloads (%d bytes) held in memory; retrying %s",
                      exc, self._held(), self.memory_bytes(), f"in {delay:.0f}s" if delay else "with the next write")

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
            delay = await self._write_batch()
            if delay is not None:
                await trio.sleep(delay)

    async def _write_batch(self) -> float | None:
        """Write one batch from the front of the overflow buffer; the wait before the next, when the disk
        failed. (A method of its own, so that nothing of the batch stays referenced while waiting.)"""
        count = batch_length(self._overflow.items, self.settings.spool_batch, self._batch_max_bytes)
        # Until the write returns, the shutdown flush finds the batch here (the thread call can be
        # cancelled before it starts; once started it is not abandoned).
        self._writing_bytes = self._overflow.bytes
        self._writing = self._overflow.take(count)
        self._writing_bytes -= self._overflow.bytes
        stored = await self._run_sync(self._store, self._writing)
        self._writing = []
        self._writing_bytes = 0
        self._count_stored(stored)
        if stored.error is not None:
            # The payloads not written go back to the front, in order (the buffer's count bound holds,
            # since they were counted in it while being written); the replay may offer them to a validator.
            if stored.unwritten:
                self._overflow.extendleft(stored.unwritten)
                self._wake_replay()
            delay = self._write_backoff.next()
            self._spool_failed(stored.error, trio.current_time(), delay)
            self._wake_room()
            return delay
        self._write_backoff.reset()
        self._spool_recovered()
        self._wake_room()
        spooled, self._spooled = self._spooled, trio.Event()
        spooled.set()
        return None

    def _wake_room(self) -> None:
        room, self._overflow_room = self._overflow_room, trio.Event()
        room.set()

    async def _replay(self) -> None:
        """Deliver what waits, whenever a validator is out of back-off: payloads held in memory (the
        overflow buffer, which a failing disk does not empty) and spooled ones, oldest first."""
        while True:
            await self._replay_round()

    async def _replay_round(self) -> None:
        """One batch, or one wait. (Its own method: nothing of a batch stays referenced after it.)"""
        now = trio.current_time()
        spool_ready = self.spool.pending > 0 and (self._read_retry_at is None or now >= self._read_retry_at)
        if not self._overflow and not spool_ready:
            if self.spool.needs_sync:
                if (error := await self._sync_spool()) is not None:
                    delay = self._replay_backoff.next()
                    self._spool_failed(error, trio.current_time(), delay)
                    await wait_first(self._spooled.wait, self._memory_added.wait,
                                     deadline=trio.current_time() + delay)
                return
            await wait_first(self._spooled.wait, self._memory_added.wait,
                             deadline=self._read_retry_at if self.spool.pending and self._read_retry_at
                             is not None else math.inf)
            return
        if not self.picker.available(now):
            retry_at = self.picker.next_retry_at(now)
            await wait_first(self.picker.changed.wait, newer_metagraph(self.subnet),
                             deadline=retry_at if retry_at is not None else now + self.settings.backoff_max_s)
            return
        # After a back-off, one payload probes (from memory and from the spool in turn); a batch
        # follows its 200, shared between the two.
        limit = self.settings.concurrency if self.picker.healthy() else 1
        if not self._overflow:
            from_memory = 0
        elif not spool_ready:
            from_memory = limit
        elif limit == 1:
            self._probe_from_memory = not self._probe_from_memory
            from_memory = int(self._probe_from_memory)
        else:
            from_memory = max((limit + 1) // 2, limit - self.spool.pending)
        # What a batch reads into memory fits in the room left for deliveries and in the whole bound.
        room = min(self._delivering_max - self._delivering_bytes(), self.memory_max_bytes - self.memory_bytes())
        memory = self._take_from_memory(from_memory, room)
        room -= sum(len(p.payload) for _, p in memory)
        batch: SpoolBatch | None = None
        start = self.spool.cursor
        probe = limit == 1
        if spool_ready and len(memory) < limit and (room > 0 or not memory):
            try:
                # One record at least; more only within `room`. A probe goes to the record at
                # `_probe_depth` (those before it are read, not sent), so that one payload a validator
                # keeps failing cannot stand in front of all the others.
                count = self._probe_depth + 1 if probe else limit - len(memory)
                batch = await self._run_sync(self.spool.read, count, max(room, 0))
            except SpoolError as exc:
                delay = self._read_backoff.next()
                self._read_retry_at = trio.current_time() + delay
                self._spool_failed(exc, trio.current_time(), delay)
            else:
                self._read_backoff.reset()
                self._read_retry_at = None
        if memory or (batch is not None and batch.records):
            if (error := await self._replay_batch(memory, batch, probe=probe)) is not None:
                # Only a write failed (the cursor moved in memory, or payloads the disk refused to take
                # back are held in memory): go on, the next commit writes the cursor.
                self._spool_failed(error, trio.current_time(), 0.0)
        elif batch is not None and batch.end != start:
            # Only skipped records (corrupt, expired): move past them.
            if (error := await self._commit(batch.end, [])) is not None:
                self._spool_failed(error, trio.current_time(), 0.0)
        elif batch is not None:  # nothing readable: do not spin
            log.error("scoring: %d spooled payloads cannot be read; waiting for new ones", self.spool.pending)
            await wait_first(self._spooled.wait, self._memory_added.wait, deadline=math.inf)

    def _take_from_memory(self, count: int, room: int) -> list[tuple[int, Pending]]:
        """Up to `count` payloads from the front of the overflow buffer, within `room` bytes (one at
        least), now in flight."""
        taken: list[tuple[int, Pending]] = []
        while self._overflow and len(taken) < count:
            if taken and weight_of(self._overflow.first()) > room:
                break
            item = self._overflow.popleft()
            room -= weight_of(item)
            pending = self._encoded(item)
            del item
            if pending is not None:
                taken.append((self._add_inflight(pending), pending))
                self._resending += 1
            else:
                self._wake_room()
        return taken

    async def _replay_batch(self, memory: list[tuple[int, Pending]], batch: SpoolBatch | None, *,
                            probe: bool = False) -> SpoolError | None:
        """Send what was taken from memory and what was read from the spool (of a probe's records, only
        the last), then commit what the spool's part came to."""
        records = batch.records if batch is not None else ()
        outcomes = [Outcome.RETRY] * len(records)
        replaying = sum(len(r.payload) for r in records)
        self._replaying_bytes += replaying

        async def resend(key: int, pending: Pending) -> None:
            outcome = await self._send_payload(pending.payload)
            if outcome is Outcome.DELIVERED:
                self.resent_from_memory += 1
            self._resending -= 1
            if outcome is Outcome.RETRY:
                # Back to the buffer, for the spool or the next round; no checkpoint between the two.
                self._to_overflow(pending)
            else:
                self._wake_room()
            self._remove_inflight(key)

        async def replay_one(i: int) -> None:
            outcomes[i] = await self._send_payload(records[i].payload)
            if outcomes[i] is Outcome.DELIVERED:
                self.replayed += 1

        error: SpoolError | None = None
        try:
            async with trio.open_nursery() as nursery:
                for key, pending in memory:
                    nursery.start_soon(resend, key, pending)
                for i in range(len(records) - 1 if probe and records else 0, len(records)):
                    nursery.start_soon(replay_one, i)
        finally:
            self._replaying_bytes -= replaying
            if probe and records:
                taken = outcomes[-1] is not Outcome.RETRY
                depth_bound = max(1, min(self.spool.pending, self.settings.concurrency))
                self._probe_depth = 0 if taken else len(records) % depth_bound
            if batch is not None:
                with trio.CancelScope(shield=True):
                    error = await self._commit_replayed(batch, outcomes)
        return error

    async def _commit_replayed(self, batch: SpoolBatch, outcomes: Sequence[Outcome]) -> SpoolError | None:
        """Move the cursor past the last record that was taken (or refused for good). Those before it
        that were not go back to the tail; those after it stay where they are, so a failed probe
        changes nothing on disk."""
        records = batch.records
        taken = [i for i, outcome in enumerate(outcomes) if outcome is not Outcome.RETRY]
        if not taken:
            return None
        if len(taken) == len(records):
            return await self._commit(batch.end, [])
        last = taken[-1]
        again = [Pending(r.payload, r.created_at) for r, outcome in zip(records[:last], outcomes[:last], strict=True)
                 if outcome is Outcome.RETRY]
        return await self._commit(records[last].end, again)

    async def _commit(self, through: Position, again: list[Pending]) -> SpoolError | None:
        """`spool.commit`. When the disk refuses to take `again` back, what it did not take is kept in
        the overflow buffer (delivered from there, or written when the disk works again) and the
        cursor moves on without it: nothing else waits for the disk."""
        try:
            await self._run_sync(self.spool.commit, through, [p.payload for p in again],
                                 [p.created_at for p in again])
        except SpoolError as exc:
            if exc.committed:
                return exc  # the cursor moved in memory; only its write is left, for the next commit
            kept = again[exc.done:]
            self.requeues_kept += len(kept)
            for pending in kept:
                self._to_overflow(pending)
            try:
                await self._run_sync(self.spool.commit, through)
            except SpoolError as cursor_error:  # a commit without a requeue always moves the cursor
                return cursor_error
            return exc
        self._replay_backoff.reset()
        if not self.spool.failing and not self._write_backoff.current_s:
            self._spool_recovered()
        return None

    async def _sync_spool(self) -> SpoolError | None:
        """Write what a disk failure left unwritten: the cursor, the deletion of delivered segments."""
        try:
            await self._run_sync(self.spool.sync)
        except SpoolError as exc:
            return exc
        self._replay_backoff.reset()
        if not self.spool.failing and not self._write_backoff.current_s:
            self._spool_recovered()
        return None


def newer_metagraph(subnet: SnapshotCell[SubnetSnapshot]) -> Callable[[], Awaitable[object]]:
    """A wait for the next metagraph after the one published now."""
    version = subnet.version

    async def wait() -> object:
        return await subnet.wait_newer(version)

    return wait
