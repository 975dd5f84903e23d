"""JobsActor: runs chat jobs (and other work that outlives the request that started it) and keeps
their store tidy.

The web layer hands it the work as a callable: `submit(owner, work)` persists a job and runs
`work(output)`, which writes the job's result chunks to `output` and returns (the job is
`completed`) or raises `JobFailed` (it is `failed`, with that error). `start_run(work)` runs work
that is not a job (a streamed deep-research run whose client holds the connection) in the same
nursery, so that it outlives the handler's call stack and stops with the gateway.

Limits, per gateway process: `jobs.max_running` jobs at once (503 beyond), `jobs.max_running_per_key`
per key (429), and at most `jobs.max_stored_per_key` kept per key (429). A job whose result would
go over `jobs.max_result_bytes` fails, saying so: an answer cut short must not read as whole.

Chunks are written in batches (at most every `FLUSH_S`, or once `FLUSH_BYTES` wait, and when the
work is idle), so a chunk of a stream is not a disk write. What becomes of a job when things go wrong:
- DELETE of a running job (here, or sent to another gateway sharing the store) ends it `failed` with
  error `cancelled`; the run stops at once here, at its next write elsewhere (or at the next sweep).
- The gateway stops: once its HTTP server has stopped, its running jobs end `failed`
  (`job_interrupted`, `interrupt_all`), and whatever is still unfinished is marked so as the actor
  ends; a gateway that could not say so (killed) has them marked at its next start, or, with a shared
  store, by any other gateway once its beat has expired (`BEAT_TTL_S`).
- Every `jobs.sweep_interval_s`: expired jobs are forgotten, and abandoned ones marked failed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.jobs.records import (
    CANCELLED,
    INTERRUPTED,
    JobRecord,
    JobStatus,
    JobStore,
    JobStoreUnavailable,
    job_error,
)
from config.settings import JobsSettings

log = logging.getLogger("sn1_gateway.jobs")

FLUSH_S = 0.5  # the longest a chunk waits in memory before it is written
FLUSH_BYTES = 256 * 1024
BEAT_S = 5.0  # how often this gateway says, in a shared store, that it still runs its jobs
BEAT_TTL_S = 30.0  # ... and how long that holds
STOP_WRITE_S = 2.0  # at shutdown, marking this gateway's running jobs failed
FINAL_WRITE_S = 5.0  # a job's last word
CANCEL_WAIT_S = 5.0  # DELETE waits this long for the cancelled job's last word
RETRY_AFTER_S = 5


class JobFailed(Exception):
    """Raised by a job's work: the job ends `failed` with `error` (an OpenAI error object)."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        super().__init__(str(error.get("message", "")))
        self.error = error


class JobsBusy(Exception):
    """No more jobs may start now: `status` 429 (this key's limit) or 503 (the gateway's)."""

    def __init__(self, message: str, *, status: int, code: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s


class JobsUnavailable(Exception):
    """The runner is not running (restarting): nothing can start."""


@dataclass(eq=False)
class RunningJob:
    record: JobRecord
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancelled: bool = False  # by DELETE, here
    interrupted: bool = False  # by the gateway stopping
    done: trio.Event = field(default_factory=trio.Event)


class JobOutput:
    """Where a job's work writes its result: chunks kept in order, written to the store in batches."""

    def __init__(self, actor: JobsActor, job: RunningJob) -> None:
        self._actor = actor
        self._job = job
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.total_bytes = 0
        self.written = 0  # chunks the store holds: the position of the first pending one
        self._written_at = trio.current_time()

    async def append(self, chunk: str) -> None:
        """One chunk of the result. Raises JobFailed when the result would go over its bound."""
        size = len(chunk.encode())
        limit = self._actor.settings.max_result_bytes
        if self.total_bytes + size > limit:
            self._actor.too_large += 1
            raise JobFailed(job_error(f"The answer went over the job's result limit of {limit} bytes "
                                      "(jobs.max_result_bytes).", "job_result_too_large"))
        self.pending.append(chunk)
        self.pending_bytes += size
        self.total_bytes += size
        if self.pending_bytes >= FLUSH_BYTES or trio.current_time() - self._written_at >= FLUSH_S:
            await self.flush()

    async def tick(self) -> None:
        """The work is waiting: write what waits, if it has waited long enough."""
        if self.pending and trio.current_time() - self._written_at >= FLUSH_S:
            await self.flush()

    async def flush(self) -> None:
        self._written_at = trio.current_time()
        if not self.pending:
            return
        actor = self._actor
        try:
            wanted = await actor.store.append(self._job.record.id, self.pending, first_seq=self.written,
                                              now=actor.wall_clock())
        except JobStoreUnavailable as exc:  # kept, and tried again at the next flush
            actor.write_failures += 1
            log.warning("job %s: chunks not written yet: %s", self._job.record.id, exc)
            return
        self.written += len(self.pending)
        self.pending, self.pending_bytes = [], 0
        if not wanted:  # cancelled, or finished, by another gateway
            self._job.scope.cancel()


Work = Callable[[JobOutput], Awaitable[None]]


class JobsActor:
    name = "jobs"

    def __init__(self, store: JobStore, settings: JobsSettings, *, wall_clock: Callable[[], float] = time.time,
                 runner_id: str | None = None) -> None:
        self.store = store
        self.settings = settings
        self.wall_clock = wall_clock
        self.runner_id = runner_id or uuid.uuid4().hex
        self._nursery: trio.Nursery | None = None
        self._beating = False  # the store has heard from this gateway: jobs may start
        self._stopping = False
        self._running: dict[str, RunningJob] = {}
        self._per_key: dict[str, int] = {}
        self.runs_running = 0  # work that is not a job (streamed deep research)
        self.created = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.refused: dict[str, int] = {"running": 0, "running_per_key": 0, "stored_per_key": 0}
        self.abandoned = 0  # jobs found unfinished with nobody running them, marked failed
        self.expired = 0
        self.too_large = 0
        self.write_failures = 0
        self.lost_writes = 0  # a job's last word that could not be written (the next sweep marks it failed)
        self.defects = 0
        self.last_error: str | None = None

    # -- life ---------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[JobsActor] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves at once; the store is first asked in the background (beat, then the first sweep marks
        jobs an earlier run left unfinished), so a slow store delays jobs, not the gateway's start."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._beat)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._beating = False
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_WRITE_S):
                try:
                    stopped = await self.store.fail_abandoned(
                        runner=self.runner_id, running=(), now=self.wall_clock(), ttl_s=self.settings.ttl_s,
                        error=INTERRUPTED)
                    self.failed += stopped
                    await self.store.retire(self.runner_id)
                except JobStoreUnavailable as exc:
                    log.warning("jobs: running jobs not marked failed at stop (the next start will): %s", exc)

    def interrupt_all(self) -> int:
        """The gateway is stopping: no job starts any more, and the running ones end now, `failed`
        (`job_interrupted`), letting go of their fan-outs (still heard out for scoring). How many."""
        self._stopping = True
        running = [job for job in self._running.values() if not job.done.is_set()]
        for job in running:
            job.interrupted = True
            job.scope.cancel()
        return len(running)

    async def _fail_abandoned(self) -> int:
        found = await self.store.fail_abandoned(runner=self.runner_id, running=set(self._running),
                                                now=self.wall_clock(), ttl_s=self.settings.ttl_s, error=INTERRUPTED)
        self.abandoned += found
        return found

    async def _beat(self) -> None:
        """Say that this gateway runs its jobs (before any is accepted), then sweep now and every
        `sweep_interval_s`, beating every `BEAT_S` meanwhile."""
        next_sweep = trio.current_time()
        while True:
            try:
                await self.store.heartbeat(self.runner_id, BEAT_TTL_S)
                self._beating = True
                if trio.current_time() >= next_sweep:
                    await self.sweep_now()
                    next_sweep = trio.current_time() + self.settings.sweep_interval_s
            except JobStoreUnavailable as exc:
                self.last_error = str(exc)
                log.warning("jobs: the job store failed (tried again in %gs): %s", BEAT_S, exc)
            await trio.sleep_until(min(trio.current_time() + BEAT_S, next_sweep))

    async def sweep_now(self) -> None:
        """Forget expired jobs, mark abandoned ones failed, and stop jobs finished elsewhere."""
        self.expired += await self.store.sweep(self.wall_clock())
        if found := await self._fail_abandoned():
            log.info("jobs: %d unfinished jobs that no gateway runs any more marked failed", found)
        gone = await self.store.finished_among([i for i, job in self._running.items() if not job.done.is_set()])
        for job_id in gone:
            job = self._running.get(job_id)
            if job is not None:
                job.scope.cancel()

    # -- jobs ---------------------------------------------------------------------------------------------

    async def submit(self, owner: str, work: Work) -> JobRecord:
        """Create a job for `owner` (an API key's id) and start `work` for it; the job as created
        (pending). Raises JobsBusy past a limit, JobsUnavailable, JobStoreUnavailable."""
        if self._nursery is None or not self._beating or self._stopping:
            raise JobsUnavailable("the job runner is starting or stopping, or cannot reach its store")
        settings = self.settings
        if len(self._running) >= settings.max_running:
            self.refused["running"] += 1
            raise JobsBusy(f"{len(self._running)} jobs are running in this gateway, its limit (jobs.max_running)",
                           status=503, code="jobs_busy")
        if self._per_key.get(owner, 0) >= settings.max_running_per_key:
            self.refused["running_per_key"] += 1
            raise JobsBusy(f"This API key has {settings.max_running_per_key} jobs running, its limit; wait for one "
                           "to finish.", status=429, code="too_many_running_jobs")
        now = self.wall_clock()
        record = JobRecord(str(uuid.uuid4()), owner, JobStatus.PENDING, now, now, now + settings.ttl_s,
                           runner=self.runner_id)
        job = RunningJob(record)
        self._running[record.id] = job  # from now on: counted, and never taken for abandoned
        self._per_key[owner] = self._per_key.get(owner, 0) + 1
        started = False
        try:
            if await self.store.count_owned(owner, now) >= settings.max_stored_per_key:
                self.refused["stored_per_key"] += 1
                raise JobsBusy(f"This API key keeps {settings.max_stored_per_key} jobs, its limit; delete some "
                               "or wait until they expire.", status=429, code="too_many_jobs",
                               retry_after_s=60)
            await self.store.create(record)
            if self._nursery is None:
                raise JobsUnavailable("the job runner is restarting")
            self._nursery.start_soon(self._run_job, job, work)
            started = True
        finally:
            if not started:
                self._forget(job)
        self.created += 1
        return record

    def _forget(self, job: RunningJob) -> None:
        self._running.pop(job.record.id, None)
        owner = job.record.owner
        left = self._per_key.get(owner, 1) - 1
        if left > 0:
            self._per_key[owner] = left
        else:
            self._per_key.pop(owner, None)
        job.done.set()

    async def _run_job(self, job: RunningJob, work: Work) -> None:
        record = job.record
        output = JobOutput(self, job)
        status: JobStatus | None = None
        error: Mapping[str, Any] | None = None
        try:
            with job.scope:
                if await self.store.start(record.id, runner=self.runner_id, now=self.wall_clock()):
                    try:
                        await work(output)
                    except JobFailed as exc:
                        status, error = JobStatus.FAILED, exc.error
                    else:
                        status, error = JobStatus.COMPLETED, None
            if job.scope.cancelled_caught:
                if job.cancelled:
                    status, error = JobStatus.FAILED, CANCELLED
                elif job.interrupted:
                    status, error = JobStatus.FAILED, INTERRUPTED
                else:  # finished elsewhere
                    status, error = None, None
        except JobStoreUnavailable as exc:
            status, error = JobStatus.FAILED, job_error(f"The job store failed: {exc}", "job_store_unavailable")
        except Exception as exc:  # a defect in the work costs its job, not the runner
            log.exception("job %s: unexpected error", record.id)
            self.defects += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            status, error = JobStatus.FAILED, job_error("The gateway failed while running this job.", "internal_error")
        finally:
            try:
                if status is not None:
                    await self._finish(job, output, status, error)
            finally:
                self._forget(job)

    async def _finish(self, job: RunningJob, output: JobOutput, status: JobStatus,
                      error: Mapping[str, Any] | None) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_S) as scope:
            try:
                await self.store.finish(job.record, status, error=error, chunks=output.pending,
                                        first_seq=output.written, now=self.wall_clock(), ttl_s=self.settings.ttl_s)
            except JobStoreUnavailable as exc:
                self.lost_writes += 1
                log.warning("job %s: its end (%s) not written: %s", job.record.id, status.value, exc)
                return
        if scope.cancelled_caught:
            self.lost_writes += 1
            return
        if error is CANCELLED:
            self.cancelled += 1
        elif status is JobStatus.COMPLETED:
            self.completed += 1
        else:
            self.failed += 1

    async def get(self, owner: str, job_id: str) -> JobRecord | None:
        """`owner`'s job, or None (unknown, expired, or another key's)."""
        job = await self.store.get(job_id)
        return job if job is not None and job.owner == owner else None

    async def cancel(self, owner: str, job_id: str) -> JobRecord | None:
        """DELETE: a pending or running job is stopped and kept as `failed` (error `cancelled`); a finished
        one is forgotten. The job as it then is (or was), or None (unknown or another key's)."""
        job = await self.get(owner, job_id)
        if job is None:
            return None
        if job.finished:
            await self.store.delete(job)
            return job
        running = self._running.get(job_id)
        if running is not None:
            running.cancelled = True
            running.scope.cancel()
            with trio.move_on_after(CANCEL_WAIT_S):
                await running.done.wait()
        elif await self.store.finish(job, JobStatus.FAILED, error=CANCELLED, chunks=(), first_seq=0,
                                     now=self.wall_clock(), ttl_s=self.settings.ttl_s):
            self.cancelled += 1  # another gateway runs it: it stops at its next write, or its next sweep
        return await self.store.get(job_id) or job

    # -- other work ---------------------------------------------------------------------------------------

    def start_run(self, work: Callable[[], Awaitable[None]]) -> trio.CancelScope:
        """Run `work` (not a job: nothing is stored) until it returns or the scope handed back is cancelled."""
        if self._nursery is None:
            raise JobsUnavailable("the job runner is restarting")
        scope = trio.CancelScope()
        self._nursery.start_soon(self._background, work, scope)
        return scope

    async def _background(self, work: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        self.runs_running += 1
        try:
            with scope:
                await work()
        except Exception as exc:  # a defect in the work costs that run, not the runner
            log.exception("background run: unexpected error")
            self.defects += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.runs_running -= 1

    def health(self) -> dict[str, Any]:
        return {
            "running": len(self._running), "keys_running": len(self._per_key), "runs_running": self.runs_running,
            "created": self.created, "completed": self.completed, "failed": self.failed,
            "cancelled": self.cancelled, "refused": dict(self.refused), "abandoned": self.abandoned,
            "expired": self.expired, "too_large": self.too_large, "write_failures": self.write_failures,
            "lost_writes": self.lost_writes, "defects": self.defects, "last_error": self.last_error,
            "store": self.store.health(),
        }
