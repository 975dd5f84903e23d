"""Which validator a scoring payload goes to, and what each validator's answers have taught us.

`scoring.validator` (with `scoring.validator_hotkey`, or the hotkey the metagraph lists for that axon),
else one drawn from the metagraph at random, weighted by stake, among those with a validator permit, at
least `scoring.min_validator_stake` and a serving axon, skipping any in back-off. A validator that
failed waits out a back-off (`backoff_base_s` doubling to `backoff_max_s`), then gets one probe before
the others follow; one that refuses our hotkey (401/403) is probed once per `backoff_max_s`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from config.settings import ScoringSettings
from wire.metagraph import SubnetSnapshot
from wire.snapshot import SnapshotCell

log = logging.getLogger("sn1_gateway.scoring")

LOG_EVERY_S = 60.0  # a standing problem (a refusing validator, a failing spool) is logged this often


@dataclass(frozen=True, slots=True)
class Validator:
    hotkey: str
    axon: str  # "host:port"
    stake: float = 0.0


def eligible_validators(settings: ScoringSettings, snapshot: SubnetSnapshot) -> tuple[tuple[Validator, ...], str | None]:
    """The validators scoring (and the availability poll) may use, and why there is none when there is
    none: the configured one (`scoring.validator`, with `scoring.validator_hotkey` or the hotkey the
    metagraph lists at that axon), else every neuron with a validator permit, at least
    `scoring.min_validator_stake` and a serving axon."""
    if settings.validator:
        hotkey = settings.validator_hotkey or snapshot.hotkey_at(settings.validator)
        if not hotkey:
            return (), (f"scoring.validator_hotkey is empty and no neuron in the metagraph "
                        f"serves {settings.validator}")
        return (Validator(hotkey, settings.validator),), None
    found = tuple(
        Validator(n.hotkey, n.axon, n.stake)
        for n in snapshot.neurons
        if n.validator_permit and n.axon and n.stake >= settings.min_validator_stake
    )
    if found:
        return found, None
    return (), (f"no neuron in the metagraph has a validator permit, stake >= {settings.min_validator_stake:g} "
                f"and a serving axon (or set scoring.validator)")


class LogEvery:
    """At most one log line per key per `period_s` of trio time, for problems that last."""

    def __init__(self, period_s: float = LOG_EVERY_S) -> None:
        self.period_s = period_s
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.period_s:
            return False
        if len(self._last) >= 4096:  # keys are validators and statuses: only a hostile metagraph gets here
            self._last = {k: t for k, t in self._last.items() if now - t < self.period_s}
        self._last[key] = now
        return True


@dataclass(slots=True)
class ValidatorState:
    axon: str
    delivered: int = 0
    failures: int = 0
    rejected: int = 0  # payloads it refused for good (4xx)
    consecutive: int = 0  # back-off steps since the last 200
    retry_at: float = 0.0  # trio time before which the validator is skipped
    probing: bool = False  # after a back-off, one payload is in flight; the others wait for its answer
    refused_status: int | None = None  # 401/403 while it refuses our hotkey
    last_error: str | None = None

    def usable(self, now: float) -> bool:
        return self.consecutive == 0 or (self.retry_at <= now and not self.probing)


class ValidatorPicker:
    """Chooses where a payload goes and remembers each validator's failures (trio time).

    Every `choose` is followed by one of `succeeded`, `failed`, `refused`, `rejected`, then `release`.
    """

    def __init__(self, settings: ScoringSettings, subnet: SnapshotCell[SubnetSnapshot], rng: random.Random,
                 *, own_hotkey: str = "", log_every: LogEvery | None = None) -> None:
        self.settings = settings
        self.subnet = subnet
        self.rng = rng
        self.own_hotkey = own_hotkey
        self.log_every = log_every or LogEvery()
        self.states: dict[str, ValidatorState] = {}  # by hotkey
        self._cached: tuple[int, tuple[Validator, ...]] = (-1, ())
        self.problem: str | None = None  # why there is no validator at all, when there is none
        self.changed = trio.Event()  # set (and replaced) when a validator's state changes

    def candidates(self) -> tuple[Validator, ...]:
        version = self.subnet.version
        if self._cached[0] != version:
            self._cached = (version, self._read(self.subnet.get()))
        return self._cached[1]

    def _read(self, snapshot: SubnetSnapshot) -> tuple[Validator, ...]:
        found, self.problem = eligible_validators(self.settings, snapshot)
        return found

    def available(self, now: float) -> bool:
        return any(self._state(v).usable(now) for v in self.candidates())

    def healthy(self) -> bool:
        """Some validator is out of back-off altogether (not just ready for a probe)."""
        return any(self._state(v).consecutive == 0 for v in self.candidates())

    def choose(self, now: float, exclude: Sequence[str] = ()) -> Validator | None:
        """A usable validator, drawn at random weighted by stake; None when there is none. Choosing one
        that is due for a probe makes the probe: no other payload goes to it until its answer."""
        ready = [v for v in self.candidates() if v.hotkey not in exclude and self._state(v).usable(now)]
        if not ready:
            return None
        weights = [max(v.stake, 0.0) for v in ready]
        chosen = self.rng.choice(ready) if sum(weights) <= 0 else self.rng.choices(ready, weights=weights)[0]
        state = self._state(chosen)
        if state.consecutive:
            state.probing = True
        return chosen

    def next_retry_at(self, now: float) -> float | None:
        """When the next validator in back-off may be probed (None: none waits for a time)."""
        times = [st.retry_at for v in self.candidates() if (st := self._state(v)).consecutive
                 and not st.probing and st.retry_at > now]
        return min(times) if times else None

    def succeeded(self, validator: Validator) -> None:
        state = self._state(validator)
        state.delivered += 1
        if state.refused_status is not None:
            log.warning("scoring: validator %s at %s now accepts our hotkey; spooled payloads flow again",
                        validator.hotkey, validator.axon)
        self._reset(state)

    def rejected(self, validator: Validator, status: int) -> None:
        """It answered, so it is up and reachable; only the payload was refused."""
        state = self._state(validator)
        state.rejected += 1
        self._reset(state)

    def _reset(self, state: ValidatorState) -> None:
        changed = state.consecutive or state.probing or state.refused_status is not None
        state.consecutive = 0
        state.retry_at = 0.0
        state.probing = False
        state.refused_status = None
        if changed:
            self._changed()

    def failed(self, validator: Validator, reason: str, now: float) -> None:
        state = self._state(validator)
        state.failures += 1
        state.last_error = reason
        state.probing = False
        if state.retry_at > now:
            return  # already backing off: concurrent failures from the same outage count once
        delay = min(self.settings.backoff_base_s * 2**state.consecutive,
                    max(self.settings.backoff_max_s, self.settings.backoff_base_s))
        state.consecutive += 1
        state.retry_at = now + delay
        self._changed()
        log.warning("scoring: validator %s at %s failed (%s); skipping it for %.1fs",
                    validator.hotkey, validator.axon, reason, delay)

    def refused(self, validator: Validator, status: int, now: float) -> None:
        """401/403: it does not take our signer. Only its operator can change that: probe it rarely."""
        state = self._state(validator)
        state.failures += 1
        state.refused_status = status
        state.last_error = f"HTTP {status}: refuses our hotkey"
        state.probing = False
        if state.retry_at <= now:
            state.consecutive += 1
            state.retry_at = now + max(self.settings.backoff_max_s, self.settings.backoff_base_s)
            self._changed()
        hint = self.hint(validator.hotkey)
        if hint is not None and self.log_every.due(("refused", validator.hotkey), now):
            log.warning("scoring: %s; its payloads wait in the spool (one probe every %.0fs)",
                        hint, self.settings.backoff_max_s)

    def release(self, validator: Validator) -> None:
        """The attempt is over (a shutdown may have cut it short): its probe no longer holds the others."""
        state = self._state(validator)
        if state.probing:
            state.probing = False
            self._changed()

    def hint(self, hotkey: str) -> str | None:
        """The operator's fix for a validator that refuses our hotkey; None when it does not."""
        state = self.states.get(hotkey)
        if state is None or state.refused_status is None:
            return None
        ours = self.own_hotkey or "<the gateway's hotkey>"
        return (f"validator {hotkey} at {state.axon} refuses our hotkey {ours} (HTTP {state.refused_status}): "
                f"set API_HOTKEY={ours} in that validator's environment and restart it")

    def refusing(self) -> list[str]:
        return [hotkey for hotkey, st in self.states.items() if st.refused_status is not None]

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _state(self, validator: Validator) -> ValidatorState:
        state = self.states.get(validator.hotkey)
        if state is None:
            state = self.states[validator.hotkey] = ValidatorState(validator.axon)
        state.axon = validator.axon
        return state

    def report(self, now: float) -> dict[str, Any]:
        return {
            hotkey: {
                "axon": st.axon,
                "delivered": st.delivered,
                "failures": st.failures,
                "rejected": st.rejected,
                "consecutive_failures": st.consecutive,
                "backoff_remaining_s": round(max(0.0, st.retry_at - now), 3),
                "probing": st.probing,
                "refused_signer": st.refused_status is not None,
                "hint": self.hint(hotkey),
                "last_error": st.last_error,
            }
            for hotkey, st in self.states.items()
        }
