"""Chat jobs: their store (an SQLite file, or Redis shared by gateways) and the actor that runs them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from actors.jobs.records import (
    CANCELLED,
    INTERRUPTED,
    JobRecord,
    JobStatus,
    JobStore,
    JobStoreError,
    JobStoreUnavailable,
    job_error,
)
from actors.jobs.runner import JobFailed, JobOutput, JobsActor, JobsBusy, JobsUnavailable, Work
from config.settings import Settings

__all__ = [
    "CANCELLED", "INTERRUPTED", "JobFailed", "JobOutput", "JobRecord", "JobStatus", "JobStore", "JobStoreError",
    "JobStoreUnavailable", "JobsActor", "JobsBusy", "JobsUnavailable", "Work", "job_error", "open_job_store",
]


@asynccontextmanager
async def open_job_store(settings: Settings) -> AsyncIterator[JobStore]:
    """The store `auth.store` calls for: Redis (the key store's) or the SQLite file `jobs.file`. A file
    that is not a usable database, or an unreachable Redis, is a JobStoreError here, at start."""
    timeout_s = settings.jobs.store_timeout_s
    if settings.auth.store == "redis":
        from actors.jobs.redisstore import RedisJobStore

        async with RedisJobStore.connect(settings.auth.redis_url, timeout_s=timeout_s) as redis_store:
            yield redis_store
        return
    from actors.jobs.sqlitestore import SqliteJobStore

    store = await SqliteJobStore.open(Path(settings.resolve(settings.jobs.file)), timeout_s=timeout_s)
    try:
        yield store
    finally:
        await store.close()
