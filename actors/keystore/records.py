"""What the key store holds and answers: key records, grants and denials, and the store's interface.

A key is never stored: only its sha256 (the key id, safe to show and log) and a short display prefix.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

KEY_PREFIX = "sn1-"
RATE_LIMIT_MAX = 1_000_000  # requests per minute; keeps the limiter's integer arithmetic small
_HEX64 = re.compile(r"[0-9a-f]{64}")


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

    def record_usage_nowait(self, key_id: str, *, tokens: int) -> None:
        """Add tokens to a key's usage; never blocks (persisted in the background)."""
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
