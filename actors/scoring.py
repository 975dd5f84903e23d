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
and counted. A payload leaves memory only for a 200 or for the spool; on shutdown whatever is still in
memory (queued, in the overflow buffer, or in flight) is written to the spool, and replayed on the next
start. Delivery is therefore at least once; see `actors/spool.py` for where duplicates can occur.

Which validator: `scoring.validator` (with `scoring.validator_hotkey`, or the hotkey the metagraph
lists for that axon), else one drawn from the metagraph at random, weighted by stake, among those with
a validator permit, at least `scoring.min_validator_stake` and a serving axon, skipping any in back-off.
A validator that fails is skipped for `backoff_base_s`, doubling per consecutive failure up to
`backoff_max_s`; a 200 resets it.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
import trio

from actors.spool import Spool, SpoolBatch
from config.settings import ScoringSettings, Settings
from engine import jsonio
from engine.epistula import Signer
from engine.keepalive import ParsedUrls, post_streaming
from engine.organic import OrganicResult
from engine.snapshot import SnapshotCell
from engine.subnet import SubnetSnapshot

log = logging.getLogger("sn1_gateway.scoring")

T = TypeVar("T")

FLUSH_DEADLINE_S = 5.0  # how long the shutdown flush to the spool may take
SPOOL_RETRY_S = 1.0  # wait after a failed spool write before trying again


class RunSync(Protocol):
    """Runs a blocking call without blocking the event loop: `trio.to_thread.run_sync`."""

    def __call__(self, sync_fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


def encode_payload(result: OrganicResult) -> bytes:
    """The `/scoring` body as the exact bytes that are signed, sent and spooled."""
    return jsonio.dumps(result.scoring_payload())


@dataclass(frozen=True, slots=True)
class Validator:
    hotkey: str
    axon: str  # "host:port"
    stake: float = 0.0


@dataclass(slots=True)
class ValidatorState:
    delivered: int = 0
    failures: int = 0
    consecutive: int = 0  # back-off steps since the last 200
    retry_at: float = 0.0  # trio time before which the validator is skipped
    last_error: str | None = None


class ValidatorPicker:
    """Chooses where a payload goes and remembers each validator's failures (trio time)."""

    def __init__(self, settings: ScoringSettings, subnet: SnapshotCell[SubnetSnapshot], rng: random.Random
                 ) -> None:
        self.settings = settings
        self.subnet = subnet
        self.rng = rng
        self.states: dict[str, ValidatorState] = {}  # by hotkey
        self._cached: tuple[int, tuple[Validator, ...]] = (-1, ())
        self.problem: str | None = None  # why there is no validator at all, when there is none

    def candidates(self) -> tuple[Validator, ...]:
        version = self.subnet.version
        if self._cached[0] != version:
            self._cached = (version, self._read(self.subnet.get()))
        return self._cached[1]

    def _read(self, snapshot: SubnetSnapshot) -> tuple[Validator, ...]:
        s = self.settings
        if s.validator:
            hotkey = s.validator_hotkey or snapshot.hotkey_at(s.validator)
            if not hotkey:
                self.problem = (f"scoring.validator_hotkey is empty and no neuron in the metagraph "
                                f"serves {s.validator}")
                return ()
            self.problem = None
            return (Validator(hotkey, s.validator),)
        found = tuple(
            Validator(n.hotkey, n.axon, n.stake)
            for n in snapshot.neurons
            if n.validator_permit and n.axon and n.stake >= s.min_validator_stake
        )
        self.problem = None if found else (
            f"no neuron in the metagraph has a validator permit, stake >= {s.min_validator_stake:g} "
            f"and a serving axon"
        )
        return found

    def available(self, now: float) -> bool:
        return any(self._state(v).retry_at <= now for v in self.candidates())

    def choose(self, now: float) -> Validator | None:
        """A validator not in back-off, drawn at random weighted by stake; None when there is none."""
        ready = [v for v in self.candidates() if self._state(v).retry_at <= now]
        if not ready:
            return None
        weights = [max(v.stake, 0.0) for v in ready]
        if sum(weights) <= 0:
            return self.rng.choice(ready)
        return self.rng.choices(ready, weights=weights)[0]

    def next_retry_at(self) -> float | None:
        """When the first validator in back-off may be tried again (None: no candidate at all)."""
        times = [self._state(v).retry_at for v in self.candidates()]
        return min(times) if times else None

    def succeeded(self, validator: Validator) -> None:
        state = self._state(validator)
        state.delivered += 1
        state.consecutive = 0
        state.retry_at = 0.0

    def failed(self, validator: Validator, reason: str, now: float) -> None:
        state = self._state(validator)
        state.failures += 1
        state.last_error = reason
        if state.retry_at > now:
            return  # already backing off: concurrent failures from the same outage count once
        delay = min(self.settings.backoff_base_s * 2**state.consecutive,
                    max(self.settings.backoff_max_s, self.settings.backoff_base_s))
        state.consecutive += 1
        state.retry_at = now + delay
        log.warning("scoring: validator %s at %s failed (%s); skipping it for %.1fs",
                    validator.hotkey, validator.axon, reason, delay)

    def _state(self, validator: Validator) -> ValidatorState:
        state = self.states.get(validator.hotkey)
        if state is None:
            state = self.states[validator.hotkey] = ValidatorState()
        return state

    def report(self, now: float) -> dict[str, Any]:
        return {
            hotkey: {
                "delivered": st.delivered,
                "failures": st.failures,
                "consecutive_failures": st.consecutive,
                "backoff_remaining_s": round(max(0.0, st.retry_at - now), 3),
                "last_error": st.last_error,
            }
            for hotkey, st in self.states.items()
        }


class ScoringForwarder:
    """The actor. Its channel and buffers live on the object, so they survive a supervisor restart."""

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
    ) -> None:
        """`run_sync` runs the spool's file I/O; tests on the autojump clock may run it inline,
        since that clock moves on while a worker thread writes."""
        self.settings = settings.scoring
        self.http = http
        self.signer = signer
        self.subnet = subnet
        self.picker = ValidatorPicker(self.settings, subnet, rng or random.Random())
        self._urls = ParsedUrls()
        self.spool = Spool(settings.resolve(self.settings.spool_dir), max_bytes=self.settings.spool_max_bytes)
        self.flush_deadline_s = flush_deadline_s
        self._run_sync = run_sync
        # The original ends are never closed: each delivery task receives on its own clone.
        self._send, self._receive = trio.open_memory_channel[OrganicResult](self.settings.queue_size)
        self._overflow: deque[OrganicResult | bytes] = deque()  # waiting for the spool writer
        self._writing: list[OrganicResult | bytes] = []  # taken by the spool writer, not yet on disk
        self._overflow_added = trio.Event()  # wakes the spool writer
        self._overflow_room = trio.Event()  # wakes delivery tasks waiting for room in the buffer
        self._spooled = trio.Event()  # set when the spool writer stored something
        self._inflight: dict[int, bytes] = {}  # delivery attempts whose outcome is not known yet
        self._next_inflight = 0
        self._stopped = False  # set once the shutdown flush is done
        # Counters.
        self.submitted = 0
        self.delivered = 0
        self.replayed = 0  # of `delivered`, those that came from the spool
        self.attempts_failed = 0
        self.no_validator = 0
        self.spool_errors = 0
        self.ignored = {"disabled": 0, "not_scored": 0, "no_miners": 0}
        self.dropped = {"overflow": 0, "unencodable": 0, "flush_timeout": 0, "flush_failed": 0, "stopped": 0}
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
        try:
            self._send.send_nowait(result)
        except trio.WouldBlock:
            if len(self._overflow) >= self.settings.overflow_size:
                self.dropped["overflow"] += 1
                return
            self._overflow.append(result)
            self._overflow_added.set()

    def statistics(self) -> dict[str, Any]:
        channel = self._send.statistics()
        return {
            "enabled": self.settings.enabled,
            "submitted": self.submitted,
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
            "ignored": dict(self.ignored),
            "dropped": {
                **self.dropped,
                "spool_full": self.spool.dropped_full,
                "too_large": self.spool.dropped_too_large,
                "corrupt": self.spool.corrupt,
            },
            "spool": {**self.spool.statistics(), "errors": self.spool_errors, "last_error": self.last_spool_error},
            "validators": self.picker.report(trio.current_time()),
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
        stopping = True
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.settings.concurrency):
                    nursery.start_soon(self._deliver_live, self._receive.clone())
                nursery.start_soon(self._write_spool)
                nursery.start_soon(self._replay)
                task_status.started(self)
        except Exception:
            stopping = False  # a crash: the supervisor restarts this actor, so keep taking results
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._flush_to_spool(final=stopping)

    async def _flush_to_spool(self, *, final: bool) -> None:
        """Write everything still in memory to the spool, within `flush_deadline_s`.

        Collects again after each write: fan-outs cancelled by the same shutdown may still hand over
        their results meanwhile. A write that has started is not abandoned (the payloads are out of
        memory already); the deadline stops further rounds, and what is left then is counted as dropped.
        """
        total = 0
        unwritten: list[OrganicResult | bytes] = []
        with trio.move_on_after(self.flush_deadline_s):
            while unwritten := self._take_all_in_memory():
                try:
                    total += self._count_unencodable(await self._run_sync(self._encode_and_append, unwritten))
                except OSError as exc:
                    self.dropped["flush_failed"] += len(unwritten)
                    log.error("scoring: cannot write %d payloads to the spool at shutdown (%s)", len(unwritten), exc)
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

    def _take_all_in_memory(self) -> list[OrganicResult | bytes]:
        items: list[OrganicResult | bytes] = [*self._writing, *self._inflight.values(), *self._overflow]
        self._writing = []
        self._inflight.clear()
        self._overflow.clear()
        while True:
            try:
                items.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return items

    def _encode_and_append(self, items: Sequence[OrganicResult | bytes]) -> tuple[int, int]:
        """Encode (in this worker thread) and append durably: how many were stored, how many could not be encoded."""
        payloads: list[bytes] = []
        unencodable = 0
        for item in items:
            if isinstance(item, bytes):
                payloads.append(item)
                continue
            try:
                payloads.append(encode_payload(item))
            except (TypeError, ValueError) as exc:
                unencodable += 1
                log.error("scoring: request %s cannot be encoded (%s); dropped", item.request_id, exc)
        return self.spool.append(payloads), unencodable

    def _count_unencodable(self, outcome: tuple[int, int]) -> int:
        stored, unencodable = outcome
        self.dropped["unencodable"] += unencodable
        return stored

    # -- live delivery -------------------------------------------------------------------------

    async def _deliver_live(self, receive: trio.MemoryReceiveChannel[OrganicResult]) -> None:
        async with receive:
            async for result in receive:
                try:
                    body = encode_payload(result)
                except (TypeError, ValueError) as exc:
                    self.dropped["unencodable"] += 1
                    log.error("scoring: request %s cannot be encoded (%s); dropped", result.request_id, exc)
                    continue
                key = self._next_inflight
                self._next_inflight += 1
                self._inflight[key] = body
                # The fan-out that produced this result has just woken its request's handler too: let
                # the client's answer go out before the signing and sending below.
                await trio.lowlevel.checkpoint()
                if await self._send_once(body):
                    del self._inflight[key]
                    continue
                while len(self._overflow) >= self.settings.overflow_size:
                    await self._overflow_room.wait()
                # No checkpoint between these two: the payload is always in one place or the other.
                self._overflow.append(body)
                del self._inflight[key]
                self._overflow_added.set()

    async def _send_once(self, body: bytes) -> bool:
        """One delivery attempt to a validator not in back-off; True for a 200."""
        validator = self.picker.choose(trio.current_time())
        if validator is None:
            self.no_validator += 1
            return False
        ok = await self._post(validator, body)
        if ok:
            self.delivered += 1
        return ok

    async def _post(self, validator: Validator, body: bytes) -> bool:
        headers = self.signer.headers(body, validator.hotkey)
        headers["Content-Type"] = "application/json"
        url = self._urls(f"http://{validator.axon}/scoring")
        reason: str
        try:
            with trio.fail_after(self.settings.timeout_s):
                async with post_streaming(self.http, url, body, headers, bounded=True) as response:
                    await response.aread()
        except trio.TooSlowError:
            reason = f"no answer within {self.settings.timeout_s:g}s"
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if response.status_code == 200:
                self.picker.succeeded(validator)
                return True
            reason = f"HTTP {response.status_code}"
        self.attempts_failed += 1
        self.picker.failed(validator, reason, trio.current_time())
        return False

    # -- the spool -----------------------------------------------------------------------------

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
            room, self._overflow_room = self._overflow_room, trio.Event()
            room.set()
            try:
                self._count_unencodable(await self._run_sync(self._encode_and_append, batch))
            except OSError as exc:
                self._writing = []
                self.spool_errors += 1
                self.last_spool_error = str(exc)
                log.error("scoring: cannot write the spool (%s); retrying in %.0fs", exc, SPOOL_RETRY_S)
                self._overflow.extendleft(reversed(batch))
                await trio.sleep(SPOOL_RETRY_S)
                continue
            self._writing = []
            self.last_spool_error = None
            spooled, self._spooled = self._spooled, trio.Event()
            spooled.set()

    async def _replay(self) -> None:
        """Deliver spooled payloads, oldest first, whenever a validator is out of back-off."""
        while True:
            while self.spool.pending == 0:
                await self._spooled.wait()
            if not self.picker.available(trio.current_time()):
                await self._wait_for_validator()
                continue
            start = self.spool.cursor
            batch = await self._run_sync(self.spool.read, self.settings.concurrency)
            await self._replay_batch(batch)
            if not batch.records and batch.end == start:  # nothing readable: do not spin
                log.error("scoring: %d spooled payloads cannot be read; waiting for new ones", self.spool.pending)
                await self._spooled.wait()

    async def _wait_for_validator(self) -> None:
        """Until a validator leaves back-off, or the metagraph changes."""
        retry_at = self.picker.next_retry_at()
        deadline = retry_at if retry_at is not None else trio.current_time() + self.settings.backoff_max_s
        with trio.move_on_at(deadline):
            await self.subnet.wait_newer(self.subnet.version)

    async def _replay_batch(self, batch: SpoolBatch) -> None:
        delivered = [False] * len(batch.records)

        async def replay_one(i: int) -> None:
            if await self._send_once(batch.records[i].payload):
                delivered[i] = True
                self.replayed += 1

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(batch.records)):
                    nursery.start_soon(replay_one, i)
        finally:
            # Whatever did not get a 200 (failed, or cut short by shutdown) goes back to the tail,
            # in the same call that moves the cursor past the batch.
            again = [r.payload for r, ok in zip(batch.records, delivered, strict=True) if not ok]
            with trio.CancelScope(shield=True):
                await self._run_sync(self.spool.commit, batch.end, again)
