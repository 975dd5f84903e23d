"""The `file` key store: the keys file, mirrored in memory so that authorising a request does no I/O.

The hot path (`check_nowait`) is one dict lookup and one limiter step. Usage is counted in memory and
added to the file by the background flush (`maintain`), and at shutdown (`flush`). Changes made by
other writers (the CLI, another process) are noticed by watching the file's signature and reloaded.
Without a path the store lives only in memory (tests, and a Services built without a gateway).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from actors.keystore import keyfile, limiter
from actors.keystore.keyfile import Signature, Snapshot
from actors.keystore.records import (
    INT64_MAX,
    Denial,
    Grant,
    ImportReport,
    KeyInfo,
    KeyNotFound,
    KeyStoreError,
    KeyStoreUnavailable,
    LegacyKey,
    UsageGuard,
    candidate_ids,
    check_rate_limit,
    display_prefix,
    key_id_of,
    new_api_key,
    saturating_add,
)
from actors.keystore.throttle import DEFAULT_PER_MINUTE, FailedAuthThrottle

log = logging.getLogger("sn1_gateway.keys")

T = TypeVar("T")

_UNKNOWN = Denial("unknown")
_BLOCKED = Denial("blocked", retry_after_s=60)


class _Entry:
    """One key in memory: what the file says, the limiter's bucket (and the limit it was kept at),
    and usage not yet flushed."""

    __slots__ = ("bucket_at_ms", "bucket_level", "bucket_limit", "info", "pending_last_used",
                 "pending_requests", "pending_tokens")

    def __init__(self, info: KeyInfo) -> None:
        self.info = info
        self.bucket_level: int | None = None
        self.bucket_at_ms = 0
        self.bucket_limit = info.rate_limit
        self.pending_requests = 0
        self.pending_tokens = 0
        self.pending_last_used: float | None = None

    def current(self) -> KeyInfo:
        info = self.info
        if not (self.pending_requests or self.pending_tokens or self.pending_last_used):
            return info
        return replace(
            info,
            requests=saturating_add(info.requests, self.pending_requests),
            tokens=saturating_add(info.tokens, self.pending_tokens),
            last_used_at=self.pending_last_used or info.last_used_at,
        )


# Usage not yet written: key id -> (requests, tokens, last used).
Pending = dict[str, tuple[int, int, float | None]]


def _merge_usage(keys: dict[str, KeyInfo], pending: Pending, guard: UsageGuard) -> None:
    """Add usage counted here to what the file holds now (usage of keys deleted meanwhile is dropped);
    totals saturate at INT64_MAX."""
    for key_id, (requests, tokens, last_used) in pending.items():
        info = keys.get(key_id)
        if info is None:
            continue
        total_requests = saturating_add(info.requests, requests)
        total_tokens = saturating_add(info.tokens, tokens)
        if INT64_MAX in (total_requests, total_tokens):
            guard.saturate(key_id)
        keys[key_id] = replace(
            info,
            requests=total_requests,
            tokens=total_tokens,
            last_used_at=max(last_used, info.last_used_at or 0.0) if last_used else info.last_used_at,
        )


def _find(keys: dict[str, KeyInfo], ref: str) -> str:
    for key_id in candidate_ids(ref):
        if key_id in keys:
            return key_id
    raise KeyNotFound("no such API key")


class FileKeyStore:
    backend = "file"

    def __init__(
        self,
        path: Path | None = None,
        *,
        watch_interval_s: float = 0.5,
        flush_interval_s: float = 2.0,
        wall_clock: Callable[[], float] = time.time,
        failed_auth_per_minute: int = DEFAULT_PER_MINUTE,
    ) -> None:
        self.path = path
        self.watch_interval_s = watch_interval_s
        self.flush_interval_s = flush_interval_s
        self.wall_clock = wall_clock
        self._entries: dict[str, _Entry] = {}
        self._signature: Signature | None = None
        self._write_lock = trio.Lock()
        self._dirty = False
        self.last_error: str | None = None
        self.reloads = 0
        self.flushes = 0
        self.usage = UsageGuard(log)
        self.failed_auth = FailedAuthThrottle(failed_auth_per_minute)

    @classmethod
    async def open(cls, path: Path | None, **kw: Any) -> FileKeyStore:
        """Load the file (a missing file is an empty store; a corrupt one a KeyStoreError)."""
        store = cls(path, **kw)
        if path is not None:
            store._adopt(await trio.to_thread.run_sync(keyfile.read, path))
        return store

    # -- the hot path -------------------------------------------------------------------------------

    async def check(self, api_key: str) -> Grant | Denial:
        return self.check_nowait(api_key)

    def check_nowait(self, api_key: str) -> Grant | Denial:
        key_id = key_id_of(api_key)
        entry = self._entries.get(key_id)
        if entry is None:
            return _UNKNOWN
        limit = entry.info.rate_limit
        if limit <= 0:
            return _BLOCKED
        now_ms = math.floor(trio.current_time() * 1000)
        if entry.bucket_limit != limit:  # changed since the bucket was last kept: it applies at once
            if entry.bucket_level is not None:
                entry.bucket_level = limiter.rescale(entry.bucket_level, entry.bucket_at_ms, entry.bucket_limit,
                                                     limit, now_ms)
                entry.bucket_at_ms = now_ms
            entry.bucket_limit = limit
        outcome = limiter.take(entry.bucket_level, entry.bucket_at_ms, limit, now_ms)
        reset_s = limiter.ceil_seconds(outcome.reset_ms)
        if not outcome.allowed:
            return Denial("rate_limited", limit, reset_s, max(1, limiter.ceil_seconds(outcome.retry_after_ms)))
        entry.bucket_level, entry.bucket_at_ms = outcome.level, now_ms
        entry.pending_requests = saturating_add(entry.pending_requests, 1)
        entry.pending_last_used = self.wall_clock()
        self._dirty = True
        return Grant(key_id, entry.info.prefix, limit, outcome.remaining, reset_s)

    def record_usage_nowait(self, key_id: str, *, tokens: int) -> None:
        checked = self.usage.tokens(tokens)
        entry = self._entries.get(key_id)
        if entry is None or not checked:
            return
        entry.pending_tokens = saturating_add(entry.pending_tokens, checked)
        self._dirty = True

    # -- reading --------------------------------------------------------------------------------------

    async def list_keys(self) -> list[KeyInfo]:
        return sorted((e.current() for e in self._entries.values()), key=lambda i: (i.created_at, i.id))

    async def info(self, key_id: str) -> KeyInfo | None:
        entry = self._entries.get(key_id)
        return None if entry is None else entry.current()

    # -- changes --------------------------------------------------------------------------------------

    async def create(self, rate_limit: int) -> tuple[str, KeyInfo]:
        check_rate_limit(rate_limit)
        api_key = new_api_key()
        info = KeyInfo(key_id_of(api_key), display_prefix(api_key), rate_limit, self.wall_clock())

        def change(keys: dict[str, KeyInfo]) -> KeyInfo:
            keys[info.id] = info
            return info

        return api_key, await self._transact(change)

    async def modify(self, ref: str, rate_limit: int) -> KeyInfo:
        check_rate_limit(rate_limit)

        def change(keys: dict[str, KeyInfo]) -> KeyInfo:
            key_id = _find(keys, ref)
            keys[key_id] = replace(keys[key_id], rate_limit=rate_limit)
            return keys[key_id]

        return await self._transact(change)

    async def delete(self, ref: str) -> KeyInfo:
        def change(keys: dict[str, KeyInfo]) -> KeyInfo:
            return keys.pop(_find(keys, ref))

        return await self._transact(change)

    async def import_keys(self, entries: list[LegacyKey]) -> ImportReport:
        now = self.wall_clock()

        def change(keys: dict[str, KeyInfo]) -> ImportReport:
            added = 0
            for entry in entries:
                key_id = key_id_of(entry.key)
                if key_id in keys:
                    continue
                keys[key_id] = KeyInfo(key_id, display_prefix(entry.key), entry.rate_limit, now,
                                       requests=entry.usage)
                added += 1
            return ImportReport(added, len(entries) - added)

        return await self._transact(change)

    async def flush(self) -> None:
        """Write usage counted since the last flush (a no-op when there is none)."""
        if self._dirty:
            await self._transact(lambda keys: None)
            self.flushes += 1

    # -- background -------------------------------------------------------------------------------------

    async def maintain(self) -> None:
        """Reload on outside changes (every `watch_interval_s`), flush usage (every `flush_interval_s`)."""
        if self.path is None:
            await trio.sleep_forever()
        next_flush = trio.current_time() + self.flush_interval_s
        while True:
            await trio.sleep(self.watch_interval_s)
            try:
                await self.reload_if_changed()
                if trio.current_time() >= next_flush:
                    next_flush = trio.current_time() + self.flush_interval_s
                    await self.flush()
            except KeyStoreError as exc:
                # Keep serving the last good keys; the health report shows the problem.
                if str(exc) != self.last_error:
                    log.error("key store: %s", exc)
                self.last_error = str(exc)

    async def reload_if_changed(self) -> bool:
        """Reload the file if another writer replaced it; True if it did."""
        if self.path is None:
            return False
        path = self.path
        if await trio.to_thread.run_sync(keyfile.signature, path) == self._signature:
            return False
        async with self._write_lock:
            snapshot = await trio.to_thread.run_sync(keyfile.read, path)
            if snapshot.signature == self._signature:
                return False
            self._adopt(snapshot)
        self.reloads += 1
        log.info("key store: reloaded %s (%d keys)", path, len(self._entries))
        return True

    def health(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "path": None if self.path is None else str(self.path),
            "keys": len(self._entries),
            "unflushed_usage": self._dirty,
            "reloads": self.reloads,
            "flushes": self.flushes,
            **self.usage.statistics(),
            "last_error": self.last_error,
            "failed_auth": self.failed_auth.statistics(),
        }

    # -- internals ------------------------------------------------------------------------------------

    def _take_pending(self) -> Pending:
        pending: Pending = {}
        for key_id, entry in self._entries.items():
            if entry.pending_requests or entry.pending_tokens or entry.pending_last_used:
                pending[key_id] = (entry.pending_requests, entry.pending_tokens, entry.pending_last_used)
                entry.pending_requests = entry.pending_tokens = 0
                entry.pending_last_used = None
        self._dirty = False
        return pending

    def _restore_pending(self, pending: Pending) -> None:
        for key_id, (requests, tokens, last_used) in pending.items():
            entry = self._entries.get(key_id)
            if entry is not None:
                entry.pending_requests = saturating_add(entry.pending_requests, requests)
                entry.pending_tokens = saturating_add(entry.pending_tokens, tokens)
                entry.pending_last_used = entry.pending_last_used or last_used
                self._dirty = True

    async def _transact(self, change: Callable[[dict[str, KeyInfo]], T]) -> T:
        """Apply `change` to the stored keys together with the pending usage, durably, then adopt them."""
        async with self._write_lock:
            pending = self._take_pending()

            def work(keys: dict[str, KeyInfo]) -> T:
                result = change(keys)
                _merge_usage(keys, pending, self.usage)
                return result

            try:
                if self.path is None:
                    keys = {key_id: entry.info for key_id, entry in self._entries.items()}
                    result = work(keys)
                    snapshot = Snapshot(keys, None)
                else:
                    result, snapshot = await trio.to_thread.run_sync(keyfile.transact, self.path, work)
            except KeyStoreError as exc:
                self._restore_pending(pending)
                raise KeyStoreUnavailable(str(exc)) from exc
            except BaseException:
                self._restore_pending(pending)
                raise
            self._adopt(snapshot, written=True)
            self.last_error = None
            return result

    def _adopt(self, snapshot: Snapshot, *, written: bool = False) -> None:
        """Make the stored keys current, keeping each surviving key's bucket and unflushed usage."""
        entries: dict[str, _Entry] = {}
        for key_id, info in snapshot.keys.items():
            entry = self._entries.get(key_id)
            if entry is None:
                entry = _Entry(info)
            else:
                entry.info = info
            entries[key_id] = entry
        self._entries = entries
        self._signature = snapshot.signature
        for problem in snapshot.problems:  # repaired in memory; the next write (now, if none was) repairs the file
            self.usage.repair(problem.where, problem.found, problem.problem)
            self._dirty = self._dirty or not written
