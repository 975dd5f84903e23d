"""What one fan-out produced: every asked miner's answer, under its own uid, for scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCORED_TASKS = frozenset({"InferenceTask", "WebRetrievalTask"})


@dataclass(slots=True)
class MinerAnswer:
    """One miner's answer to one request, filled in as its stream arrives."""

    uid: int
    hotkey: str
    chunks: list[str] = field(default_factory=list)  # content deltas, in order
    timings: list[float] = field(default_factory=list)  # seconds from request start, one per chunk
    raw_chunks: list[dict[str, Any]] = field(default_factory=list)  # the chunk objects as received
    finish_reason: str | None = None
    error: str | None = None  # why this miner failed, if it did
    completed: bool = False  # the stream ended with [DONE]

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass(frozen=True, slots=True)
class OrganicResult:
    """A finished fan-out, ready for the scoring forwarder.

    `body` is the request exactly as sent to the miners (with seed and task); `answers` follow the
    order in which the miners were asked, each keyed by its own uid.
    """

    request_id: str
    task: str
    body: dict[str, Any]
    answers: tuple[MinerAnswer, ...]
    created_at: float  # wall clock, seconds since the epoch

    @property
    def scored(self) -> bool:
        return self.task in SCORED_TASKS

    def scoring_payload(self) -> dict[str, Any]:
        """The `/scoring` body of PROTOCOL.md section 5."""
        return {
            "body": self.body,
            "uids": [a.uid for a in self.answers],
            "chunks": {str(a.uid): list(a.chunks) for a in self.answers},
            "timings": {str(a.uid): list(a.timings) for a in self.answers},
            "chunk_dicts_raw": {str(a.uid): list(a.raw_chunks) for a in self.answers},
        }
