"""Per-miner health: EWMAs of time to first token and of failures, and a circuit breaker.

Updated by every fan-out; read on the hot path without awaiting. A miner that fails
`failure_threshold` times in a row is skipped for `cooldown_s` (open), then let through for one trial
(half-open): success closes the breaker, failure opens it again for twice as long (capped). Only the
request holding the trial decides it: outcomes of other requests still running then are counted in the
figures but move nothing. Callers leave out what is not the miner's doing (a request the miner refused
for the client's own input, the gateway's own failures, requests naming their miners).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

BreakerState = Literal["closed", "open", "half_open"]
ALPHA = 0.2  # weight of the newest observation in the EWMAs
MAX_COOLDOWN_FACTOR = 16


@dataclass(slots=True)
class MinerRecord:
    ttft_ewma_s: float | None = None
    failure_ewma: float = 0.0
    consecutive_failures: int = 0
    successes: int = 0
    failures: int = 0
    opened_at: float | None = None
    cooldown_s: float = 0.0
    trial_in_flight: bool = False
    trials: int = 0  # trials given so far: the number of the one in flight
    last_error: str | None = None


class MinerHealth:
    def __init__(
        self,
        *,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._miners: dict[int, MinerRecord] = {}

    def state(self, uid: int) -> BreakerState:
        record = self._miners.get(uid)
        if record is None or record.opened_at is None:
            return "closed"
        if self.clock() - record.opened_at < record.cooldown_s:
            return "open"
        return "half_open"

    def allows(self, uid: int) -> bool:
        """Whether the miner may be asked now (closed, or half-open with no trial running)."""
        state = self.state(uid)
        return state == "closed" or (state == "half_open" and not self._miners[uid].trial_in_flight)

    def asking(self, uid: int) -> int | None:
        """Note that the miner is being asked. A half-open miner gets one trial at a time: when this
        request takes it, the trial's number, to give back with `released` if it ends undecided."""
        record = self._miners.get(uid)
        if record is None or self.state(uid) != "half_open" or record.trial_in_flight:
            return None
        record.trial_in_flight = True
        record.trials += 1
        return record.trials

    def ttft(self, uid: int) -> float | None:
        record = self._miners.get(uid)
        return None if record is None else record.ttft_ewma_s

    def figures(self, uid: int) -> tuple[float | None, float]:
        """The EWMAs of time to first token (None before a first answer) and of failures (0..1)."""
        record = self._miners.get(uid)
        return (None, 0.0) if record is None else (record.ttft_ewma_s, record.failure_ewma)

    def _decides(self, record: MinerRecord, uid: int, trial: int | None, moves: bool) -> bool:
        """Whether an outcome may move the breaker: always while it is closed; while it is open or
        half-open, only the outcome of the request holding the trial in flight."""
        if not moves:
            return False
        if record.opened_at is None:
            return True
        return (trial is not None and record.trial_in_flight and record.trials == trial
                and self.state(uid) == "half_open")

    def succeeded(self, uid: int, ttft_s: float | None, trial: int | None = None, *, moves: bool = True) -> None:
        """A good answer. `trial`: the half-open trial the request holds; `moves=False`: counted in the
        figures only (a request that named its miners)."""
        record = self._miners.setdefault(uid, MinerRecord())
        record.successes += 1
        record.failure_ewma *= 1 - ALPHA
        if ttft_s is not None:
            record.ttft_ewma_s = ttft_s if record.ttft_ewma_s is None else (
                ALPHA * ttft_s + (1 - ALPHA) * record.ttft_ewma_s)
        if not self._decides(record, uid, trial, moves):
            return
        record.consecutive_failures = 0
        record.opened_at = None
        record.cooldown_s = 0.0
        record.trial_in_flight = False

    def failed(self, uid: int, error: str, trial: int | None = None, *, moves: bool = True) -> None:
        record = self._miners.setdefault(uid, MinerRecord())
        record.failures += 1
        record.failure_ewma = ALPHA + (1 - ALPHA) * record.failure_ewma
        record.last_error = error
        if not self._decides(record, uid, trial, moves):
            return
        record.consecutive_failures += 1
        if record.opened_at is not None:  # the trial failed: open again, for longer
            record.trial_in_flight = False
            record.cooldown_s = min(record.cooldown_s * 2, self.cooldown_s * MAX_COOLDOWN_FACTOR)
            record.opened_at = self.clock()
        elif record.consecutive_failures >= self.failure_threshold:
            record.cooldown_s = self.cooldown_s
            record.opened_at = self.clock()

    def released(self, uid: int, trial: int) -> None:
        """Trial number `trial` ended undecided (its request was cancelled). Only that trial is given
        back: since then the miner may have failed again and a later trial be running."""
        record = self._miners.get(uid)
        if record is not None and record.trials == trial:
            record.trial_in_flight = False

    def report(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        out = {}
        for uid, r in sorted(self._miners.items()):
            state = self.state(uid)
            out[str(uid)] = {
                "breaker": state,
                "ttft_ewma_s": None if r.ttft_ewma_s is None else round(r.ttft_ewma_s, 4),
                "failure_ewma": round(r.failure_ewma, 4),
                "consecutive_failures": r.consecutive_failures,
                "successes": r.successes,
                "failures": r.failures,
                "retry_in_s": round(r.opened_at + r.cooldown_s - now, 1) if state == "open" and r.opened_at else None,
                "last_error": r.last_error,
            }
        return out
