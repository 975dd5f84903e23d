"""Several workers reported as one gateway: metrics labelled per worker, status figures folded together."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from web.whole import merge_metrics, merge_status


def exposition(requests: int, latency_s: float) -> str:
    registry = CollectorRegistry()
    Counter("sn1_gateway_requests", "requests", registry=registry).inc(requests)
    Histogram("sn1_gateway_latency_seconds", "latency", registry=registry).observe(latency_s)
    return generate_latest(registry).decode()


def test_every_workers_samples_are_kept_under_its_label() -> None:
    merged = merge_metrics([(0, exposition(3, 0.1)), (1, exposition(5, 2.0))]).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    totals = {s.labels["worker"]: s.value for s in families["sn1_gateway_requests"].samples
              if s.name == "sn1_gateway_requests_total"}
    assert totals == {"0": 3.0, "1": 5.0}
    assert families["sn1_gateway_requests"].type == "counter"
    assert families["sn1_gateway_latency_seconds"].type == "histogram"
    counts = {s.labels["worker"]: s.value for s in families["sn1_gateway_latency_seconds"].samples
              if s.name == "sn1_gateway_latency_seconds_count"}
    assert counts == {"0": 1.0, "1": 1.0}


def status(ready: bool, requests: int, breaker: str, failures: int, p99: float, dropped: int) -> dict[str, Any]:
    return {
        "ready": ready, "draining": False, "time": 1.0,
        "requests": {"total": requests, "errors": 1, "in_flight": 0},
        "chart": {"seconds": 300, "step_s": 5, "points": [
            {"t": 5, "requests_per_s": requests / 10, "errors_per_s": 0.0, "rejected_per_s": 0.0,
             "ttft_p50_s": 0.5, "ttft_p99_s": p99}]},
        "miners": [{"uid": 1, "hotkey": "5F", "breaker": breaker, "ttft_s": 0.4, "failure_rate": 0.0,
                    "requests": 10, "successes": 10 - failures, "failures": failures, "retry_in_s": None,
                    "last_error": None}],
        "scoring": {"enabled": True, "delivered": requests, "queued": 1, "dropped": {"overflow": dropped},
                    "dropped_total": dropped, "warnings": ["w"],
                    "validators": [{"hotkey": "5V", "delivered": requests, "failures": 0, "rejected": 0,
                                    "refused_signer": breaker == "open", "backoff_s": 0.0, "hint": None,
                                    "last_error": None}]},
        "actors": [{"name": "fanout", "status": "running", "restarts": 0}],
    }


def test_status_figures_are_summed_and_the_worst_breaker_shown() -> None:
    merged = merge_status(status(True, 10, "closed", 0, 1.0, 2), 0,
                          [{"index": 1, "status": status(True, 30, "open", 5, 3.0, 1)}])
    assert merged["ready"] is True and merged["requests"]["total"] == 40
    (miner,) = merged["miners"]
    assert miner["breaker"] == "open" and miner["requests"] == 20 and miner["failures"] == 5
    assert miner["failure_rate"] == 0.25
    (point,) = merged["chart"]["points"]
    assert point["requests_per_s"] == 4.0 and point["ttft_p99_s"] == 3.0
    scoring = merged["scoring"]
    assert scoring["delivered"] == 40 and scoring["dropped"] == {"overflow": 3.0} and scoring["warnings"] == ["w"]
    (validator,) = scoring["validators"]
    assert validator["delivered"] == 40 and validator["refused_signer"] is True
    assert [a["worker"] for a in merged["actors"]] == [0, 1]
    assert [w["index"] for w in merged["workers"]] == [0, 1]


def test_a_worker_not_ready_makes_the_gateway_not_ready() -> None:
    merged = merge_status(status(True, 1, "closed", 0, 1.0, 0), 0,
                          [{"index": 1, "status": status(False, 1, "closed", 0, 1.0, 0)}])
    assert merged["ready"] is False
