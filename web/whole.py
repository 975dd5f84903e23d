"""The whole gateway when it runs as several workers: one `/metrics` and one `/status` for all of them.

Each worker publishes what it would report alone (`actors/peers.py`); the worker a client reached merges
the others' reports into its own:
- metrics: every worker's families, each sample labelled `worker="N"` (Prometheus sums them);
- status figures: counts summed, each miner's row summed over the workers (its breaker the worst
  state any worker holds, time to first token the mean), the chart summed per point (time to first
  token: p50 weighted by requests, p99 the highest), actors listed per worker, and which workers answer;
- keys: the answering worker's own read of the store all workers share (reports carry none).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

BREAKER_ORDER = {"closed": 0, "half_open": 1, "open": 2}
MINER_SUMS = ("requests", "successes", "failures")
SCORING_SUMS = ("queued", "queue_size", "in_flight", "delivered", "replayed", "spooled", "spool_pending",
                "spool_bytes", "refused", "dropped_total")
VALIDATOR_SUMS = ("delivered", "failures", "rejected")


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_metrics(reports: Iterable[tuple[int, str]]) -> bytes:
    """The workers' metrics texts as one exposition, every sample labelled with its worker."""
    merged: dict[str, Metric] = {}
    for index, text in reports:
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                into.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value,
                                sample.timestamp, sample.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _miners(tables: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    ttfts: dict[int, list[float]] = {}
    for table in tables:
        for row in table:
            uid = row["uid"]
            into = rows.get(uid)
            if into is None:
                rows[uid] = into = dict(row)
                ttfts[uid] = []
            else:
                for name in MINER_SUMS:
                    into[name] = _number(into.get(name)) + _number(row.get(name))
                if BREAKER_ORDER.get(row.get("breaker", ""), 0) > BREAKER_ORDER.get(into.get("breaker", ""), 0):
                    into["breaker"], into["retry_in_s"] = row.get("breaker"), row.get("retry_in_s")
                into["last_error"] = into.get("last_error") or row.get("last_error")
            if isinstance(row.get("ttft_s"), int | float):
                ttfts[uid].append(float(row["ttft_s"]))
    for uid, row in rows.items():
        row["ttft_s"] = sum(ttfts[uid]) / len(ttfts[uid]) if ttfts[uid] else None
        total = _number(row.get("successes")) + _number(row.get("failures"))
        row["failure_rate"] = _number(row.get("failures")) / total if total else 0.0
    return [rows[uid] for uid in sorted(rows)]


def _chart(charts: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(charts[0])
    points: dict[float, dict[str, Any]] = {}
    for chart in charts:
        for point in chart.get("points", []):
            into = points.get(point["t"])
            if into is None:
                points[point["t"]] = into = {**point, "_weight": 0.0, "_p50": 0.0}
                for name in ("requests_per_s", "errors_per_s", "rejected_per_s"):
                    into[name] = 0.0
                into["ttft_p99_s"] = None
            for name in ("requests_per_s", "errors_per_s", "rejected_per_s"):
                into[name] += _number(point.get(name))
            if isinstance(point.get("ttft_p50_s"), int | float):
                weight = max(_number(point.get("requests_per_s")), 1e-9)
                into["_weight"] += weight
                into["_p50"] += weight * point["ttft_p50_s"]
            p99 = point.get("ttft_p99_s")
            if isinstance(p99, int | float) and (into["ttft_p99_s"] is None or p99 > into["ttft_p99_s"]):
                into["ttft_p99_s"] = p99
    for point in points.values():
        weight, weighted = point.pop("_weight"), point.pop("_p50")
        point["ttft_p50_s"] = weighted / weight if weight else None
    merged["points"] = [points[t] for t in sorted(points, reverse=True)]
    return merged


def _scoring(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(summaries[0])
    for name in SCORING_SUMS:
        merged[name] = sum(_number(s.get(name)) for s in summaries)
    dropped: dict[str, float] = {}
    for summary in summaries:
        for reason, count in summary.get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0.0) + _number(count)
    merged["dropped"] = dropped
    merged["warnings"] = list(dict.fromkeys(w for s in summaries for w in s.get("warnings", [])))
    validators: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        for row in summary.get("validators", []):
            into = validators.get(row["hotkey"])
            if into is None:
                validators[row["hotkey"]] = dict(row)
                continue
            for name in VALIDATOR_SUMS:
                into[name] = _number(into.get(name)) + _number(row.get(name))
            into["refused_signer"] = bool(into.get("refused_signer")) or bool(row.get("refused_signer"))
            into["backoff_s"] = max(_number(into.get("backoff_s")), _number(row.get("backoff_s")))
            into["hint"] = into.get("hint") or row.get("hint")
            into["last_error"] = into.get("last_error") or row.get("last_error")
    merged["validators"] = list(validators.values())
    return merged


def merge_status(own: dict[str, Any], own_index: int, others: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker's status figures with the other workers' folded in (see the module's docstring)."""
    reports = [(own_index, own), *((r["index"], r["status"]) for r in others if isinstance(r.get("status"), dict))]
    statuses = [status for _, status in reports]
    merged = dict(own)
    merged["ready"] = all(bool(s.get("ready")) for s in statuses)
    merged["draining"] = any(bool(s.get("draining")) for s in statuses)
    merged["requests"] = {name: sum(_number(s.get("requests", {}).get(name)) for s in statuses)
                          for name in own.get("requests", {})}
    merged["chart"] = _chart([s["chart"] for s in statuses if isinstance(s.get("chart"), dict)])
    merged["miners"] = _miners([s.get("miners", []) for s in statuses])
    scorings = [s["scoring"] for s in statuses if isinstance(s.get("scoring"), dict)]
    merged["scoring"] = _scoring(scorings) if scorings else None
    merged["actors"] = [{**actor, "worker": index} for index, status in reports for actor in status.get("actors", [])]
    merged["workers"] = [{"index": index, "ready": bool(status.get("ready")), "time": status.get("time")}
                         for index, status in sorted(reports, key=lambda r: r[0])]
    return merged
