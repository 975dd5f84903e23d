"""The `redis` key store: keys, limits and usage in Redis, shared by every gateway process using it.

Authorising a request is one round trip (a Lua script that checks the key, applies the limit and
counts the request atomically), so a revocation or a limit change made anywhere applies to the next
request everywhere. Token usage is summed in memory and added every second by the background task,
in batches: a batch is sent again, unchanged, until Redis acknowledges it, and a marker written with
it makes it count once even when the first reply was lost. No stored value can make a script fail
half-way (they read and check everything before their first write), and Lua does not roll back.

Layout, under the `sn1gw:` prefix: `key:{<id>}` a hash (prefix, rate_limit, created_at, requests,
tokens, last_used_at), `rl:{<id>}` the limiter's bucket (level, at, the limit it was kept at; expires
once full again), `keys` the set of ids, `flush:<batch>` the marker of a usage batch already added.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from actors.keystore import limiter
from actors.keystore.records import (
    COUNTER_BEYOND,
    COUNTER_CORRUPT,
    COUNTER_SATURATED,
    LUA_COUNTERS,
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
    read_counter,
    saturating_add,
)
from actors.keystore.throttle import DEFAULT_PER_MINUTE, FailedAuthThrottle

if TYPE_CHECKING:
    from coredis import Redis
    from coredis.commands.script import Script

log = logging.getLogger("sn1_gateway.keys")

NAMESPACE = "sn1gw"
MAX_PENDING_KEYS = 65_536  # distinct keys with unflushed token usage; beyond it usage is dropped, counted
LIST_BATCH = 500  # key hashes read per round trip when listing: a bounded reply, few round trips
BATCH_MARKER_TTL_MS = 86_400_000  # a batch resent later than this (a day-long outage) could count twice

# KEYS[1]: the batch's marker; KEYS[2..]: key hashes. ARGV[1]: the marker's lifetime (ms); ARGV[2..]:
# the tokens to add to KEYS[2..] (decimal digits). Returns {1 added | 0 already added, then per key:
# 0 added, 1 no such key, 2 its counter was beyond 2^63-1 (held there), 3 its counter was not a number
# (restarted from this batch), 5 the total reached 2^63-1, 6 an increment that is not a count (skipped)}.
# All reading and arithmetic come first, then the writes, which cannot fail: the batch counts whole or
# not at all.
_ADD_TOKENS = LUA_COUNTERS + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local codes, totals = {}, {}
for i = 2, #KEYS do
  local code, total = 1, nil
  local increment, bad = counter(ARGV[i])
  if bad ~= 0 then
    code = 6
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    local stored, saturated
    stored, code = counter(redis.call('HGET', KEYS[i], 'tokens'))
    total, saturated = counter_add(stored, increment)
    if saturated and code == 0 then code = 5 end
  end
  codes[i - 1], totals[i] = code, total
end
for i = 2, #KEYS do
  if totals[i] then redis.call('HSET', KEYS[i], 'tokens', totals[i]) end
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
table.insert(codes, 1, 1)
return codes
"""

# KEYS: hash, set of ids; ARGV: id, prefix, rate_limit, created_at, requests. 0 if the key exists.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'prefix', ARGV[2], 'rate_limit', ARGV[3], 'created_at', ARGV[4],
           'requests', ARGV[5], 'tokens', 0)
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_MODIFY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'rate_limit', ARGV[1])
return 1
"""

# KEYS: hash, bucket, set of ids; ARGV: id.
_DELETE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""


class RedisUnreachable(Exception):
    """The Redis at a URL did not answer a PING, or the URL names none; the message says which."""


@asynccontextmanager
async def pinged_client(url: str, timeout_s: float) -> AsyncIterator[Redis[str]]:
    """A client of the Redis at `url` (answers decoded) that answered a PING within `timeout_s`,
    closed on exit. Shared by the key store and the job store, which live in the same Redis."""
    import coredis
    from coredis.exceptions import RedisError

    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise RedisUnreachable(f"expected redis://host:port/db (or rediss://, unix://), found {describe_url(url)!r}")
    try:
        client = coredis.Redis.from_url(url, decode_responses=True, connect_timeout=timeout_s,
                                        stream_timeout=timeout_s)
    except ValueError as exc:
        raise RedisUnreachable(f"not a usable Redis URL ({exc})") from None
    problem: str | None = None
    async with client:
        try:
            with trio.fail_after(timeout_s):
                await client.ping()
        except (RedisError, OSError, trio.TooSlowError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            yield client
    if problem is not None:
        raise RedisUnreachable(f"cannot reach Redis at {describe_url(url)} ({problem})")


def describe_url(url: str) -> str:
    """The URL without credentials, for logs and health reports."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _info(key_id: str, fields: dict[str, str], guard: UsageGuard) -> KeyInfo | None:
    """A key's hash as a KeyInfo; a field that does not read is reported to `guard`, never raised."""
    if "rate_limit" not in fields:
        return None

    def number(name: str, default: str = "0") -> int:
        value, problem = read_counter(fields.get(name, default))
        if problem is not None:
            guard.repair(f"key id {key_id[:16]} {name}", fields.get(name), problem)
        return value

    def seconds(name: str, scale: float) -> float | None:
        text = fields.get(name)
        if text is None:
            return None
        try:
            value = float(text) / scale
        except ValueError:
            value = float("nan")
        if not 0 <= value < 1e11:  # NaN, negative, or centuries ahead
            guard.repair(f"key id {key_id[:16]} {name}", text, "not a time")
            return None
        return value

    return KeyInfo(
        id=key_id,
        prefix=fields.get("prefix", ""),
        rate_limit=number("rate_limit"),
        created_at=seconds("created_at", 1.0) or 0.0,
        requests=number("requests"),
        tokens=number("tokens"),
        last_used_at=seconds("last_used_at", 1000.0),
    )


class RedisKeyStore:
    backend = "redis"

    def __init__(
        self,
        client: Redis[str],
        *,
        url: str = "",
        timeout_s: float = 2.0,
        flush_interval_s: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
        failed_auth_per_minute: int = DEFAULT_PER_MINUTE,
        exit_deadline: Callable[[], float] | None = None,
    ) -> None:
        """`exit_deadline()`: the trio time by which the flush at exit (see `connect`) must end."""
        self.client = client
        self.exit_deadline = exit_deadline
        self.url = describe_url(url)
        self.timeout_s = timeout_s
        self.flush_interval_s = flush_interval_s
        self.wall_clock = wall_clock
        self._check: Script[str] = client.register_script(limiter.CHECK_SCRIPT)
        self._add_tokens: Script[str] = client.register_script(_ADD_TOKENS)
        self._create: Script[str] = client.register_script(_CREATE)
        self._modify: Script[str] = client.register_script(_MODIFY)
        self._delete: Script[str] = client.register_script(_DELETE)
        self._pending: dict[str, int] = {}
        # The batch sent and not yet acknowledged: its id and usage, sent again as it is until it is.
        self._batch: tuple[str, dict[str, int]] | None = None
        self.dropped_usage = 0
        self.failures = 0
        self.last_error: str | None = None
        self.usage = UsageGuard(log)
        self.failed_auth = FailedAuthThrottle(failed_auth_per_minute)

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **kw: Any) -> AsyncIterator[RedisKeyStore]:
        """A store on `url`, checked with a PING (failing at once with a KeyStoreError if unreachable)."""
        timeout_s = kw.get("timeout_s", 2.0)
        try:
            async with pinged_client(url, timeout_s) as client:
                store = cls(client, url=url, **kw)
                try:
                    yield store
                finally:
                    end = trio.current_time() + timeout_s
                    if store.exit_deadline is not None:
                        end = min(end, store.exit_deadline())
                    with trio.CancelScope(deadline=end, shield=True) as scope:
                        try:
                            await store.flush()
                        except KeyStoreUnavailable as exc:
                            log.warning("key store: usage not saved at shutdown: %s", exc)
                    if scope.cancelled_caught:
                        log.warning("key store: usage not saved at shutdown: no time left before the stop's "
                                    "deadline")
        except RedisUnreachable as exc:
            raise KeyStoreError(f"auth.redis_url: {exc}") from None

    # -- naming ---------------------------------------------------------------------------------------

    @staticmethod
    def _key(key_id: str) -> str:
        return f"{NAMESPACE}:key:{{{key_id}}}"

    @staticmethod
    def _bucket(key_id: str) -> str:
        return f"{NAMESPACE}:rl:{{{key_id}}}"

    _ids = f"{NAMESPACE}:keys"

    @staticmethod
    def _marker(batch_id: str) -> str:
        return f"{NAMESPACE}:flush:{batch_id}"

    async def _run(self, script: Script[str], keys: list[str], args: list[str | int | float]) -> Any:
        """One script call, bounded in time; Redis problems become KeyStoreUnavailable."""
        from coredis.exceptions import RedisError

        try:
            with trio.fail_after(self.timeout_s):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, trio.TooSlowError) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> KeyStoreUnavailable:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return KeyStoreUnavailable(f"Redis at {self.url}: {self.last_error}")

    # -- the hot path -------------------------------------------------------------------------------

    async def check(self, api_key: str) -> Grant | Denial:
        key_id = key_id_of(api_key)
        reply = await self._run(self._check, [self._key(key_id), self._bucket(key_id)], [])
        status, limit, remaining, reset_ms, retry_ms = (int(v) for v in reply[:5])
        if status == 1:
            self._counter_state(key_id, "requests", int(reply[6]))
            return Grant(key_id, str(reply[5]), limit, remaining, limiter.ceil_seconds(reset_ms))
        if status == 3:
            return Denial("rate_limited", limit, limiter.ceil_seconds(reset_ms),
                          max(1, limiter.ceil_seconds(retry_ms)))
        if status == 2:
            return Denial("blocked", retry_after_s=60)
        if status == 4:
            self.failures += 1
            self.last_error = f"key id {key_id[:16]}: its rate_limit in Redis is not an integer from 0 to 1000000"
            raise KeyStoreUnavailable(f"Redis at {self.url}: {self.last_error}")
        return Denial("unknown")

    def _counter_state(self, key_id: str, name: str, code: int) -> None:
        """Report what a script found in a stored counter (`code`: records.COUNTER_*)."""
        if code == COUNTER_SATURATED:
            self.usage.saturate(key_id)
        elif code == COUNTER_BEYOND:
            self.usage.repair(f"key id {key_id[:16]} {name}", "(Redis)", "beyond 2^63-1, held there")
        elif code == COUNTER_CORRUPT:
            self.usage.repair(f"key id {key_id[:16]} {name}", "(Redis)", "not a non-negative integer, restarted")

    def record_usage_nowait(self, key_id: str, *, tokens: int) -> None:
        checked = self.usage.tokens(tokens)
        if not checked:
            return
        if key_id not in self._pending and len(self._pending) >= MAX_PENDING_KEYS:
            self.dropped_usage += 1
            return
        self._pending[key_id] = saturating_add(self._pending.get(key_id, 0), checked)

    # -- reading --------------------------------------------------------------------------------------

    async def info(self, key_id: str) -> KeyInfo | None:
        from coredis.exceptions import RedisError

        try:
            with trio.fail_after(self.timeout_s):
                fields = await self.client.hgetall(self._key(key_id))
        except (RedisError, OSError, trio.TooSlowError) as exc:
            raise self._unavailable(exc) from exc
        return self._with_pending(_info(key_id, dict(fields), self.usage))

    def _with_pending(self, info: KeyInfo | None) -> KeyInfo | None:
        """`info` with the token usage counted here and not yet in Redis."""
        if info is None:
            return None
        pending = self._pending.get(info.id, 0) + (self._batch[1].get(info.id, 0) if self._batch else 0)
        if not pending:
            return info
        return KeyInfo(info.id, info.prefix, info.rate_limit, info.created_at, info.requests,
                       saturating_add(info.tokens, pending), info.last_used_at)

    async def list_keys(self) -> list[KeyInfo]:
        """Every key, read `LIST_BATCH` hashes per round trip (one pipeline each, bounded in time)."""
        from coredis.exceptions import RedisError

        try:
            with trio.fail_after(self.timeout_s):
                ids = sorted(await self.client.smembers(self._ids))
            found: list[KeyInfo] = []
            for start in range(0, len(ids), LIST_BATCH):
                chunk = ids[start:start + LIST_BATCH]
                with trio.fail_after(self.timeout_s):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for key_id in chunk:
                            pipe.hgetall(self._key(key_id))
                replies = pipe.results or ()
                for key_id, fields in zip(chunk, replies, strict=True):
                    info = self._with_pending(_info(key_id, dict(fields), self.usage))
                    if info is not None:
                        found.append(info)
        except (RedisError, OSError, trio.TooSlowError) as exc:
            raise self._unavailable(exc) from exc
        return sorted(found, key=lambda i: (i.created_at, i.id))

    # -- changes --------------------------------------------------------------------------------------

    async def create(self, rate_limit: int) -> tuple[str, KeyInfo]:
        check_rate_limit(rate_limit)
        api_key = new_api_key()
        info = KeyInfo(key_id_of(api_key), display_prefix(api_key), rate_limit, self.wall_clock())
        await self._run(self._create, [self._key(info.id), self._ids],
                        [info.id, info.prefix, rate_limit, repr(info.created_at), 0])
        return api_key, info

    async def modify(self, ref: str, rate_limit: int) -> KeyInfo:
        check_rate_limit(rate_limit)
        for key_id in candidate_ids(ref):
            if await self._run(self._modify, [self._key(key_id)], [rate_limit]):
                info = await self.info(key_id)
                if info is not None:
                    return info
        raise KeyNotFound("no such API key")

    async def delete(self, ref: str) -> KeyInfo:
        for key_id in candidate_ids(ref):
            info = await self.info(key_id)
            if info is not None and await self._run(
                self._delete, [self._key(key_id), self._bucket(key_id), self._ids], [key_id]
            ):
                self._pending.pop(key_id, None)
                return info
        raise KeyNotFound("no such API key")

    async def import_keys(self, entries: list[LegacyKey]) -> ImportReport:
        added = 0
        now = repr(self.wall_clock())
        for entry in entries:
            key_id = key_id_of(entry.key)
            added += int(await self._run(
                self._create, [self._key(key_id), self._ids],
                [key_id, display_prefix(entry.key), entry.rate_limit, now, entry.usage],
            ))
        return ImportReport(added, len(entries) - added)

    # -- background -------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Add the token usage summed since the last flush.

        If Redis fails, the same batch (same id, same counts) is sent again by the next flush, and
        usage counted meanwhile follows it: a batch whose reply was lost is not added twice. At most
        two batches per call (the one resent, then what was counted meanwhile), so that a flush under
        load ends.
        """
        for _ in range(2):
            if self._batch is None:
                if not self._pending:
                    return
                self._batch, self._pending = (uuid.uuid4().hex, self._pending), {}
            batch_id, usage = self._batch
            ids = list(usage)
            reply = await self._run(self._add_tokens, [self._marker(batch_id), *(self._key(i) for i in ids)],
                                    [BATCH_MARKER_TTL_MS, *(str(usage[i]) for i in ids)])
            self._batch = None
            for key_id, code in zip(ids, reply[1:], strict=False):
                self._counter_state(key_id, "tokens", int(code))

    async def maintain(self) -> None:
        failing = False
        while True:
            await trio.sleep(self.flush_interval_s)
            if not self._pending and self._batch is None:
                continue
            try:
                await self.flush()
            except KeyStoreUnavailable as exc:
                if not failing:  # once per outage, not every second
                    log.warning("key store: usage flush failed (kept for later): %s", exc)
                failing = True
            else:
                if failing:
                    log.info("key store: Redis reachable again; pending usage saved")
                failing = False

    def health(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "url": self.url,
            "unflushed_usage_keys": len(self._pending) + (len(self._batch[1]) if self._batch else 0),
            "dropped_usage": self.dropped_usage,
            **self.usage.statistics(),
            "failures": self.failures,
            "last_error": self.last_error,
            "failed_auth": self.failed_auth.statistics(),
        }
