"""The per-key rate limit: GCRA in its token-bucket form, in exact integer arithmetic.

A key with limit N may send N requests at once, then one every 60/N seconds. The bucket's level is
kept in units of 1/60000 request-per-minute-milliseconds: a full bucket holds `N * UNIT`, a request
costs `UNIT`, and each elapsed millisecond adds `N`. Everything stays an integer, so a burst of
requests against a fresh key lets exactly N through, whatever N is (floats would let N-1 or N+1 through
at some N). The Redis backend runs the same arithmetic in Lua (`CHECK_SCRIPT`).
"""

from __future__ import annotations

from typing import NamedTuple

UNIT = 60_000  # one request, in level units: the milliseconds in the one-minute window


class Outcome(NamedTuple):
    allowed: bool
    level: int  # the bucket's level after this request
    remaining: int  # requests that could be sent right now
    reset_ms: int  # until the bucket is full again
    retry_after_ms: int  # until the next request would pass (0 when allowed)


def take(level: int | None, last_ms: int, limit: int, now_ms: int) -> Outcome:
    """Spend one request from a bucket last updated at `last_ms` (`level` None: a fresh, full bucket).

    `limit` must be positive: a limit of 0 blocks the key before it gets here.
    """
    capacity = limit * UNIT
    level = capacity if level is None else min(capacity, level + max(0, now_ms - last_ms) * limit)
    allowed = level >= UNIT
    retry_after_ms = 0
    if allowed:
        level -= UNIT
    else:
        retry_after_ms = -(-(UNIT - level) // limit)
    reset_ms = -(-(capacity - level) // limit)
    return Outcome(allowed, level, level // UNIT, reset_ms, retry_after_ms)


def ceil_seconds(ms: int) -> int:
    return -(-ms // 1000)


# KEYS[1]: the key's hash; KEYS[2]: its bucket. Returns {status, limit, remaining, reset_ms, retry_after_ms}
# and, when allowed, the key's prefix. Status: 0 unknown, 1 allowed, 2 blocked (limit 0), 3 over the limit.
# Check, count and the usage counter happen in one atomic step, so processes sharing the Redis share
# the limit exactly.
CHECK_SCRIPT = """
local key = redis.call('HMGET', KEYS[1], 'rate_limit', 'prefix')
if not key[1] then return {0, 0, 0, 0, 0} end
local limit = tonumber(key[1])
if limit <= 0 then return {2, 0, 0, 0, 0} end
local unit = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local capacity = limit * unit
local level = capacity
local state = redis.call('HMGET', KEYS[2], 'level', 'at')
if state[1] and state[2] then
  level = tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * limit
  if level > capacity then level = capacity end
end
if level < unit then
  local retry = math.ceil((unit - level) / limit)
  local reset = math.ceil((capacity - level) / limit)
  return {3, limit, 0, reset, retry}
end
level = level - unit
local reset = math.ceil((capacity - level) / limit)
redis.call('HSET', KEYS[2], 'level', string.format('%d', level), 'at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[2], math.max(1, reset))
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('HSET', KEYS[1], 'last_used_at', string.format('%d', now))
return {1, limit, math.floor(level / unit), reset, 0, key[2]}
"""
