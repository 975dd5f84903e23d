"""The one idiom every long-lived actor follows, and the registry a running gateway reports from.

An actor has a `name`, a `health()` (a JSON-able report for `/health/ready` and `/metrics`) and
`async def run(self, *, task_status)`: it sets itself up, hands back *itself* with
`task_status.started(self)` once it can serve, then loops until cancelled. The supervisor keeps the
same object across restarts, so a handle given out once stays valid. Parts that report but do not run
(the inbound connections, the outbound pool) are `Reporter`s: a name and a `health()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio

ActorStatus = Literal["starting", "running", "restarting", "failed", "stopped"]


class Reporter(Protocol):
    @property
    def name(self) -> str: ...

    def health(self) -> dict[str, Any]: ...


class Actor(Reporter, Protocol):
    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None: ...


@dataclass
class ActorState:
    """What the supervisor knows of one actor."""

    name: str
    status: ActorStatus = "starting"
    restarts: int = 0
    last_error: str | None = None
    since: float = 0.0
    retry_at: float | None = None  # trio time of the next start attempt, while restarting

    def as_dict(self, now: float) -> dict[str, Any]:
        report: dict[str, Any] = {
            "status": self.status,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "for_s": round(now - self.since, 3),
        }
        if self.status == "restarting" and self.retry_at is not None:
            report["next_attempt_in_s"] = round(max(0.0, self.retry_at - now), 3)
        return report


class Registry:
    """A running gateway's actors (each with its supervised state) and other reporters, in the order
    they were added: what `/health/ready` and `/metrics` read, generically."""

    def __init__(self) -> None:
        self.states: dict[str, ActorState] = {}
        self._reporters: dict[str, Reporter] = {}

    def supervise(self, actor: Actor) -> ActorState:
        """Register an actor the supervisor is starting; its state is filled in as it runs."""
        name = actor.name
        if name in self._reporters:
            raise ValueError(f"a part named {name!r} is already registered")
        self._reporters[name] = actor
        state = self.states[name] = ActorState(name=name, since=trio.current_time())
        return state

    def add(self, reporter: Reporter) -> None:
        """Register a part that reports but is not supervised."""
        if reporter.name in self._reporters:
            raise ValueError(f"a part named {reporter.name!r} is already registered")
        self._reporters[reporter.name] = reporter

    def ready(self) -> bool:
        return bool(self.states) and all(s.status == "running" for s in self.states.values())

    def report(self) -> dict[str, dict[str, Any]]:
        """Each actor's supervised state."""
        now = trio.current_time()
        return {name: state.as_dict(now) for name, state in self.states.items()}

    def health(self) -> dict[str, dict[str, Any]]:
        """Each part's own report, by name."""
        return {name: reporter.health() for name, reporter in self._reporters.items()}
