"""Failed authentications per client address: a bounded throttle against guessing and hammering.

Each address has a GCRA bucket (the limiter's arithmetic) of `per_minute` failures, refilled at
`per_minute` a minute: once an address has failed that many times within a minute, it is refused
(429) until a failure fits again. Refused attempts are not counted, so an address that keeps trying
is let try again at the configured rate, never faster. IPv6 peers are grouped by their /64, which is
what one host usually holds. At most `max_addresses` are tracked, least recently failed evicted
first; every operation is O(1). Only addresses that failed are tracked at all.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from actors.keystore import limiter

log = logging.getLogger("sn1_gateway.keys")

DEFAULT_PER_MINUTE = 30  # as `auth.failed_auth_per_minute`
MAX_ADDRESSES = 10_000


def address_key(host: str | None) -> str:
    """The throttle's name for a peer: the IPv4 address, the /64 of an IPv6 one, or the text given."""
    if not host:
        return "local"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Bucket:
    __slots__ = ("at_ms", "level", "refusing")

    def __init__(self, level: int, at_ms: int) -> None:
        self.level = level
        self.at_ms = at_ms
        self.refusing = False  # inside a refusal episode (logged once per episode)


class FailedAuthThrottle:
    def __init__(
        self,
        per_minute: int = DEFAULT_PER_MINUTE,
        *,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.failures = 0  # failed authentications counted
        self.refused = 0  # requests answered 429 because their address was throttled
        self.episodes = 0  # times an address started being refused
        self.evicted = 0  # addresses forgotten to keep the table bounded

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def _now_ms(self) -> int:
        return math.floor(self.clock() * 1000)

    def refusal(self, host: str | None) -> int:
        """Seconds `host` must wait when it is throttled now (the refusal is counted), else 0."""
        if not self.enabled:
            return 0
        address = address_key(host)
        bucket = self._buckets.get(address)
        if bucket is None:
            return 0
        outcome = limiter.take(bucket.level, bucket.at_ms, self.per_minute, self._now_ms())
        if outcome.allowed:
            return 0
        wait = max(1, limiter.ceil_seconds(outcome.retry_after_ms))
        self.refused += 1
        if not bucket.refusing:
            bucket.refusing = True
            self.episodes += 1
            log.warning("auth: %s failed to authenticate %d times within a minute; refused for %d s",
                        address, self.per_minute, wait)
        return wait

    def fail(self, host: str | None) -> int:
        """One failed authentication from `host`: 0 when counted (answer 401), else the seconds the
        address must wait (answer 429; a refused attempt is not counted)."""
        if not self.enabled:
            return 0
        wait = self.refusal(host)
        if wait:
            return wait
        address = address_key(host)
        now_ms = self._now_ms()
        bucket = self._buckets.get(address)
        if bucket is None:
            outcome = limiter.take(None, now_ms, self.per_minute, now_ms)
            self._buckets[address] = _Bucket(outcome.level, now_ms)
            if len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
                self.evicted += 1
        else:
            outcome = limiter.take(bucket.level, bucket.at_ms, self.per_minute, now_ms)
            bucket.level, bucket.at_ms, bucket.refusing = outcome.level, now_ms, False
            self._buckets.move_to_end(address)
        self.failures += 1
        return 0

    def statistics(self) -> dict[str, Any]:
        return {
            "per_minute": self.per_minute,
            "failures": self.failures,
            "refused": self.refused,
            "episodes": self.episodes,
            "addresses": len(self._buckets),
            "evicted": self.evicted,
        }
