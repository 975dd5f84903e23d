"""The `redis` job store: jobs in the key store's Redis, so that every gateway using it serves them.

Any gateway answers for any job; the one that runs a job appends its chunks and writes its end. Each
running gateway beats (`sn1gw:jobs:runner:<id>`, a key that expires unless the gateway renews it), so
that when one stops without a word (a crash, kill -9) any other marks its jobs failed once its beat
has expired. Every write that finishes a job (the runner's last word, a cancellation sent to another
gateway) changes it only while it is unfinished, in one script: whichever comes first wins, and the
runner learns at its next write that it was cancelled. Calls are bounded by `timeout_s`.

Layout, under `sn1gw:`: `job:{<id>}` a hash (owner, status, created_at, updated_at, expires_at,
error, runner), `job:{<id>}:chunks` the result (a list), both expiring with the job;
`jobs:unfinished` the set of ids pending or running; `jobs:owner:{<key id>}` a sorted set of a key's
job ids by expiry (to bound how many a key keeps); `jobs:runner:<id>` a gateway's beat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from actors.jobs.records import (
    UNFINISHED,
    JobRecord,
    JobStatus,
    JobStoreError,
    JobStoreUnavailable,
    error_of,
    error_text,
)
from actors.keystore.redisstore import RedisUnreachable, describe_url, pinged_client

if TYPE_CHECKING:
    from coredis import Redis
    from coredis.commands.script import Script

log = logging.getLogger("sn1_gateway.jobs")

T = TypeVar("T")

NAMESPACE = "sn1gw"
# push(key, seq, at): ARGV[at..] are the chunks from position `seq` on; those the list holds already (a
# write tried again) are skipped.
PUSH = """
local function push(key, seq, at)
  local first = at + redis.call('LLEN', key) - tonumber(seq)
  if first < at then first = at end
  for i = first, #ARGV, 1000 do
    redis.call('RPUSH', key, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
"""
# KEYS: job, unfinished, owner. ARGV: id, owner, status, created_at, updated_at, expires_at, runner, ttl ms.
_CREATE = """
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'status', ARGV[3], 'created_at', ARGV[4], 'updated_at', ARGV[5],
           'expires_at', ARGV[6], 'runner', ARGV[7], 'error', '')
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
return 1
"""
_GET = "return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}"
# KEYS: owner. ARGV: now.
_COUNT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""
# KEYS: job. ARGV: runner, now.
_START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'runner', ARGV[1], 'updated_at', ARGV[2])
return 1
"""
# KEYS: job, chunks. ARGV: first seq, now, chunks...
_APPEND = PUSH + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if #ARGV > 2 then
  push(KEYS[2], ARGV[1], 3)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
return 1
"""
# KEYS: job, chunks, unfinished, owner. ARGV: id, status, error, now, expires_at, ttl ms, first seq, chunks...
_FINISH = PUSH + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' and status ~= 'running' then return 0 end
if #ARGV > 7 then push(KEYS[2], ARGV[7], 8) end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'error', ARGV[3], 'updated_at', ARGV[4], 'expires_at', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
return 1
"""
# KEYS: job, chunks, unfinished, owner. ARGV: id.
_DELETE = """
local deleted = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return deleted
"""
# KEYS: jobs. The status of each ('' when gone).
_STATUSES = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGET', KEYS[i], 'status') or '' end
return out
"""
# KEYS: job, unfinished. ARGV: id. {status, runner, owner} ('' when gone: then also out of the set).
_INSPECT = """
local fields = redis.call('HMGET', KEYS[1], 'status', 'runner', 'owner')
if not fields[1] then
  redis.call('SREM', KEYS[2], ARGV[1])
  return {'', '', ''}
end
return {fields[1], fields[2] or '', fields[3] or ''}
"""


def _number(text: str | None) -> float:
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if 0 <= value < 1e11 else 0.0



class RedisJobStore:
    backend = "redis"

    def __init__(self, client: Redis[str], *, url: str = "", timeout_s: float = 5.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.url = describe_url(url)
        self.timeout_s = timeout_s
        self.wall_clock = wall_clock
        self._create: Script[str] = client.register_script(_CREATE)
        self._get: Script[str] = client.register_script(_GET)
        self._count: Script[str] = client.register_script(_COUNT)
        self._start: Script[str] = client.register_script(_START)
        self._append: Script[str] = client.register_script(_APPEND)
        self._finish: Script[str] = client.register_script(_FINISH)
        self._delete: Script[str] = client.register_script(_DELETE)
        self._statuses: Script[str] = client.register_script(_STATUSES)
        self._inspect: Script[str] = client.register_script(_INSPECT)
        self.failures = 0
        self.last_error: str | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **kw: Any) -> AsyncIterator[RedisJobStore]:
        """A store on `url`, checked with a PING (a JobStoreError at once if Redis cannot be reached)."""
        try:
            async with pinged_client(url, kw.get("timeout_s", 5.0)) as client:
                yield cls(client, url=url, **kw)
        except RedisUnreachable as exc:
            raise JobStoreError(f"jobs: {exc}") from None

    async def close(self) -> None:
        """The client is closed by `connect`."""

    # -- naming -----------------------------------------------------------------------------------------

    @staticmethod
    def _job(job_id: str) -> str:
        return f"{NAMESPACE}:job:{{{job_id}}}"

    @staticmethod
    def _chunks(job_id: str) -> str:
        return f"{NAMESPACE}:job:{{{job_id}}}:chunks"

    @staticmethod
    def _owner(owner: str) -> str:
        return f"{NAMESPACE}:jobs:owner:{{{owner}}}"

    @staticmethod
    def _runner(runner: str) -> str:
        return f"{NAMESPACE}:jobs:runner:{runner}"

    _unfinished = f"{NAMESPACE}:jobs:unfinished"

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """One Redis call, bounded in time; Redis problems become JobStoreUnavailable."""
        from coredis.exceptions import RedisError

        try:
            with trio.fail_after(self.timeout_s):
                return await make()
        except (RedisError, OSError, trio.TooSlowError) as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise JobStoreUnavailable(f"Redis at {self.url}: {self.last_error}") from exc

    async def _run(self, script: Script[str], keys: list[str], args: list[str | int | float]) -> Any:
        return await self._call(lambda: script(keys=keys, args=args))

    # -- jobs ---------------------------------------------------------------------------------------------

    async def create(self, job: JobRecord) -> None:
        ttl_ms = max(1, int((job.expires_at - job.created_at) * 1000))
        await self._run(self._create, [self._job(job.id), self._unfinished, self._owner(job.owner)],
                        [job.id, job.owner, job.status.value, repr(job.created_at), repr(job.updated_at),
                         repr(job.expires_at), job.runner, ttl_ms])

    async def get(self, job_id: str) -> JobRecord | None:
        flat, chunks = await self._run(self._get, [self._job(job_id), self._chunks(job_id)], [])
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        if "owner" not in fields:
            return None
        try:
            status = JobStatus(fields.get("status", ""))
        except ValueError:
            status = JobStatus.FAILED
        return JobRecord(job_id, fields["owner"], status, _number(fields.get("created_at")),
                         _number(fields.get("updated_at")), _number(fields.get("expires_at")),
                         error_of(fields.get("error")), fields.get("runner", ""), tuple(chunks))

    async def count_owned(self, owner: str, now: float) -> int:
        return int(await self._run(self._count, [self._owner(owner)], [repr(now)]))

    async def start(self, job_id: str, *, runner: str, now: float) -> bool:
        return bool(await self._run(self._start, [self._job(job_id)], [runner, repr(now)]))

    async def append(self, job_id: str, chunks: Sequence[str], *, first_seq: int, now: float) -> bool:
        return bool(await self._run(self._append, [self._job(job_id), self._chunks(job_id)],
                                    [first_seq, repr(now), *chunks]))

    async def finish(self, job: JobRecord, status: JobStatus, *, error: Mapping[str, Any] | None,
                     chunks: Sequence[str], first_seq: int, now: float, ttl_s: float) -> bool:
        stored_error = error_text(error) or ""
        return bool(await self._run(
            self._finish, [self._job(job.id), self._chunks(job.id), self._unfinished, self._owner(job.owner)],
            [job.id, status.value, stored_error, repr(now), repr(now + ttl_s), max(1, int(ttl_s * 1000)), first_seq,
             *chunks]))

    async def delete(self, job: JobRecord) -> bool:
        return bool(await self._run(
            self._delete, [self._job(job.id), self._chunks(job.id), self._unfinished, self._owner(job.owner)],
            [job.id]))

    async def sweep(self, now: float) -> int:
        """Redis forgets expired jobs itself."""
        return 0

    async def fail_abandoned(self, *, runner: str, running: Collection[str], now: float, ttl_s: float,
                             error: Mapping[str, Any]) -> int:
        ids = sorted(await self._call(lambda: self.client.smembers(self._unfinished)))
        failed = 0
        for job_id in ids:
            if job_id in running:
                continue
            status, job_runner, owner = (str(v) for v in await self._run(
                self._inspect, [self._job(job_id), self._unfinished], [job_id]))
            if status not in UNFINISHED:
                continue
            if job_runner != runner and job_runner:
                beat = self._runner(job_runner)
                if await self._call(lambda beat=beat: self.client.exists([beat])):  # type: ignore[misc]
                    continue  # another gateway runs it
            stub = JobRecord(job_id, owner, JobStatus(status), 0.0, 0.0, 0.0)
            failed += await self.finish(stub, JobStatus.FAILED, error=error, chunks=(), first_seq=0, now=now,
                                        ttl_s=ttl_s)
        return failed

    async def finished_among(self, job_ids: Collection[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        statuses = await self._run(self._statuses, [self._job(i) for i in ids], [])
        return {i for i, status in zip(ids, statuses, strict=True) if status not in UNFINISHED}

    async def heartbeat(self, runner: str, ttl_s: float) -> None:
        await self._call(lambda: self.client.set(self._runner(runner), "1", px=max(1, int(ttl_s * 1000))))

    async def retire(self, runner: str) -> None:
        await self._call(lambda: self.client.delete([self._runner(runner)]))

    def health(self) -> dict[str, Any]:
        return {"backend": self.backend, "url": self.url, "failures": self.failures, "last_error": self.last_error}
