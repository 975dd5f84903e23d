"""The `file` job store: an SQLite file (WAL), for a gateway whose keys live in a file.

One gateway process owns the file, so at start every job left unfinished in it was left by an earlier
process. Each call runs in a worker thread, one at a time (one connection; SQLite's own locking is not
relied on between threads), and is bounded by `timeout_s`: a call that takes longer is abandoned
(its thread finishes on its own and only then lets the next one in) and counts as a failure. The file
and its WAL are 0600, a folder created for it 0700: results hold clients' answers.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

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

log = logging.getLogger("sn1_gateway.jobs")

T = TypeVar("T")
FILE_MODE = 0o600
FOLDER_MODE = 0o700

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    error TEXT,
    runner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, expires_at);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    chunk TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""
_UNFINISHED = tuple(s.value for s in UNFINISHED)
_OPEN = f"status IN ({', '.join('?' * len(_UNFINISHED))})"




def _status(text: str) -> JobStatus:
    try:
        return JobStatus(text)
    except ValueError:
        return JobStatus.FAILED


def _prepare(path: Path) -> None:
    """The folder (0700 when made here) and the file (0600) exist before SQLite opens it."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=FOLDER_MODE)
        os.chmod(path.parent, FOLDER_MODE)  # mkdir's mode is filtered by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    _prepare(path)
    conn = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        conn.execute("SELECT count(*) FROM jobs").fetchone()  # a file that is not a database fails here
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteJobStore:
    backend = "file"

    def __init__(self, conn: sqlite3.Connection, path: Path, *, timeout_s: float = 5.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self.path = path
        self.timeout_s = timeout_s
        self.wall_clock = wall_clock
        self._limiter = trio.CapacityLimiter(1)
        self.failures = 0
        self.last_error: str | None = None

    @classmethod
    async def open(cls, path: Path, **kw: Any) -> SqliteJobStore:
        """The store in `path` (created if absent); a file that is not a usable database is a JobStoreError."""
        try:
            conn = await trio.to_thread.run_sync(_connect, path)
        except (sqlite3.Error, OSError) as exc:
            raise JobStoreError(f"jobs.file: cannot use {path} as the job store ({exc})") from None
        return cls(conn, path, **kw)

    async def close(self) -> None:
        async with self._limiter:  # after a call still running in its thread, if any
            self._conn.close()

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def work() -> T:
            with self._conn:  # one transaction: committed, or rolled back on error
                self._conn.execute("BEGIN IMMEDIATE")
                return fn(self._conn)

        try:
            with trio.fail_after(self.timeout_s):
                return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except (sqlite3.Error, OSError, trio.TooSlowError) as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise JobStoreUnavailable(f"job store {self.path}: {self.last_error}") from exc

    async def create(self, job: JobRecord) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO jobs (id, owner, status, created_at, updated_at, expires_at, error, runner) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (job.id, job.owner, job.status.value, job.created_at, job.updated_at, job.expires_at,
                          error_text(job.error), job.runner))

        await self._call(fn)

    async def get(self, job_id: str) -> JobRecord | None:
        now = self.wall_clock()

        def fn(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute("SELECT id, owner, status, created_at, updated_at, expires_at, error, runner "
                               "FROM jobs WHERE id = ? AND expires_at > ?", (job_id, now)).fetchone()
            if row is None:
                return None
            chunks = tuple(c for (c,) in conn.execute("SELECT chunk FROM chunks WHERE job_id = ? ORDER BY seq",
                                                      (job_id,)))
            return JobRecord(row[0], row[1], _status(row[2]), row[3], row[4], row[5], error_of(row[6]), row[7],
                             chunks)

        return await self._call(fn)

    async def count_owned(self, owner: str, now: float) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            (count,) = conn.execute("SELECT count(*) FROM jobs WHERE owner = ? AND expires_at > ?",
                                    (owner, now)).fetchone()
            return int(count)

        return await self._call(fn)

    async def start(self, job_id: str, *, runner: str, now: float) -> bool:
        def fn(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("UPDATE jobs SET status = ?, runner = ?, updated_at = ? WHERE id = ? AND status = ?",
                                  (JobStatus.RUNNING.value, runner, now, job_id, JobStatus.PENDING.value))
            return cursor.rowcount == 1

        return await self._call(fn)

    @staticmethod
    def _append(conn: sqlite3.Connection, job_id: str, chunks: Sequence[str], first_seq: int, now: float) -> None:
        conn.executemany("INSERT OR IGNORE INTO chunks (job_id, seq, chunk) VALUES (?, ?, ?)",
                         [(job_id, first_seq + i, chunk) for i, chunk in enumerate(chunks)])
        conn.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (now, job_id))

    async def append(self, job_id: str, chunks: Sequence[str], *, first_seq: int, now: float) -> bool:
        def fn(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] != JobStatus.RUNNING.value:
                return False
            if chunks:
                self._append(conn, job_id, chunks, first_seq, now)
            return True

        return await self._call(fn)

    async def finish(self, job: JobRecord, status: JobStatus, *, error: Mapping[str, Any] | None,
                     chunks: Sequence[str], first_seq: int, now: float, ttl_s: float) -> bool:
        def fn(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None or row[0] not in _UNFINISHED:
                return False
            if chunks:
                self._append(conn, job.id, chunks, first_seq, now)
            conn.execute("UPDATE jobs SET status = ?, error = ?, updated_at = ?, expires_at = ? WHERE id = ?",
                         (status.value, error_text(error), now, now + ttl_s, job.id))
            return True

        return await self._call(fn)

    async def delete(self, job: JobRecord) -> bool:
        def fn(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM chunks WHERE job_id = ?", (job.id,))
            return conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,)).rowcount == 1

        return await self._call(fn)

    async def sweep(self, now: float) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            expired = [i for (i,) in conn.execute("SELECT id FROM jobs WHERE expires_at <= ? LIMIT 10000", (now,))]
            conn.executemany("DELETE FROM chunks WHERE job_id = ?", [(i,) for i in expired])
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in expired])
            return len(expired)

        return await self._call(fn)

    async def fail_abandoned(self, *, runner: str, running: Collection[str], now: float, ttl_s: float,
                             error: Mapping[str, Any]) -> int:
        """One process owns the file: an unfinished job this gateway is not running was left by another
        process (an earlier run of it), whatever runner it names."""
        keep = set(running)

        def fn(conn: sqlite3.Connection) -> int:
            ids = [i for (i,) in conn.execute(f"SELECT id FROM jobs WHERE {_OPEN}", _UNFINISHED) if i not in keep]
            conn.executemany("UPDATE jobs SET status = ?, error = ?, updated_at = ?, expires_at = ? WHERE id = ?",
                             [(JobStatus.FAILED.value, error_text(error), now, now + ttl_s, i) for i in ids])
            return len(ids)

        return await self._call(fn)

    async def finished_among(self, job_ids: Collection[str]) -> set[str]:
        wanted = list(job_ids)
        if not wanted:
            return set()

        def fn(conn: sqlite3.Connection) -> set[str]:
            marks = ", ".join("?" * len(wanted))
            open_ = {i for (i,) in conn.execute(f"SELECT id FROM jobs WHERE id IN ({marks}) AND {_OPEN}",
                                                (*wanted, *_UNFINISHED))}
            return set(wanted) - open_

        return await self._call(fn)

    async def heartbeat(self, runner: str, ttl_s: float) -> None:
        """Nothing to do: one process owns the file."""

    async def retire(self, runner: str) -> None:
        """Nothing to do: one process owns the file."""

    def health(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": str(self.path), "failures": self.failures,
                "last_error": self.last_error}
