"""How many deep-research runs this gateway works on at once, per API key and in all.

A run holds a client's connection (or a job) for minutes and makes dozens of fan-outs, so a few keys
could otherwise start enough runs to take every miner stream and every slot of the fan-out pool.
`research.max_running_per_key` bounds one key's runs (more get 429, its own limit to wait for) and
`research.max_running` all of them (more get 503 `research_busy`). A run holds its `ResearchSlot` from
admission to its end, however it ends: the slot is a context manager, and `release` may be called
again without effect, so every exit path (the client gone, an error, cancellation) frees it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from config.settings import ResearchSettings
from web.errors import ApiError

RETRY_AFTER_S = 5  # a run takes minutes; a few seconds between tries is enough


class ResearchSlot:
    """One admitted run's place; given back once."""

    __slots__ = ("_key_id", "_runs")

    def __init__(self, runs: ResearchRuns, key_id: str) -> None:
        self._runs: ResearchRuns | None = runs
        self._key_id = key_id

    def release(self) -> None:
        runs, self._runs = self._runs, None
        if runs is not None:
            runs._release(self._key_id)

    def __enter__(self) -> ResearchSlot:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class ResearchRuns:
    """The runs under way, by key; a part of `/health/ready` and `/metrics` (`research`)."""

    name = "research"

    def __init__(self) -> None:
        self.running = 0
        self._per_key: dict[str, int] = {}
        self.started = 0
        self.refused = {"running": 0, "running_per_key": 0}

    def admit(self, key_id: str, settings: ResearchSettings) -> ResearchSlot:
        """A slot for one more run of `key_id`, or the ApiError saying which limit it is over."""
        if self._per_key.get(key_id, 0) >= settings.max_running_per_key:
            self.refused["running_per_key"] += 1
            raise ApiError(429, f"This API key has {settings.max_running_per_key} deep-research runs under way, "
                           "its limit; wait for one to finish.", code="too_many_research_runs",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.running >= settings.max_running:
            self.refused["running"] += 1
            raise ApiError(503, f"{self.running} deep-research runs are under way in this gateway, its limit; "
                           "retry shortly.", code="research_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.running += 1
        self.started += 1
        self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        return ResearchSlot(self, key_id)

    def _release(self, key_id: str) -> None:
        self.running -= 1
        left = self._per_key[key_id] - 1
        if left:
            self._per_key[key_id] = left
        else:
            del self._per_key[key_id]

    def running_for(self, key_id: str) -> int:
        return self._per_key.get(key_id, 0)

    def health(self) -> dict[str, Any]:
        return {"running": self.running, "keys_running": len(self._per_key), "started": self.started,
                "refused": dict(self.refused)}
