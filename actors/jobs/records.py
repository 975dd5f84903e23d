"""What the job store holds: a job's record, its statuses, and the interface both stores implement.

A job belongs to the API key that created it, stored as the key's id (its sha256), never the key. Its
result is a list of chunks (text, as the web layer renders them) in order; `seq_id` is a chunk's
position. Writes name the position of their first chunk, so a write tried again (its first try timed
out, and went through after all) adds nothing twice. Times are wall-clock seconds (they outlive the process); `expires_at` is when the job is
forgotten.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


UNFINISHED = frozenset({JobStatus.PENDING, JobStatus.RUNNING})


class JobStoreError(Exception):
    """The job store cannot be used (a corrupt file, an unreachable Redis); the message is for the operator."""


class JobStoreUnavailable(JobStoreError):
    """One read or write failed or took too long; the caller answers 503 or tries again later."""


def job_error(message: str, code: str, type_: str = "server_error") -> dict[str, Any]:
    """A job's `error`, in the shape of an OpenAI error body's `error` object."""
    return {"message": message, "type": type_, "param": None, "code": code}


MAX_ERROR_CHARS = 4096  # of a job's stored error


def error_text(error: Mapping[str, Any] | None) -> str | None:
    """A job's error as the stores keep it: JSON, at most MAX_ERROR_CHARS."""
    return None if error is None else json.dumps(dict(error))[:MAX_ERROR_CHARS]


def error_of(text: str | None) -> dict[str, Any] | None:
    """A stored error read back; text that is not a JSON object (cut short, say) becomes its message."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else job_error(text[:MAX_ERROR_CHARS], "job_failed")


CANCELLED = job_error("The job was cancelled (DELETE).", "cancelled", "invalid_request_error")
INTERRUPTED = job_error("The gateway stopped while this job ran (it was restarted or stopped, or lost track "
                        "of the job); send the request again.", "job_interrupted")


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    owner: str  # the API key's id
    status: JobStatus
    created_at: float
    updated_at: float
    expires_at: float
    error: Mapping[str, Any] | None = None
    runner: str = ""  # the gateway process running (or that ran) it
    result: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED

    def public(self) -> dict[str, Any]:
        """The job as `GET /v1/chat/completions/jobs/{id}` answers it."""
        return {"job_id": self.id, "status": self.status.value, "created_at": iso(self.created_at),
                "updated_at": iso(self.updated_at),
                "result": [{"seq_id": i, "chunk": chunk} for i, chunk in enumerate(self.result)],
                "error": dict(self.error) if self.error is not None else None}

    def summary(self) -> dict[str, Any]:
        """The job as `POST /v1/chat/completions/jobs` answers it."""
        return {"job_id": self.id, "status": self.status.value, "created_at": iso(self.created_at),
                "updated_at": iso(self.updated_at)}


def iso(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds and a Z: `2025-01-01T00:00:00.000Z`."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore(Protocol):
    """Where jobs live. Every method is bounded in time (`JobStoreUnavailable` past it). Writes that
    finish a job change it only while it is unfinished, so a cancellation made anywhere wins over the
    runner's last word; `append` and `start` say whether the job is still wanted (False: it was
    finished elsewhere, cancelled, or is gone)."""

    backend: str

    async def create(self, job: JobRecord) -> None: ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The job with its result, or None when there is none (or it has expired)."""
        ...

    async def count_owned(self, owner: str, now: float) -> int:
        """Jobs of `owner` not yet expired."""
        ...

    async def start(self, job_id: str, *, runner: str, now: float) -> bool: ...

    async def append(self, job_id: str, chunks: Sequence[str], *, first_seq: int, now: float) -> bool: ...

    async def finish(self, job: JobRecord, status: JobStatus, *, error: Mapping[str, Any] | None,
                     chunks: Sequence[str], first_seq: int, now: float, ttl_s: float) -> bool:
        """The job's last word (with its last chunks), if it is still unfinished."""
        ...

    async def delete(self, job: JobRecord) -> bool: ...

    async def sweep(self, now: float) -> int:
        """Forget expired jobs; how many."""
        ...

    async def fail_abandoned(self, *, runner: str, running: Collection[str], now: float, ttl_s: float,
                             error: Mapping[str, Any]) -> int:
        """Mark failed every unfinished job that no gateway runs: this gateway's (`runner`) that are not
        in `running`, and (a shared store) those of gateways that stopped beating. How many."""
        ...

    async def finished_among(self, job_ids: Collection[str]) -> set[str]:
        """Those of `job_ids` that are finished or gone (cancelled from another gateway, say)."""
        ...

    async def heartbeat(self, runner: str, ttl_s: float) -> None:
        """This gateway still runs its jobs (for a store that gateways share)."""
        ...

    async def retire(self, runner: str) -> None:
        """This gateway stops: its beat ends at once."""
        ...

    def health(self) -> dict[str, Any]: ...
