"""The per-key rate limit: GCRA in its token-bucket form, in exact integer arithmetic.

A key with limit N may send N requests at once, then one every 60/N seconds. The bucket's level is
kept in units of 1/60000 request-per-minute-milliseconds: a full bucket holds `N * UNIT`, a request
costs `UNIT`, and each elapsed millisecond adds `N`. Everything stays an integer, so a burst of
requests against a fresh key lets exactly N through, whatever N is (floats would let N-1 or N+1 through
at some N). The Redis backend runs the same arithmetic in Lua (`CHECK_SCRIPT`).
"""

from __future__ import annotations

from typing import NamedTuple

from actors.keystore.records import LUA_COUNTERS

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


def rescale(level: int, last_ms: int, was: int, limit: int, now_ms: int) -> int:
    """A bucket kept at limit `was`, as it stands at `now_ms` under `limit` (both positive).

    What the key used stays used: the bucket refills at the old rate up to now, then its capacity
    changes by the difference, the level with it, held between empty and full. Raised from 5 to 10
    after using 5, the key has 5 more at once; lowered from 10 to 5 after using 3, 2 more; lowered
    to 5 after using 7, none until one is back at the new rate (12 s), never more than the new limit
    at once.
    """
    level = min(was * UNIT, level + max(0, now_ms - last_ms) * was) + (limit - was) * UNIT
    return max(0, level)


def ceil_seconds(ms: int) -> int:
    return -(-ms // 1000)


# KEYS[1]: the key's hash; KEYS[2]: its bucket. Returns {status, limit, remaining, reset_ms, retry_after_ms}
# and, when allowed, the key's prefix and the state of its request counter (records.LUA_COUNTERS's
# codes, and 5: the total reached 2^63-1). Status: 0 unknown, 1 allowed, 2 blocked (limit 0), 3 over the limit, 4 a rate limit that is not
# a non-negative integer (the hash was edited by hand). Check, count and the usage counter happen in one
# atomic step, so processes sharing the Redis share the limit exactly. The bucket remembers the limit it
# was kept at: after a change it is rescaled as `rescale` does, here, atomically. Everything is read
# and computed before the first write, so no stored value can make the script fail half-way.
CHECK_SCRIPT = LUA_COUNTERS + """
local key = redis.call('HMGET', KEYS[1], 'rate_limit', 'prefix', 'requests')
if not key[1] then return {0, 0, 0, 0, 0} end
local limit = tonumber(key[1])
if not limit or limit ~= math.floor(limit) or limit < 0 or limit > 1000000 then return {4, 0, 0, 0, 0} end
if limit == 0 then return {2, 0, 0, 0, 0} end
local unit = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local capacity = limit * unit
local level = capacity
local state = redis.call('HMGET', KEYS[2], 'level', 'at', 'limit')
local stored, at = tonumber(state[1]), tonumber(state[2])
local rescaled = false
if stored and at then
  local was = tonumber(state[3]) or limit
  if was ~= limit and was > 0 then
    stored = math.min(was * unit, stored + math.max(0, now - at) * was) + (limit - was) * unit
    if stored < 0 then stored = 0 end
    at = now
    rescaled = true
  end
  level = math.min(capacity, stored + math.max(0, now - at) * limit)
end
if level < unit then
  local retry = math.ceil((unit - level) / limit)
  local reset = math.ceil((capacity - level) / limit)
  if rescaled then
    redis.call('HSET', KEYS[2], 'level', string.format('%d', level), 'at', string.format('%d', now),
               'limit', string.format('%d', limit))
    redis.call('PEXPIRE', KEYS[2], math.max(1, reset))
  end
  return {3, limit, 0, reset, retry}
end
level = level - unit
local reset = math.ceil((capacity - level) / limit)
local requests, code = counter(key[3])
local total, saturated = counter_add(requests, '1')
if saturated and code == 0 then code = 5 end
redis.call('HSET', KEYS[2], 'level', string.format('%d', level), 'at', string.format('%d', now),
           'limit', string.format('%d', limit))
redis.call('PEXPIRE', KEYS[2], math.max(1, reset))
redis.call('HSET', KEYS[1], 'requests', total, 'last_used_at', string.format('%d', now))
return {1, limit, math.floor(level / unit), reset, 0, key[2], code}
"""
