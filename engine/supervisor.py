"""Starting long-lived actors in order and restarting them when they crash.

An actor (`actors/actor.py`) has a name, a `health()`, and `async def run(self, *, task_status)` that
hands back itself once it can serve. The supervisor keeps the same actor object across restarts, so
handles given out earlier stay valid, and records each actor's state in its `Registry`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from actors.actor import Actor, ActorState, Registry

log = logging.getLogger("sn1_gateway.supervisor")

A = TypeVar("A", bound=Actor)

# After the drain deadline, a stop takes at most this much more (state saved, the process ended): the
# gateway's one bound on its stop (`engine/gateway.py`), and what the workers' parent allows each.
EXIT_MARGIN_S = 2.5

class StartupError(Exception):
    """The gateway cannot start; the message is for the operator (one line, no traceback)."""


def describe_error(exc: BaseException) -> str:
    """A one-line description of a crash, looking inside single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Supervisor:
    """Restarts crashed actors with exponential back-off; a stable run resets the back-off.

    An actor that crashes `start_attempts` times before it ever served is a start-up failure
    (`StartupError`): what stops it then (a spool folder that is a file, say) needs the operator.
    """

    base_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0
    max_restarts: int | None = None
    start_attempts: int | None = 3
    registry: Registry = field(default_factory=Registry)

    @property
    def states(self) -> dict[str, ActorState]:
        return self.registry.states

    def ready(self) -> bool:
        return self.registry.ready()

    def report(self) -> dict[str, dict[str, Any]]:
        return self.registry.report()

    async def start(self, nursery: trio.Nursery, actor: A) -> A:
        """Start `actor` under supervision; return it once it first serves."""
        self.registry.supervise(actor)
        started: A = await nursery.start(self._supervise, actor)
        return started

    async def _supervise(self, actor: Actor, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        name = actor.name
        state = self.states[name]
        backoff = self.base_backoff_s
        first = True
        while True:
            started_at = trio.current_time()
            error: Exception | None = None
            try:
                async with trio.open_nursery() as inner:
                    handle = await inner.start(actor.run)
                    state.status, state.since, state.retry_at = "running", trio.current_time(), None
                    if first:
                        first = False
                        task_status.started(handle)
            except Exception as exc:  # an ExceptionGroup of plain errors too; Cancelled passes through
                error = exc
            if error is None:
                state.status, state.since = "stopped", trio.current_time()
                return
            state.last_error = describe_error(error)
            state.restarts += 1
            if trio.current_time() - started_at >= self.stable_after_s:
                backoff = self.base_backoff_s
            if first and self.start_attempts is not None and state.restarts >= self.start_attempts:
                state.status, state.since = "failed", trio.current_time()
                raise StartupError(f"{name} could not start ({state.restarts} attempts): {state.last_error}"
                                   ) from error
            if self.max_restarts is not None and state.restarts > self.max_restarts:
                state.status, state.since = "failed", trio.current_time()
                log.error("actor %s failed for good after %d restarts: %s", name, state.restarts - 1,
                          state.last_error)
                if first:
                    raise StartupError(f"{name} could not start: {state.last_error}") from error
                return
            state.status, state.since = "restarting", trio.current_time()
            state.retry_at = state.since + backoff
            log.warning("actor %s crashed (%s); restarting in %.1fs", name, state.last_error, backoff,
                        exc_info=error)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
