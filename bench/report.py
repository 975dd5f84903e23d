"""Benchmark figures: percentiles, gateway-versus-direct comparisons, the JSON document and the table.

Every load figure is a `Compared` triple: the value through the gateway, the value of the same load
sent straight to one miner (the limit: no gateway at all) and their ratio gateway/direct. Process
figures (CPU seconds, RSS) belong to the gateway alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.load import HeldStreams, LoadResult

SCHEMA = "sn1-gateway-bench/1"
# Targets of issue 7 on a 2-core machine shared by gateway, miners and load generator.
TARGET_ADDED_P50_MS = 2.0
TARGET_CPU_MS = {1: 1.5, 5: 5.0}
TARGET_OPEN_STREAMS_RSS_MB = 300.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    """JSON-safe: None for missing or non-finite values."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def compared(gateway: float | None, direct: float | None, digits: int = 3) -> dict[str, float | None]:
    ratio = None
    if gateway is not None and direct is not None and math.isfinite(gateway) and math.isfinite(direct) and direct:
        ratio = gateway / direct
    return {"gateway": rounded(gateway, digits), "direct": rounded(direct, digits), "ratio": rounded(ratio, 3)}


@dataclass(frozen=True)
class ProcessSample:
    """CPU seconds and memory of a process, from /proc."""

    cpu_s: float
    rss_mb: float
    peak_rss_mb: float


@dataclass(frozen=True)
class Measured:
    """One load phase: the load's own figures and what the processes spent meanwhile."""

    load: LoadResult
    gateway_cpu_s: float | None = None  # None for the direct phase (no gateway involved)
    miners_cpu_s: float | None = None
    scoring_drain_s: float = 0.0  # how long the gateway took, after the load, to forward the phase's organics
    scoring_backlog: int | None = None  # organics it still held when the wait ended (None: not asked)


def rps(result: LoadResult) -> float:
    return result.completed / result.wall_s if result.wall_s > 0 else math.nan


def ms(seconds: float) -> float:
    return seconds * 1000.0


def per_request_ms(cpu_s: float | None, count: int) -> float | None:
    return None if cpu_s is None or count <= 0 else ms(cpu_s) / count


def completion_entry(fanout: int, gateway: Measured, direct: Measured) -> dict[str, Any]:
    g, d = gateway.load, direct.load
    return {
        "fanout": fanout,
        "concurrency": g.concurrency,
        "requests": {"gateway": g.completed, "direct": d.completed},
        "errors": {"gateway": g.errors, "direct": d.errors},
        "statuses": {"gateway": _statuses(g), "direct": _statuses(d)},
        "rps": compared(rps(g), rps(d), 1),
        "p50_ms": compared(ms(percentile(g.latencies, 50)), ms(percentile(d.latencies, 50))),
        "p90_ms": compared(ms(percentile(g.latencies, 90)), ms(percentile(d.latencies, 90))),
        "p99_ms": compared(ms(percentile(g.latencies, 99)), ms(percentile(d.latencies, 99))),
        "gateway_cpu_ms_per_completion": rounded(per_request_ms(gateway.gateway_cpu_s, g.completed)),
        **_scoring_drain(gateway),
        "miners_cpu_ms_per_completion": compared(per_request_ms(gateway.miners_cpu_s, g.completed),
                                                 per_request_ms(direct.miners_cpu_s, d.completed)),
        "load_cpu_ms_per_request": compared(per_request_ms(g.cpu_s, g.completed),
                                            per_request_ms(d.cpu_s, d.completed)),
    }


def streaming_entry(fanout: int, gateway: Measured, direct: Measured) -> dict[str, Any]:
    g, d = gateway.load, direct.load
    return {
        "fanout": fanout,
        "concurrency": g.concurrency,
        "streams": {"gateway": g.completed, "direct": d.completed},
        "errors": {"gateway": g.errors, "direct": d.errors},
        "statuses": {"gateway": _statuses(g), "direct": _statuses(d)},
        "tokens_per_stream": compared(g.tokens / g.completed if g.completed else None,
                                      d.tokens / d.completed if d.completed else None, 1),
        "ttft_p50_ms": compared(ms(percentile(g.ttfts, 50)), ms(percentile(d.ttfts, 50))),
        "ttft_p99_ms": compared(ms(percentile(g.ttfts, 99)), ms(percentile(d.ttfts, 99))),
        "tokens_per_s_per_stream": compared(percentile(g.token_rates, 50), percentile(d.token_rates, 50), 1),
        "streams_per_s": compared(rps(g), rps(d), 1),
        "gateway_cpu_ms_per_stream": rounded(per_request_ms(gateway.gateway_cpu_s, g.completed)),
        **_scoring_drain(gateway),
        "load_cpu_ms_per_stream": compared(per_request_ms(g.cpu_s, g.completed),
                                           per_request_ms(d.cpu_s, d.completed)),
    }


def _scoring_drain(gateway: Measured) -> dict[str, Any]:
    """How long the gateway went on forwarding the phase's organics after the load (its CPU meanwhile
    is counted in the phase's), and how many it still held when the wait ended."""
    return {"scoring_drain_s": rounded(gateway.scoring_drain_s, 2), "scoring_backlog_left": gateway.scoring_backlog}


def _statuses(result: LoadResult) -> dict[str, int]:
    """HTTP statuses answered, by code (requests that got no answer at all are only in `errors`)."""
    return {str(code): count for code, count in sorted(result.statuses.items())}


def cpu_per_completion(phases: Sequence[Measured]) -> float | None:
    """Gateway CPU over all of a fanout's non-streaming phases, per completed request."""
    cpu = sum(p.gateway_cpu_s or 0.0 for p in phases)
    count = sum(p.load.completed for p in phases)
    return rounded(per_request_ms(cpu, count))


def open_streams_entry(held: HeldStreams | None, *, fanout: int, rss_before_mb: float | None) -> dict[str, Any]:
    if held is None:
        return {"wanted": 0, "fanout": fanout, "opened": 0, "finished": 0, "errors": 0,
                "rss_mb": None, "rss_before_mb": None, "open_s": None}
    return {"wanted": held.wanted, "fanout": fanout, "opened": held.opened, "finished": held.finished,
            "errors": held.errors, "rss_mb": rounded(held.sample, 1), "rss_before_mb": rounded(rss_before_mb, 1),
            "open_s": rounded(held.open_s, 2)}


FLOOR_WHAT = ("a bare Quart-Trio app on Hypercorn, served as the gateway is, that parses the same request and "
              "answers a fixed completion at once: the least a handler on this stack costs here")


def floor_entry(measured: Measured) -> dict[str, Any]:
    load = measured.load
    return {"concurrency": load.concurrency, "requests": load.completed, "errors": load.errors,
            "rps": rounded(rps(load), 1), "p50_ms": rounded(ms(percentile(load.latencies, 50))),
            "p99_ms": rounded(ms(percentile(load.latencies, 99))),
            "cpu_ms_per_request": rounded(per_request_ms(measured.gateway_cpu_s, load.completed))}


def floor_document(phases: Sequence[Measured]) -> dict[str, Any]:
    """The stack's floor: its phases, CPU per request over all of them, and its p50 at concurrency 1."""
    c1 = next((p for p in phases if p.load.concurrency == 1), None)
    return {"what": FLOOR_WHAT, "phases": [floor_entry(p) for p in phases],
            "cpu_ms_per_request": cpu_per_completion(phases),
            "p50_ms_at_c1": rounded(ms(percentile(c1.load.latencies, 50))) if c1 is not None else None}


def targets(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's targets, each with what was measured, whether it was met (None: not measured) and the
    stack's floor for the same figure (what a bare Quart-Trio app on Hypercorn spends), where there is one."""
    out: list[dict[str, Any]] = []
    floor = document.get("stack_floor") or {}
    base = next((e for e in document["completions"] if e["fanout"] == 1 and e["concurrency"] == 1), None)
    added = None
    if base is not None and base["p50_ms"]["gateway"] is not None and base["p50_ms"]["direct"] is not None:
        added = round(base["p50_ms"]["gateway"] - base["p50_ms"]["direct"], 3)
    # a proxy adds at least one inbound request on its stack: the floor's whole round trip at c=1
    out.append(_target("fanout 1 adds at most 2 ms at p50, concurrency 1, over direct (ms added)",
                       TARGET_ADDED_P50_MS, added, floor.get("p50_ms_at_c1")))
    for fanout, limit in TARGET_CPU_MS.items():
        measured = document["gateway_process"]["cpu_ms_per_completion"].get(str(fanout))
        out.append(_target(f"gateway CPU per completion at fanout {fanout} (ms)", limit, measured,
                           floor.get("cpu_ms_per_request")))
    held = document["gateway_process"]["open_streams"]
    rss = held["rss_mb"] if held["wanted"] and held["opened"] == held["wanted"] else None
    out.append(_target(f"gateway RSS with {held['wanted'] or 1000} open streams (MB)",
                       TARGET_OPEN_STREAMS_RSS_MB, rss))
    return out


def _target(name: str, limit: float, measured: float | None, floor: float | None = None) -> dict[str, Any]:
    return {"target": name, "limit": limit, "measured": measured,
            "met": None if measured is None else measured <= limit, "stack_floor": floor}


# -- the table ----------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _floor_rows(floor: dict[str, Any] | None) -> list[str]:
    if not floor or not floor["phases"]:
        return []
    rows = ["", _row(["stack floor: bare Quart-Trio app on Hypercorn", "requests/s", "p50 ms", "p99 ms",
                      "CPU ms/req"]), _row(["---", "---:", "---:", "---:", "---:"])]
    rows += [_row([f"c={p['concurrency']}", _fmt(p["rps"], 0), _fmt(p["p50_ms"]), _fmt(p["p99_ms"]),
                   _fmt(p["cpu_ms_per_request"], 3)]) for p in floor["phases"]]
    return rows


def table(document: dict[str, Any]) -> str:
    """The figures as a Markdown table (readable in a terminal, pasted as is into the README)."""
    lines = [_row(["figure", "gateway", "direct", "gateway/direct", "gateway CPU ms/req"]),
             _row(["---", "---:", "---:", "---:", "---:"])]
    for e in document["completions"]:
        where = f"fanout {e['fanout']}, c={e['concurrency']}"
        cpu = _fmt(e["gateway_cpu_ms_per_completion"], 3)
        lines.append(_row([f"{where}: requests/s", _fmt(e["rps"]["gateway"], 0), _fmt(e["rps"]["direct"], 0),
                           _fmt(e["rps"]["ratio"]), cpu]))
        for q in ("p50_ms", "p90_ms", "p99_ms"):
            fig = e[q]
            lines.append(_row([f"{where}: latency {q[:3]} ms", _fmt(fig["gateway"]), _fmt(fig["direct"]),
                               _fmt(fig["ratio"]), ""]))
    for e in document["streaming"]:
        where = f"streaming, fanout {e['fanout']}, {e['concurrency']} streams"
        cpu = _fmt(e["gateway_cpu_ms_per_stream"], 3)
        for key, label, digits in (("ttft_p50_ms", "first token p50 ms", 2), ("ttft_p99_ms", "first token p99 ms", 2),
                                   ("tokens_per_s_per_stream", "tokens/s per stream", 0)):
            fig = e[key]
            lines.append(_row([f"{where}: {label}", _fmt(fig["gateway"], digits), _fmt(fig["direct"], digits),
                               _fmt(fig["ratio"]), cpu if key == "ttft_p50_ms" else ""]))
    process = document["gateway_process"]
    held = process["open_streams"]
    load = document["load_generator"]
    extra = [
        "",
        _row(["gateway process", "value"]),
        _row(["---", "---:"]),
        *(_row([f"CPU ms per completion, fanout {f}", _fmt(v, 3)])
          for f, v in process["cpu_ms_per_completion"].items()),
        _row(["peak RSS MB", _fmt(process["peak_rss_mb"], 1)]),
        _row([f"RSS MB with {held['opened']}/{held['wanted']} open streams (fanout {held['fanout']})",
              _fmt(held["rss_mb"], 1)]),
        _row(["load generator CPU s / wall s", f"{_fmt(load['cpu_s'], 1)} / {_fmt(load['wall_s'], 1)}"]),
        _row(["miners process CPU s", _fmt(document["miners_process"]["cpu_s"], 1)]),
        _row(["machine: one sr25519 signature, us (22 where the budget was written)",
              _fmt(document["machine"]["calibration"].get("sr25519_sign_us"), 1)]),
        _row(["machine: load average at start / end",
              f"{document['machine']['load_average']['start'][0]} / {document['machine']['load_average']['end'][0]}"]),
        *_floor_rows(document.get("stack_floor")),
        "",
        _row(["target", "limit", "measured", "met", "stack floor"]),
        _row(["---", "---:", "---:", "---", "---:"]),
        *(_row([t["target"], _fmt(t["limit"], 1), _fmt(t["measured"], 3),
                {True: "yes", False: "NO", None: "not measured"}[t["met"]], _fmt(t.get("stack_floor"), 3)])
          for t in document["targets"]),
    ]
    return "\n".join(lines + extra)
