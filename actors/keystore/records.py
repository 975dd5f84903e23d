"""What the key store holds and answers: key records, grants and denials, and the store's interface.

A key is never stored: only its sha256 (the key id, safe to show and log) and a short display prefix.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from actors.keystore.throttle import FailedAuthThrottle

KEY_PREFIX = "sn1-"
RATE_LIMIT_MAX = 1_000_000  # requests per minute; keeps the limiter's integer arithmetic small
INT64_MAX = 2**63 - 1  # usage totals saturate here: Redis counters and TOML integers are 64-bit
MAX_TOKENS_PER_REQUEST = 2**31  # the most one request may add to a key's token usage
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]+")
_REPORTED_MAX = 1024  # distinct problems logged by a UsageGuard; beyond it they are only counted


class KeyStoreError(Exception):
    """The key store cannot be used (corrupt file, unreachable Redis); the message is for the operator."""


class KeyStoreUnavailable(KeyStoreError):
    """The store failed while serving; callers answer 503 and the caller may retry."""


class KeyNotFound(LookupError):
    """No key matches the given key or key id."""


class InvalidRateLimit(ValueError):
    """A rate limit that is not an integer between 0 and RATE_LIMIT_MAX."""


def new_api_key() -> str:
    """`sn1-` and 32 URL-safe random characters (192 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def key_id_of(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def display_prefix(api_key: str) -> str:
    """Enough of the key to recognise it, far too little to guess the rest.

    For the usual 36-character keys that is `sn1-` and four random characters; short imported keys
    show at most a quarter of themselves.
    """
    return api_key[: min(8, len(api_key) // 4)]


def candidate_ids(ref: str) -> list[str]:
    """The ids `ref` may name: the hash of `ref` as a key, or `ref` itself when it looks like an id."""
    ids = [key_id_of(ref)]
    if _HEX64.fullmatch(ref):
        ids.append(ref)
    return ids


def is_key_id(text: str) -> bool:
    return _HEX64.fullmatch(text) is not None


def check_rate_limit(value: object) -> int:
    """The rate limit as an int; anything but an integer in [0, RATE_LIMIT_MAX] is refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRateLimit(f"rate_limit must be an integer, not {value!r}")
    if not 0 <= value <= RATE_LIMIT_MAX:
        raise InvalidRateLimit(f"rate_limit must be between 0 and {RATE_LIMIT_MAX}, not {value}")
    return value


def saturating_add(total: int, increment: int) -> int:
    """`total + increment`, held at INT64_MAX: a total that reached it stays there."""
    return min(INT64_MAX, total + increment)


def read_counter(value: object) -> tuple[int, str | None]:
    """A usage counter as storage holds it (an int from the file, a string from Redis), and what was
    wrong with it: beyond int64 is held at INT64_MAX; anything but a non-negative integer restarts at 0."""
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        if len(value.lstrip("0")) > 19:  # int() of a long digit string is slow, and is over the top anyway
            return INT64_MAX, "beyond 2^63-1"
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0, "not a non-negative integer"
    if value < 0:
        return 0, "negative"
    if value > INT64_MAX:
        return INT64_MAX, "beyond 2^63-1"
    return value, None


class UsageGuard:
    """What a store refused or repaired in usage accounting: counted, and each kind of problem logged
    once (usage comes from miners, who are hostile: one line per bad answer would flood the log)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.refused = 0  # increments that were not an integer in [0, MAX_TOKENS_PER_REQUEST]
        self.repaired = 0  # stored counters that were corrupt or beyond int64
        self.saturated = 0  # totals that reached INT64_MAX
        self._reported: set[str] = set()

    def tokens(self, tokens: object) -> int | None:
        """`tokens` when it is a valid increment; else None, counted (and logged the first time)."""
        if not isinstance(tokens, bool) and isinstance(tokens, int) and 0 <= tokens <= MAX_TOKENS_PER_REQUEST:
            return tokens
        self.refused += 1
        self._once("refused", "key store: refused a token count of %r (expected an integer from 0 to %d); "
                   "further refusals are only counted (usage_refused)", repr(tokens)[:40], MAX_TOKENS_PER_REQUEST)
        return None

    def repair(self, where: str, found: object, problem: str) -> None:
        """A stored counter (`where`: file or key id, and field) read as something else than it held."""
        self.repaired += 1
        self._once(f"repair:{where}", "key store: %s: %s (found %s); counted from the repaired value",
                   where, problem, repr(found)[:40])

    def saturate(self, key_id: str) -> None:
        self.saturated += 1
        self._once(f"saturate:{key_id}", "key store: key id %s: a usage total reached 2^63-1 and stays there",
                   key_id[:16])

    def _once(self, topic: str, message: str, *args: object) -> None:
        if topic in self._reported or len(self._reported) >= _REPORTED_MAX:
            return
        self._reported.add(topic)
        self.log.warning(message, *args)

    def statistics(self) -> dict[str, int]:
        return {"usage_refused": self.refused, "counters_repaired": self.repaired,
                "counters_saturated": self.saturated}


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key as the store holds it; nothing in it is secret."""

    id: str
    prefix: str
    rate_limit: int
    created_at: float
    requests: int = 0
    tokens: int = 0
    last_used_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prefix": self.prefix,
            "rate_limit": self.rate_limit,
            "created_at": iso_time(self.created_at),
            "last_used_at": iso_time(self.last_used_at),
            "usage": {"requests": self.requests, "tokens": self.tokens},
        }


@dataclass(frozen=True, slots=True)
class Grant:
    """An authorised, counted request. `headers` go on the response."""

    key_id: str
    prefix: str
    limit: int
    remaining: int
    reset_s: int

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }


DenialReason = Literal["unknown", "blocked", "rate_limited"]


@dataclass(frozen=True, slots=True)
class Denial:
    """A refused request: an unknown or revoked key, a blocked key (limit 0), or one over its limit."""

    reason: DenialReason
    limit: int = 0
    reset_s: int = 0
    retry_after_s: int = 0


@dataclass(frozen=True, slots=True)
class ImportReport:
    added: int
    skipped: int


@dataclass(frozen=True, slots=True)
class LegacyKey:
    """One entry of the predecessor's `api_keys.json`."""

    key: str
    rate_limit: int
    usage: int


class KeyStore(Protocol):
    """What the web layer and the CLI use, whichever backend holds the keys."""

    backend: str

    async def check(self, api_key: str) -> Grant | Denial:
        """Authorise one request and count it against the key's limit (one call, atomic)."""
        ...

    @property
    def failed_auth(self) -> FailedAuthThrottle:
        """Failed authentications per client address (web.auth consults it)."""
        ...

    def record_usage_nowait(self, key_id: str, *, tokens: int) -> None:
        """Add tokens to a key's usage; never blocks (persisted in the background).

        `tokens` must be an integer from 0 to MAX_TOKENS_PER_REQUEST; anything else is refused and
        counted (`usage_refused` in the store's health). Totals saturate at INT64_MAX.
        """
        ...

    async def create(self, rate_limit: int) -> tuple[str, KeyInfo]: ...

    async def modify(self, ref: str, rate_limit: int) -> KeyInfo: ...

    async def delete(self, ref: str) -> KeyInfo: ...

    async def import_keys(self, entries: list[LegacyKey]) -> ImportReport: ...

    async def list_keys(self) -> list[KeyInfo]: ...

    async def info(self, key_id: str) -> KeyInfo | None: ...

    async def maintain(self) -> None:
        """The background work (reload, usage flushes); runs until cancelled."""
        ...

    async def flush(self) -> None:
        """Persist pending usage now."""
        ...

    def health(self) -> dict[str, Any]: ...


# What the Redis scripts say about a counter they read (see LUA_COUNTERS).
COUNTER_BEYOND, COUNTER_CORRUPT, COUNTER_SATURATED = 2, 3, 5


# Usage counters in Redis's Lua (5.1, numbers are doubles: exact only below 2^53), for the scripts that
# add to them. `counter(s)` reads a stored counter as `read_counter` does: its canonical digits and a
# code (0 fine, 2 beyond 2^63-1 so held there, 3 not a non-negative integer so restarted at 0);
# `counter_add(a, b)` adds two such digit strings exactly, in two halves of nine digits and up to
# ten, held at 2^63-1 (second result true when it was). Neither can raise, so a script may do all its
# reading and arithmetic before its first write.
LUA_COUNTERS = """
local COUNTER_MAX = '9223372036854775807'
local function counter_split(s)
  local n = #s
  if n <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end
local function counter(s)
  if type(s) ~= 'string' then return '0', 0 end
  if not string.find(s, '^%d+$') then return '0', 3 end
  s = string.gsub(s, '^0+', '')
  if s == '' then return '0', 0 end
  if #s > 19 then return COUNTER_MAX, 2 end
  if #s == 19 then
    local hi, lo = counter_split(s)
    if hi > 9223372036 or (hi == 9223372036 and lo > 854775807) then return COUNTER_MAX, 2 end
  end
  return s, 0
end
local function counter_add(a, b)
  local ah, al = counter_split(a)
  local bh, bl = counter_split(b)
  local hi, lo = ah + bh, al + bl
  if lo >= 1000000000 then hi, lo = hi + 1, lo - 1000000000 end
  if hi > 9223372036 or (hi == 9223372036 and lo > 854775807) then return COUNTER_MAX, true end
  if hi == 0 then return string.format('%d', lo), false end
  return string.format('%d%09d', hi, lo), false
end
"""
