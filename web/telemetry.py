"""What each request did, recorded while it is served: for the access log, the request histograms of
`/metrics` and the status page's chart.

The ASGI wrapper (`web/asgi.py`) opens a `RequestRecord` for every request and keeps it in a context
variable while the request is handled. Whatever runs for that request finds it with
`current_request()`: the handler, and the fan-out's tasks too, since trio starts a task with a copy of
the context of the task that started it. Routes add what only they know with the `note_*` functions
(each does nothing outside a request), and the wrapper's logging filter (`engine/logs.py`) puts the
record's id on every log record.

`Telemetry`, one per gateway, turns each finished request into figures in O(1) and bounded memory:
cumulative histograms of duration (by route and status class) and of time to first token (by route),
counts by route and status, and per-second buckets over the last `window_s` for the chart.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from actors.fanout.pool import FanoutPool

if TYPE_CHECKING:
    from actors.fanout.job import FanoutJob, Mode
    from wire.metagraph import Neuron

# The record of the request being handled. A context variable is a key, not a store: each request's
# value lives in that request's own context (set and reset by the ASGI wrapper).
_CURRENT: ContextVar[RequestRecord | None] = ContextVar("sn1_gateway_request", default=None)

MAX_NOTED_JOBS = 16  # fan-outs remembered per request (a mixture has two); the miners of more still count
MAX_NOTED_MINERS = 64  # distinct uids listed per request in the access line
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UNMATCHED_ROUTE = "unmatched"
# Routes that watch the gateway rather than use it: left out of the chart (a status page polling
# itself would draw its own traffic), counted everywhere else.
MONITORING_PREFIXES = ("/status", "/metrics", "/health", "/docs", "/redoc", "/openapi.json")
# The chart's percentiles come from log-spaced bins: bin i holds (BASE * RATIO**(i-1), BASE * RATIO**i],
# bin 0 everything up to BASE. A percentile is reported as its bin's geometric middle, within 5%.
TTFT_BIN_BASE_S = 0.001
TTFT_BIN_RATIO = 1.1
TTFT_BINS = 160  # up to about 4 hours
_LOG_RATIO = math.log(TTFT_BIN_RATIO)
_RULE_ARGUMENT = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")
MAX_LOGGED_PATH = 200
MAX_LOGGED_SEGMENT = 16  # longer segments of an unmatched path are cut: they could be keys


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One request as the access log and the figures see it. Holds no key, prompt or answer."""

    id: str
    method: str
    path: str  # as received, without the query; logged only through `loggable_path`
    started: float  # trio time
    route: str | None = None  # the matched route, e.g. "/v1/chat/completions" (None: none matched)
    status: int | None = None
    ended: float | None = None  # when the last byte of the response was handed to the server
    key_prefix: str | None = None
    miners: list[int] = field(default_factory=list)
    winner: int | None = None
    ttft_s: float | None = None  # from the request's arrival to the first token of its answer
    jobs: list[FanoutJob] = field(default_factory=list)

    def add_miners(self, uids: Iterable[int]) -> None:
        for uid in uids:
            if uid not in self.miners and len(self.miners) < MAX_NOTED_MINERS:
                self.miners.append(uid)

    def settle(self) -> None:
        """Winner and time to first token from the noted fan-outs, where nothing noted them directly:
        the last fan-out that had a winner answered the client (a mixture's combining round)."""
        if self.winner is not None:
            return
        for job in reversed(self.jobs):
            outcome = first_token_of(job)
            if outcome is not None:
                self.winner, at = outcome
                if self.ttft_s is None and at is not None:
                    self.ttft_s = max(0.0, at - self.started)
                return

    @property
    def duration_s(self) -> float:
        return max(0.0, (self.ended if self.ended is not None else trio.current_time()) - self.started)

    @property
    def label(self) -> str:
        """The route as a label: the matched rule, or one word for every unmatched path."""
        return self.route or UNMATCHED_ROUTE


def first_token_of(job: FanoutJob) -> tuple[int, float | None] | None:
    """The uid that answered a fan-out and the trio time of the first token the client got from it;
    None while it has no winner. Streaming, the first miner to send text won (a successor that took
    over later is the uid named, the first text still came first); otherwise the winner's first token."""
    if job.winner is None:
        return None
    winner = job.answers[job.winner]
    if job.mode == "stream":
        firsts = [a.timings[0] for a in job.answers if not a.scoring_only and a.timings]
    else:
        firsts = winner.timings[:1]
    return winner.uid, (job.started + min(firsts)) if firsts else None


# -- what routes call -------------------------------------------------------------------------------

def current_request() -> RequestRecord | None:
    """The record of the request being handled here; None outside a request."""
    return _CURRENT.get()


def current_request_id() -> str | None:
    record = _CURRENT.get()
    return None if record is None else record.id


def note_miners(uids: Iterable[int]) -> None:
    """The miners asked for the current request (called again for a further round, they add up)."""
    record = _CURRENT.get()
    if record is not None:
        record.add_miners(uids)


def note_first_token(uid: int, ttft_s: float | None = None) -> None:
    """The current request's answer comes from `uid`; its first token reached the client `ttft_s` after
    the request arrived (None: now). The first call fixes the time; a later one (a takeover) only
    names the new winner."""
    record = _CURRENT.get()
    if record is None:
        return
    record.winner = uid
    if record.ttft_s is None:
        record.ttft_s = max(0.0, trio.current_time() - record.started) if ttft_s is None else ttft_s


def note_job(job: FanoutJob) -> None:
    """A fan-out started for the current request: its miners are noted now; its winner and first token
    are read from it when the request ends (unless `note_first_token` said them)."""
    record = _CURRENT.get()
    if record is None or any(noted is job for noted in record.jobs):
        return
    record.add_miners(a.uid for a in job.answers if not a.scoring_only)
    if len(record.jobs) >= MAX_NOTED_JOBS:
        del record.jobs[0]
    record.jobs.append(job)


class RequestFanoutPool(FanoutPool):
    """The fan-out pool, with each fan-out noted on the request that started it (`note_job`) and given
    that request's id (so the fan-out's and the scoring forwarder's log lines name the id the client
    has in X-Request-ID). Every fan-out starts here, so no route has to note its own."""

    def start(self, body: dict[str, Any], miners: Sequence[Neuron], *, mode: Mode, task: str,
              request_id: str | None = None, timeout_s: float | None = None,
              scoring_only: Sequence[Neuron] = (), moves_breakers: bool = True) -> FanoutJob:
        job = super().start(body, miners, mode=mode, task=task, request_id=request_id or current_request_id(),
                            timeout_s=timeout_s, scoring_only=scoring_only, moves_breakers=moves_breakers)
        note_job(job)
        return job


def open_request(record: RequestRecord) -> Callable[[], None]:
    """Make `record` the current request (for the ASGI wrapper); returns what undoes it."""
    token = _CURRENT.set(record)
    return lambda: _CURRENT.reset(token)


# -- names fit for a log line or a label ------------------------------------------------------------

def route_template(rule: str) -> str:
    """A URL rule as OpenAPI writes it: `/modify-api-key/<api_key>` -> `/modify-api-key/{api_key}`."""
    return _RULE_ARGUMENT.sub(r"{\1}", rule)


def loggable_path(record: RequestRecord) -> str:
    """The path for the access line. A matched route is logged as its rule, so a key in the path
    (`/modify-api-key/{api_key}`) never is; an unmatched path is logged with long segments cut to their
    first four characters, printable ASCII only, at most MAX_LOGGED_PATH characters."""
    if record.route is not None:
        return record.route
    segments = []
    for segment in record.path.split("/"):
        clean = "".join(c if " " < c < "\x7f" else "?" for c in segment)
        segments.append(clean if len(clean) <= MAX_LOGGED_SEGMENT else clean[:4] + "...")
    path = "/".join(segments)
    return path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "..."


def is_monitoring(route: str | None) -> bool:
    return route is not None and route.startswith(MONITORING_PREFIXES)


def status_class(status: int | None) -> str:
    return "none" if status is None else f"{status // 100}xx"


# -- the figures ------------------------------------------------------------------------------------

@dataclass(slots=True)
class Histogram:
    """A cumulative histogram in the Prometheus sense: counts per upper bound, a sum and a count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # `le` is inclusive
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count up to it) for each bound and +Inf, as `HistogramMetricFamily` takes them."""
        out, running = [], 0
        for bound, count in zip((*map(float_text, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


def float_text(value: float) -> str:
    return repr(float(value))


def ttft_bin(value_s: float) -> int:
    if value_s <= TTFT_BIN_BASE_S:
        return 0
    return min(TTFT_BINS - 1, math.ceil(math.log(value_s / TTFT_BIN_BASE_S) / _LOG_RATIO - 1e-9))


def bin_value_s(index: int) -> float:
    """The geometric middle of bin `index` (bin 0: its upper edge)."""
    if index == 0:
        return TTFT_BIN_BASE_S
    return TTFT_BIN_BASE_S * TTFT_BIN_RATIO ** (index - 0.5)


def percentile_of(bins: dict[int, int], q: float) -> float | None:
    total = sum(bins.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    running = 0
    for index in sorted(bins):
        running += bins[index]
        if running >= rank:
            return bin_value_s(index)
    return None  # unreachable: running ends at total


@dataclass(slots=True)
class Second:
    """One second of the chart: requests finished in it, how many failed, their first-token times."""

    at: int = -1  # the second (floor of trio time) these counts are for
    requests: int = 0
    errors: int = 0  # 5xx: the gateway or its miners failed
    rejected: int = 0  # 4xx: refused for what the client sent (key, limit, body)
    ttft: dict[int, int] = field(default_factory=dict)  # bin -> count

    def reset(self, at: int) -> None:
        self.at, self.requests, self.errors, self.rejected = at, 0, 0, 0
        self.ttft = {}


class Telemetry:
    """The gateway's request figures. Every method is O(1) in the number of requests served."""

    def __init__(self, *, window_s: int = 600, clock: Callable[[], float] = trio.current_time) -> None:
        self.window_s = window_s
        self.clock = clock
        self._seconds = [Second() for _ in range(window_s)]
        self.durations: dict[tuple[str, str], Histogram] = {}  # (route, status class)
        self.ttfts: dict[str, Histogram] = {}  # route
        self.responses: dict[tuple[str, str], int] = {}  # (route, status) -> count
        self.in_flight = 0
        self.requests = 0
        self.errors = 0

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, record: RequestRecord) -> None:
        """Count a request that ended (answered, failed or left by its client)."""
        self.in_flight -= 1
        self.requests += 1
        route, status = record.label, record.status
        duration = record.duration_s
        key = (route, status_class(status))
        histogram = self.durations.get(key)
        if histogram is None:
            histogram = self.durations[key] = Histogram(DURATION_BUCKETS_S)
        histogram.observe(duration)
        counted = (route, "none" if status is None else str(status))
        self.responses[counted] = self.responses.get(counted, 0) + 1
        failed = status is not None and status >= 500  # None: the client left before any answer
        self.errors += failed
        if record.ttft_s is not None:
            ttft = self.ttfts.get(route)
            if ttft is None:
                ttft = self.ttfts[route] = Histogram(TTFT_BUCKETS_S)
            ttft.observe(record.ttft_s)
        if is_monitoring(record.route):
            return
        now = int(self.clock())
        second = self._seconds[now % self.window_s]
        if second.at != now:
            second.reset(now)
        second.requests += 1
        second.errors += failed
        second.rejected += status is not None and 400 <= status < 500
        if record.ttft_s is not None:
            index = ttft_bin(record.ttft_s)
            second.ttft[index] = second.ttft.get(index, 0) + 1

    def chart(self, *, seconds: int = 300, step: int = 5) -> dict[str, Any]:
        """The last `seconds` (completed seconds only, at most `window_s`) in points of `step` seconds,
        aligned to multiples of `step` so that points stay put between polls: requests and errors per
        second, and the p50 and p99 of time to first token, per point. `t` is the point's end, in
        seconds before now (negative)."""
        now = self.clock()
        last = int(now) - 1  # the last completed second
        seconds = max(step, min(seconds, self.window_s - 1))
        first = last - seconds + 1
        points = []
        start = first - first % step
        while start <= last:
            end = min(start + step - 1, last)
            span = range(max(start, first), end + 1)
            requests = errors = rejected = 0
            ttft: dict[int, int] = {}
            for at in span:
                second = self._seconds[at % self.window_s]
                if second.at != at:
                    continue
                requests += second.requests
                errors += second.errors
                rejected += second.rejected
                for index, count in second.ttft.items():
                    ttft[index] = ttft.get(index, 0) + count
            width = len(span)
            p50, p99 = percentile_of(ttft, 0.5), percentile_of(ttft, 0.99)
            points.append({
                "t": round(end + 1 - now, 3),
                "requests_per_s": round(requests / width, 3),
                "errors_per_s": round(errors / width, 3),
                "rejected_per_s": round(rejected / width, 3),
                "ttft_p50_s": None if p50 is None else round(p50, 4),
                "ttft_p99_s": None if p99 is None else round(p99, 4),
            })
            start += step
        return {"seconds": seconds, "step_s": step, "points": points}

    def summary(self) -> dict[str, int]:
        return {"total": self.requests, "errors": self.errors, "in_flight": self.in_flight}
