"""WorkerPeers: with `server.workers > 1`, each worker's report is in Redis, so any worker answers for all.

A client reaches whichever worker the kernel hands its connection to, so `/metrics` and `/status` must
show the whole gateway. Every `interval_s` each worker writes what it would report alone (a snapshot
built by the web layer: its metrics text and its status figures) under its own key, kept `ttl_s`; a
worker answering for the gateway reads the others' with one MGET. A worker that stopped publishing
drops out once its key expires. Redis is what the workers already share (`auth.store = "redis"`).

A report holds only figures each worker has at hand (its parts' `health()`, its telemetry): nothing
that costs a round trip to build, such as the key listing, which `/status/data` reads once from the
shared store when it is asked. Another worker's report is read as untrusted bytes: bounded in size
and depth, one that does not read is skipped, counted (`bad_reports`) and logged once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from wire import jsonio

log = logging.getLogger("sn1_gateway.workers")

KEY_PREFIX = "sn1-gateway:worker"
MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024  # one worker's report; more is its failure, not read
MAX_SNAPSHOT_DEPTH = 8  # a report nests 4 deep (status, miners, a row, its fields); more is not read
Snapshot = Callable[[], Awaitable[dict[str, Any]]]


class WorkerPeers:
    name = "workers"

    def __init__(self, redis_url: str, *, group: str, index: int, count: int, snapshot: Snapshot,
                 interval_s: float = 2.0, ttl_s: float = 10.0, timeout_s: float = 3.0) -> None:
        """`group` tells this gateway's workers from another gateway's on the same Redis (host:port)."""
        self.redis_url = redis_url
        self.group = group
        self.index = index
        self.count = count
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._client: Any = None
        self.published = 0
        self.failures = 0
        self.bad_reports = 0  # other workers' reports that could not be read (skipped)
        self.last_error: str | None = None
        self._bad_logged: set[int] = set()  # workers whose bad report was logged, until one reads again

    def key(self, index: int) -> str:
        return f"{KEY_PREFIX}:{self.group}:{index}"

    async def run(self, *, task_status: trio.TaskStatus[WorkerPeers] = trio.TASK_STATUS_IGNORED) -> None:
        import coredis

        async with coredis.Redis.from_url(self.redis_url, decode_responses=False) as client:
            self._client = client
            try:
                task_status.started(self)
                while True:  # the first report once this worker has started serving
                    await trio.sleep(self.interval_s)
                    await self._publish()
            finally:
                self._client = None

    async def _publish(self) -> None:
        from coredis.exceptions import RedisError

        try:
            report = await self.snapshot()
            body = jsonio.dumps({"index": self.index, "pid": os.getpid(), "time": time.time(), **report})
            with trio.fail_after(self.timeout_s):
                await self._client.set(self.key(self.index), body, px=int(self.ttl_s * 1000))
        except (RedisError, OSError, trio.TooSlowError) as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("worker %d: cannot publish its report to Redis (%s)", self.index, self.last_error)
            return
        self.published += 1
        self.last_error = None

    async def others(self) -> list[dict[str, Any]]:
        """The other workers' latest reports (those that published within `ttl_s`), by index."""
        from coredis.exceptions import RedisError

        if self._client is None:
            return []
        indexes = [i for i in range(self.count) if i != self.index]
        try:
            with trio.fail_after(self.timeout_s):
                values = await self._client.mget([self.key(i) for i in indexes])
        except (RedisError, OSError, trio.TooSlowError) as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return []
        reports = []
        for index, value in zip(indexes, values, strict=True):
            if value is None:
                continue  # not published within ttl_s: that worker is gone
            report = self._read(index, value)
            if report is not None:
                reports.append(report)
        return reports

    def _read(self, index: int, value: bytes) -> dict[str, Any] | None:
        """Worker `index`'s report, or None (counted, logged once until it reads again) if it does not read."""
        problem: str | None = None
        report: Any = None
        if len(value) > MAX_SNAPSHOT_BYTES:
            problem = f"{len(value)} bytes, more than {MAX_SNAPSHOT_BYTES}"
        else:
            try:
                report = jsonio.loads_bounded(value, max_depth=MAX_SNAPSHOT_DEPTH)
            except ValueError as exc:
                problem = f"not JSON nested at most {MAX_SNAPSHOT_DEPTH} deep ({exc})"[:200]
        if problem is None and isinstance(report, dict) and report.get("index") == index:
            self._bad_logged.discard(index)
            return report
        self.bad_reports += 1
        if index not in self._bad_logged:
            self._bad_logged.add(index)
            log.warning("worker %d: the report of worker %d is skipped: %s", self.index, index,
                        problem or "not a report of that worker")
        return None

    def health(self) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "published": self.published,
                "failures": self.failures, "bad_reports": self.bad_reports, "last_error": self.last_error}
