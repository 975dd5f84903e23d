"""`GET /metrics`: the gateway's figures in the Prometheus text format, through `prometheus_client`.

One custom collector, on a registry of the gateway's own (no global registry), reads the running
parts generically on every scrape:

- the actor registry: each actor's state and restarts, and each part's `health()` report, whose
  numbers become the typed families that `PARTS` declares for that part: counters for what only
  grows (delivered, dropped by reason, miner failures by kind), gauges for what goes up and down
  (queue sizes, open connections); a mapping becomes a label (`reason`, `kind`), a mapping keyed by
  an identifier becomes one labelled sample per entry (validators by `hotkey`);
- the miners' health (`uid`, `hotkey` labels: breaker state, successes, failures, EWMAs);
- the request telemetry (`web/telemetry.py`): histograms of request duration by route and status
  class and of time to first token by route, responses by route and status, requests in flight.

A number in a part's report that no family declares yet is not lost: it appears in
`sn1_gateway_health_figure{part, figure}` (type unknown; `figure` is its dotted path), until a family
is declared for it. Identifiers (uids, hotkeys) are only ever label values, never part of a name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from quart import Blueprint, Response

from web.services import Services
from web.telemetry import Telemetry
from web.whole import merge_metrics

PREFIX = "sn1_gateway"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what `generate_latest` writes
BREAKER_STATES = ("closed", "open", "half_open")
Kind = Literal["counter", "gauge"]


@dataclass(frozen=True, slots=True)
class Figure:
    """One family read from a part's report. `path` is dotted (`spool.bytes`); when the value there is
    a mapping, each of its entries is a sample labelled `label` with the entry's key."""

    path: str
    name: str  # after `sn1_gateway_`
    kind: Kind
    doc: str
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Each:
    """A mapping in a part's report keyed by an identifier (validators by hotkey): every `figures`
    path is read inside each entry, the key going to label `label`."""

    path: str
    label: str
    figures: tuple[Figure, ...]


@dataclass(frozen=True, slots=True)
class Covered:
    """Numbers that other families already carry (summed into them): not repeated as figures."""

    paths: tuple[str, ...]


Spec = Figure | Each | Covered


def counter(path: str, name: str, doc: str, label: str | None = None) -> Figure:
    return Figure(path, name, "counter", doc, label)


def gauge(path: str, name: str, doc: str, label: str | None = None) -> Figure:
    return Figure(path, name, "gauge", doc, label)


PARTS: dict[str, tuple[Spec, ...]] = {
    "keys": (
        gauge("keys", "keys_stored", "API keys in the file store"),
        gauge("unflushed_usage", "keys_unflushed_usage", "1 while usage counted in memory is not yet in the file"),
        gauge("unflushed_usage_keys", "keys_unflushed_usage_keys", "keys whose usage is not yet in Redis"),
        counter("reloads", "keys_reloads", "times the keys file was reloaded after another writer changed it"),
        counter("flushes", "keys_flushes", "usage flushes to the keys file"),
        counter("usage_refused", "keys_usage_refused", "token counts refused: not an integer from 0 to 2^31 (a miner's claim of usage that cannot be)"),
        counter("counters_repaired", "keys_counters_repaired", "stored usage counters found corrupt and restarted"),
        counter("counters_saturated", "keys_counters_saturated", "usage counters held at their maximum"),
        counter("dropped_usage", "keys_dropped_usage", "usage records dropped while Redis was unreachable"),
        counter("failures", "keys_store_failures", "failed calls to the Redis key store"),
        gauge("failed_auth.per_minute", "keys_failed_auth_per_minute", "failed authentications allowed per address "
              "and minute (auth.failed_auth_per_minute)"),
        counter("failed_auth.failures", "keys_failed_auth", "failed authentications (wrong or missing key)"),
        counter("failed_auth.refused", "keys_failed_auth_refused", "requests refused with 429 too_many_failed_auth"),
        counter("failed_auth.episodes", "keys_failed_auth_episodes", "times an address went over its limit"),
        gauge("failed_auth.addresses", "keys_failed_auth_addresses", "addresses with recent failed authentications"),
        counter("failed_auth.evicted", "keys_failed_auth_evicted", "addresses forgotten to keep the table bounded"),
    ),
    "subnet": (
        gauge("neurons", "subnet_neurons", "neurons in the metagraph served"),
        gauge("block", "subnet_block", "block of the metagraph served"),
        gauge("age_s", "subnet_age_seconds", "age of the metagraph served"),
        gauge("stale", "subnet_stale", "1 while the last metagraph read failed (the previous one is served)"),
        counter("failures", "subnet_sync_failures", "failed metagraph reads"),
        gauge("axons_refused", "subnet_axons_refused", "neurons whose axon address is not asked (private, "
              "unspecified, ...)"),
        gauge("hotkey_registered", "subnet_hotkey_registered", "1 when the gateway's hotkey is in the metagraph"),
        gauge("hotkey_stake", "subnet_hotkey_stake", "stake of the gateway's hotkey"),
        gauge("warnings", "subnet_warnings", "warnings about the metagraph or the hotkey (/health/ready says them)"),
    ),
    "availability": (
        gauge("miners_known", "availability_miners_known", "miners whose availability is known"),
        gauge("age_s", "availability_age_seconds", "age of the last availability poll"),
        gauge("stale", "availability_stale", "1 while the last poll failed"),
        gauge("fallback_every_serving_miner", "availability_fallback",
              "1 while no availability was ever known and every serving miner is asked"),
        counter("failures", "availability_poll_failures", "failed availability polls"),
        counter("bad_answers", "availability_bad_answers", "availability answers that could not be used"),
    ),
    "scoring": (
        counter("gateway_errors", "scoring_gateway_errors", "deliveries the gateway itself could not make (open files)"),
        counter("trimmed", "scoring_trimmed", "payloads over scoring.max_payload_bytes sent with their largest answers cut short"),
        gauge("enabled", "scoring_enabled", "1 when answers are forwarded for scoring"),
        gauge("warning_count", "scoring_warnings", "warnings an operator should act on (/health/ready says them)"),
        counter("submitted", "scoring_submitted", "finished fan-outs handed to the scoring forwarder"),
        gauge("queued", "scoring_queued", "payloads in the in-memory queue"),
        gauge("queue_size", "scoring_queue_size", "capacity of the in-memory queue"),
        gauge("overflow", "scoring_overflow", "payloads waiting for the spool writer while the queue is full"),
        gauge("writing", "scoring_writing", "payloads being written to the spool"),
        gauge("in_flight", "scoring_in_flight", "deliveries under way"),
        gauge("memory_bytes", "scoring_memory_bytes", "bytes held in memory: queued, waiting in the overflow "
              "buffer, in flight, being written to the spool"),
        gauge("memory_max_bytes", "scoring_memory_max_bytes", "most bytes held in memory (scoring.memory_max_bytes)"),
        counter("delivered", "scoring_delivered", "payloads a validator took (HTTP 200)"),
        counter("replayed", "scoring_replayed", "payloads delivered from the spool"),
        counter("resent_from_memory", "scoring_resent_from_memory",
                "payloads delivered from the overflow buffer (while the spool failed or was behind)"),
        counter("requeues_kept", "scoring_requeues_kept",
                "replayed payloads the disk refused to take back, kept in memory instead"),
        counter("spooled", "scoring_spooled", "payloads written to the spool"),
        counter("attempts_failed", "scoring_attempts_failed", "deliveries that failed (and were retried or spooled)"),
        counter("no_validator", "scoring_no_validator", "payloads that found no eligible validator"),
        gauge("validators_refusing_signer", "scoring_validators_refusing_signer",
              "validators refusing the gateway's hotkey (set API_HOTKEY on them)"),
        counter("ignored", "scoring_ignored", "results not forwarded, by reason", label="reason"),
        counter("dropped", "scoring_dropped", "payloads lost, by reason", label="reason"),
        Covered(("spool.appended", "spool.dropped_full", "spool.dropped_too_large", "spool.corrupt",
                 "spool.expired")),
        gauge("spool.pending", "scoring_spool_pending", "payloads in the spool waiting for delivery"),
        gauge("spool.bytes", "scoring_spool_bytes", "size of the spool"),
        gauge("spool.max_bytes", "scoring_spool_max_bytes", "largest size of the spool (scoring.spool_max_bytes)"),
        gauge("spool.segments", "scoring_spool_segments", "segment files in the spool"),
        counter("spool.consumed", "scoring_spool_consumed", "spool records passed by the cursor"),
        counter("spool.cursor_resets", "scoring_spool_cursor_resets", "times the spool's cursor was unreadable"),
        gauge("spool.failing", "scoring_spool_failing", "1 while the spool's disk fails"),
        counter("spool.disk_failures", "scoring_spool_disk_failures", "failed spool disk operations"),
        gauge("spool.cursor_unsynced", "scoring_spool_cursor_unsynced", "1 while the cursor's last move is unsaved"),
        counter("spool.errors", "scoring_spool_errors", "spool writes that failed"),
        gauge("spool.retry_in_s", "scoring_spool_retry_seconds", "until the failing spool is tried again"),
        Each("validators", "hotkey", (
            counter("delivered", "scoring_validator_delivered", "payloads this validator took"),
            counter("failures", "scoring_validator_failures", "deliveries to this validator that failed"),
            counter("rejected", "scoring_validator_rejected", "payloads this validator answered but rejected"),
            gauge("consecutive_failures", "scoring_validator_consecutive_failures", "failures since its last success"),
            gauge("backoff_remaining_s", "scoring_validator_backoff_seconds", "until it is tried again"),
            gauge("probing", "scoring_validator_probing", "1 while one payload probes it after failures"),
            gauge("refused_signer", "scoring_validator_refused_signer",
                  "1 while it refuses the gateway's hotkey (HTTP 401/403): set its API_HOTKEY"),
        )),
    ),
    "fanout": (
        gauge("running", "fanout_jobs_running", "fan-outs running, collections for scoring included"),
        gauge("serving", "fanout_jobs_serving", "fan-outs whose client is still being answered"),
        counter("total", "fanout_jobs", "fan-outs started"),
        counter("refused", "fanout_jobs_refused", "requests refused because the pool was full (503)"),
        counter("collections_cut_short", "fanout_collections_cut_short",
                "collections for scoring cut short at capacity"),
        counter("unscored", "fanout_unscored", "results with nowhere to go (no scoring forwarder)"),
        counter("miner_failures", "fanout_miner_failures", "miner answers that failed, by kind", label="kind"),
        counter("gateway_errors", "fanout_gateway_errors", "asks that failed on the gateway's side"),
        gauge("answers_bytes", "fanout_answers_bytes", "bytes the miners of every running fan-out have sent, "
              "together"),
        gauge("answers_max_bytes", "fanout_answers_max_bytes", "most bytes of answers held together before "
              "answers past their share are cut (fanout.answers_max_bytes)"),
        gauge("miner_streams", "fanout_miner_streams", "miners being asked now, over every fan-out"),
        counter("answers_cut", "fanout_answers_cut", "answers cut because the running fan-outs held more than "
                "fanout.answers_max_bytes"),
    ),
    "jobs": (
        gauge("running", "jobs_running", "chat jobs running in this gateway"),
        gauge("keys_running", "jobs_keys_running", "API keys with a chat job running"),
        gauge("runs_running", "jobs_streamed_runs_running", "streamed deep-research runs working"),
        counter("created", "jobs_created", "chat jobs created"),
        counter("completed", "jobs_completed", "chat jobs completed"),
        counter("failed", "jobs_failed", "chat jobs that ended failed: a miner's error, a result too large, a research limit, a stop (cancelled ones are counted apart)"),
        counter("cancelled", "jobs_cancelled", "chat jobs cancelled by their key"),
        counter("refused", "jobs_refused", "chat jobs refused by a limit", label="reason"),
        counter("abandoned", "jobs_abandoned", "jobs a stopped gateway left, marked failed"),
        counter("expired", "jobs_expired", "jobs removed past jobs.ttl_s"),
        counter("too_large", "jobs_too_large", "jobs failed for a result over jobs.max_result_bytes"),
        counter("write_failures", "jobs_store_write_failures", "writes to the jobs store that failed"),
        counter("lost_writes", "jobs_lost_writes", "jobs whose end (status and last chunks) the store could not write in time; the next sweep marks them failed"),
        counter("defects", "jobs_defects", "jobs that ended on an unexpected error"),
        counter("store.failures", "jobs_store_failures", "calls to the jobs store that failed"),
    ),
    "research": (
        gauge("running", "research_runs_running", "deep-research runs under way (research.max_running)"),
        gauge("keys_running", "research_keys_running", "API keys with a deep-research run under way"),
        counter("started", "research_runs_started", "deep-research runs started"),
        counter("refused", "research_runs_refused", "deep-research runs refused by a limit (running: the "
                "gateway's, 503; running_per_key: the key's, 429)", label="reason"),
    ),
    "workers": (
        gauge("index", "worker_index", "this worker's index, of server.workers"),
        gauge("count", "workers", "serving processes (server.workers)"),
        counter("published", "worker_reports_published", "reports this worker published for the others"),
        counter("failures", "worker_report_failures", "reports that could not be published or read"),
        counter("bad_reports", "worker_reports_bad", "other workers' reports skipped: too large, too deep or "
                "not JSON"),
    ),
    "connections": (
        gauge("open", "connections_open", "client connections open"),
        gauge("max", "connections_max", "client connections allowed at once (server.max_connections)"),
        gauge("busy", "connections_busy", "1 while over half of the allowed connections are open"),
        counter("accepted", "connections_accepted", "client connections accepted"),
        counter("waited_for_a_slot", "connections_waited_for_a_slot", "connections that waited for a free slot"),
        counter("closed_idle_under_load", "connections_closed_idle_under_load",
                "idle connections closed early while busy"),
        counter("closed_slow_head", "connections_closed_slow_head",
                "connections closed because their request head did not arrive within server.request_head_timeout_s"),
    ),
    "outbound": (
        gauge("open", "outbound_connections_open", "outbound connections open (idle and in use)"),
        gauge("idle", "outbound_connections_idle", "outbound connections idle in the pool"),
        gauge("max_connections", "outbound_connections_max", "outbound connections allowed (fanout.max_connections)"),
        counter("opened", "outbound_connections_opened", "outbound connections opened"),
        counter("reused", "outbound_connections_reused", "requests sent on a pooled connection"),
        counter("refused_at_cap", "outbound_refused_at_cap", "requests refused at the connection cap"),
        counter("replaced_at_cap", "outbound_replaced_at_cap", "idle connections closed to make room at the cap"),
    ),
}


def number(value: Any) -> float | None:
    """A sample value: numbers and booleans as they are, a list by its length, anything else None."""
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return float(len(value))
    return None


def lookup(report: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = report
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


class Families:
    """The families of one scrape, by name: samples from several places (parts, entries) add up."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}

    def get(self, kind: Kind | Literal["unknown"], name: str, doc: str, labels: tuple[str, ...]) -> Metric:
        family = self.by_name.get(name)
        if family is None:
            full = f"{PREFIX}_{name}"
            if kind == "counter":
                family = CounterMetricFamily(full, doc, labels=labels)
            elif kind == "gauge":
                family = GaugeMetricFamily(full, doc, labels=labels)
            else:
                family = UnknownMetricFamily(full, doc, labels=labels)
            self.by_name[name] = family
        return family

    def add(self, kind: Kind | Literal["unknown"], name: str, doc: str, labels: Mapping[str, str],
            value: float) -> None:
        family = self.get(kind, name, doc, tuple(labels))
        family.add_metric(list(labels.values()), value)  # type: ignore[attr-defined]


def read_part(families: Families, part: str, report: Mapping[str, Any], specs: tuple[Spec, ...]) -> None:
    """The declared families of one part's report, then every other number in it as a figure."""
    covered: set[str] = set()

    def emit(figure: Figure, where: Mapping[str, Any], labels: dict[str, str]) -> bool:
        found, value = lookup(where, figure.path)
        if not found:
            return False
        if figure.label is not None and isinstance(value, Mapping):
            for key, inner in value.items():
                if (sample := number(inner)) is not None:
                    families.add(figure.kind, figure.name, figure.doc, {**labels, figure.label: str(key)}, sample)
        elif (sample := number(value)) is not None:
            families.add(figure.kind, figure.name, figure.doc, labels, sample)
        return True

    for spec in specs:
        if isinstance(spec, Covered):
            covered.update(spec.paths)
        elif isinstance(spec, Figure):
            if emit(spec, report, {}):
                covered.add(spec.path)
        else:
            found, entries = lookup(report, spec.path)
            if not found or not isinstance(entries, Mapping):
                continue
            for key, entry in entries.items():
                if not isinstance(entry, Mapping):
                    continue
                for figure in spec.figures:
                    if emit(figure, entry, {spec.label: str(key)}):
                        covered.add(f"{spec.path}.{key}.{figure.path}")
    for path, value in leaves(report, ""):
        if not any(path == c or path.startswith(c + ".") for c in covered):
            families.add("unknown", "health_figure", "a number from a part's /health/ready report that no "
                         "family declares yet (`figure`: its dotted path)", {"part": part, "figure": path}, value)


def leaves(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """The numbers and booleans of a report, with their dotted paths (lists, text and None left out)."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from leaves(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, bool | int | float):
        yield path, float(value)


class GatewayCollector(Collector):
    """Reads `services` on every scrape; keeps nothing between scrapes."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        services = self.services
        families = Families()
        parts = services.actors.health()  # once per scrape: some parts count or sum to report
        report = services.readiness(parts)
        families.add("gauge", "ready", "1 when every actor runs and the gateway is not draining", {},
                     float(report["ready"]))
        families.add("gauge", "draining", "1 while the gateway stops (SIGINT/SIGTERM)", {}, float(report["draining"]))
        for actor, state in report["actors"].items():
            labels = {"actor": actor}
            families.add("gauge", "actor_running", "1 while the actor runs", labels,
                         float(state["status"] == "running"))
            families.add("counter", "actor_restarts", "times the supervisor restarted the actor", labels,
                         float(state["restarts"]))
        for part, health in parts.items():
            read_part(families, part, health, PARTS.get(part, ()))
        self._miners(families)
        yield from families.by_name.values()
        yield from request_families(services.telemetry)

    def _miners(self, families: Families) -> None:
        hotkeys = self.services.subnet.get().by_uid
        for uid, miner in self.services.miner_health.report().items():
            neuron = hotkeys.get(int(uid))
            labels = {"uid": uid, "hotkey": neuron.hotkey if neuron is not None else ""}
            for state in BREAKER_STATES:
                families.add("gauge", "miner_breaker_state", "1 for the state the miner's circuit breaker is in",
                             {**labels, "state": state}, float(miner["breaker"] == state))
            families.add("counter", "miner_successes", "good answers from the miner", labels, miner["successes"])
            families.add("counter", "miner_failures", "failed answers from the miner", labels, miner["failures"])
            families.add("gauge", "miner_consecutive_failures", "failures since the miner's last good answer",
                         labels, miner["consecutive_failures"])
            families.add("gauge", "miner_failure_ewma", "moving average of the miner's failures (0..1)", labels,
                         miner["failure_ewma"])
            if miner["ttft_ewma_s"] is not None:
                families.add("gauge", "miner_ttft_ewma_seconds", "moving average of the miner's time to first token",
                             labels, miner["ttft_ewma_s"])


def request_families(telemetry: Telemetry) -> Iterator[Metric]:
    durations = HistogramMetricFamily(f"{PREFIX}_http_request_duration_seconds",
                                      "time from a request's arrival to its response's last byte",
                                      labels=["route", "status_class"])
    for (route, klass), histogram in sorted(telemetry.durations.items()):
        durations.add_metric([route, klass], histogram.cumulative(), histogram.total)
    yield durations
    ttfts = HistogramMetricFamily(f"{PREFIX}_time_to_first_token_seconds",
                                  "time from a request's arrival to the first token of its answer",
                                  labels=["route"])
    for route, histogram in sorted(telemetry.ttfts.items()):
        ttfts.add_metric([route], histogram.cumulative(), histogram.total)
    yield ttfts
    responses = CounterMetricFamily(f"{PREFIX}_http_responses", "responses by route and status",
                                    labels=["route", "status"])
    for (route, status), count in sorted(telemetry.responses.items()):
        responses.add_metric([route, status], float(count))
    yield responses
    yield GaugeMetricFamily(f"{PREFIX}_http_requests_in_flight", "requests being handled",
                            value=float(telemetry.in_flight))


def metrics_registry(services: Services) -> CollectorRegistry:
    """A registry of this gateway's own, holding its one collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(services))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("metrics", __name__)
    registry = metrics_registry(services)

    @bp.get("/metrics")
    async def metrics() -> Response:
        own = render(registry)
        peers = services.peers
        if peers is None:
            return Response(own, content_type=CONTENT_TYPE)
        reports = [(peers.index, own.decode()), *((r["index"], r["metrics"]) for r in await peers.others()
                                                   if isinstance(r.get("metrics"), str))]
        return Response(merge_metrics(reports), content_type=CONTENT_TYPE)

    return bp
