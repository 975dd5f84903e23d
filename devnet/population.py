"""Miners as they really are: a population whose speed and faults follow realistic distributions.

For `sn1-gateway bench --scenario subnet`. Each miner has its own typical time to first token and
token rate; each request to it gets a `Plan` drawn from (miner, request seed), so two runs over the
same requests meet the same subnet whatever miners they choose, and the benchmark knows, per request,
what every miner it asked was going to do (the oracle: the fastest healthy miner among those asked).

- Time to first token, over the population: log-normal, median 0.8 s, 5% beyond 4 s (log-sd 0.98),
  split into a miner's own median (log-sd 0.85) and the request's variation around it (log-sd 0.48).
- Tokens per second: uniform in 20-80 per miner.
- Faults (shares of the miners): 10% answer errors (HTTP 500 on 60% of requests) or refuse
  connections; 5% hang after the headers (on half of requests); 5% break mid-stream (on half);
  2% send garbage (a first event that is not JSON); and 6% are slow (first token 8x later, tokens 4x
  slower) for a window of a minute, then healthy again.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Literal

Fault = Literal["", "http_500", "refuse", "hang", "stop_mid_stream", "garbage"]
Outcome = Literal["ok", "http_500", "refuse", "hang", "stop_mid_stream", "garbage"]

TTFT_MEDIAN_S = 0.8
TTFT_MINER_SIGMA = 0.85
TTFT_REQUEST_SIGMA = 0.48  # sqrt(0.85^2 + 0.48^2) = 0.976: P(ttft > 4 s) = 5%
TOKENS_PER_S = (20.0, 80.0)
FAULT_RATES: dict[str, float] = {"http_500": 0.6, "refuse": 1.0, "hang": 0.5, "stop_mid_stream": 0.5,
                                 "garbage": 1.0}
SLOW_TTFT_FACTOR = 8.0
SLOW_RATE_FACTOR = 0.25
SLOW_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What one miner does with one request."""

    outcome: Outcome
    ttft_s: float
    token_s: float  # seconds between tokens
    slow: bool  # inside its slow window

    @property
    def healthy(self) -> bool:
        """It will deliver a whole answer."""
        return self.outcome == "ok"

    def answer_s(self, tokens: int) -> float:
        """When its last token leaves, from the request's arrival."""
        return self.ttft_s + max(tokens - 1, 0) * self.token_s


@dataclass(frozen=True, slots=True)
class MinerProfile:
    uid: int
    ttft_median_s: float
    tokens_per_s: float
    fault: Fault = ""
    slow_from_s: float | None = None  # its slow window, in seconds from the scenario's start
    slow_until_s: float | None = None

    def slow_at(self, t: float) -> bool:
        return self.slow_from_s is not None and self.slow_until_s is not None and \
            self.slow_from_s <= t < self.slow_until_s

    def plan(self, seed: int, t: float) -> Plan:
        """The plan for the request with `seed`, arriving `t` seconds into the scenario."""
        rng = random.Random(_mix(self.uid, seed))
        ttft = self.ttft_median_s * math.exp(rng.gauss(0.0, TTFT_REQUEST_SIGMA))
        token_s = 1.0 / self.tokens_per_s
        slow = self.slow_at(t)
        if slow:
            ttft, token_s = ttft * SLOW_TTFT_FACTOR, token_s / SLOW_RATE_FACTOR
        outcome: Outcome = "ok"
        if self.fault and rng.random() < FAULT_RATES[self.fault]:
            outcome = self.fault
        return Plan(outcome, ttft, token_s, slow)


def _mix(uid: int, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{uid}:{seed}".encode(), digest_size=8).digest(), "big")


def population(n: int, *, duration_s: float, seed: int = 1) -> list[MinerProfile]:
    """`n` miners drawn with `seed`. Slow windows last a minute (a third of a shorter scenario) and
    start at staggered times, so that some miner is recovering during most of the run."""
    rng = random.Random(seed)
    counts = {"http_500": 0.06, "refuse": 0.04, "hang": 0.05, "stop_mid_stream": 0.05, "garbage": 0.02}
    uids = list(range(n))
    rng.shuffle(uids)
    faults: dict[int, Fault] = {}
    at = 0
    for fault, share in counts.items():
        for uid in uids[at:at + max(1, round(share * n))]:
            faults[uid] = fault  # type: ignore[assignment]
        at += max(1, round(share * n))
    slow = uids[at:at + max(1, round(0.06 * n))]
    window = min(SLOW_WINDOW_S, duration_s / 3)
    miners = []
    for uid in range(n):
        median = TTFT_MEDIAN_S * math.exp(rng.gauss(0.0, TTFT_MINER_SIGMA))
        rate = rng.uniform(*TOKENS_PER_S)
        start = end = None
        if uid in slow:
            start = duration_s * (0.1 + 0.5 * slow.index(uid) / max(len(slow), 1))
            end = start + window
        miners.append(MinerProfile(uid, median, rate, faults.get(uid, ""), start, end))
    return miners
