"""Benchmark figures: percentiles, gateway-versus-direct comparisons, the JSON document and the table.

Every load figure is a `Compared` triple: the value through the gateway, the value of the same load
sent straight to one miner (the limit: no gateway at all) and their ratio gateway/direct. Process
figures (CPU seconds, RSS) belong to the gateway alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.load import HeldStreams, LoadResult

SCHEMA = "sn1-gateway-bench/3"
# Targets, per gateway core, scoring on, as ratios within one run: requests/s as a share of the stack
# floor's, the median over alternating pairs of short phases at the concurrency of the gateway's peak
# (`share_entry`);
# a document without them: the peaks over the concurrencies, the floor's the mean of its blocks on
# either side of that fan-out's phases (`floor_beside`).
TARGET_FLOOR_SHARE = {1: 0.50, 5: 0.33}
TARGET_OPEN_STREAMS = 5000
TARGET_OPEN_STREAMS_RSS_MB = 500.0
TARGET_STARTUP_S = 1.5


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
    gateway_cpu_load_s: float | None = None  # the gateway's CPU over the load alone (no drain after it)
    gateway_cores: int | None = None  # the cores it was pinned to (None: not pinned)
    other_cores: int | None = None  # the cores the devnet and the load generator shared
    gateway_steady_cores: float | None = None  # its CPU use sampled over the middle half of the load


SATURATED_SHARE = 0.85  # a process (or a set of cores) at this share of its cores' time or more set the pace


def saturation(m: Measured) -> dict[str, Any]:
    """Which process set the pace of a phase: each one's CPU over the load as a share of the wall time
    (of one core), and the one at `SATURATED_SHARE` of the cores it had; "none" when nobody was (the
    phase was bound by latency: too few connections to fill a core)."""
    wall = m.load.wall_s
    if wall <= 0:
        return {"shares": {}, "saturated": None}
    gateway = m.gateway_cpu_load_s if m.gateway_cpu_load_s is not None else m.gateway_cpu_s
    gateway_share = None if gateway is None else gateway / wall
    devnet_share = None if m.miners_cpu_s is None else m.miners_cpu_s / wall
    load_share = m.load.cpu_s / wall
    shares = {"gateway": gateway_share, "devnet": devnet_share, "load_generator": load_share}
    saturated = "none"
    devnet = devnet_share or 0.0
    if gateway_share is not None and gateway_share >= SATURATED_SHARE * (m.gateway_cores or 1):
        saturated = "gateway"
    elif m.other_cores and devnet + load_share >= SATURATED_SHARE * m.other_cores:
        saturated = ("devnet (with the load generator, on their core)" if devnet > load_share
                     else "load_generator (with the devnet, on their core)")
    elif devnet >= SATURATED_SHARE:
        saturated = "devnet"
    elif load_share >= SATURATED_SHARE:
        saturated = "load_generator"
    return {"shares": {k: rounded(v) for k, v in shares.items()}, "saturated": saturated}


CONSISTENT_WITHIN = 0.15


def consistency(m: Measured) -> dict[str, Any]:
    """The run checks itself: CPU per completion x completions per second must be the gateway's CPU use
    as sampled on its own over the middle half of the load (in cores): a phase whose CPU leaked into
    another, or whose scoring fell behind the load, shows up as a difference. A saturated
    gateway should be near one core: when the load could not drive it there, the note says which
    process held it back."""
    load = m.load
    wall = load.wall_s
    notes: list[str] = []
    if m.gateway_cpu_s is None or wall <= 0 or not load.completed:
        return {"product_cores": None, "measured_cores": None, "agree": None, "notes": ["not measured"]}
    per = m.gateway_cpu_s / load.completed
    product = per * load.completed / wall
    measured = m.gateway_steady_cores
    if measured is None:
        measured = (m.gateway_cpu_load_s if m.gateway_cpu_load_s is not None else m.gateway_cpu_s) / wall
    agree = abs(product - measured) <= CONSISTENT_WITHIN * max(measured, 1e-9)
    if not agree:
        notes.append(f"CPU per completion x completions/s = {product:.2f} cores, but the gateway used "
                     f"{measured:.2f} over the load: {100 * (product - measured) / max(measured, 1e-9):+.0f}%"
                     + (f", scoring after the load took {m.scoring_drain_s:.1f}s" if m.scoring_drain_s else ""))
    pace = saturation(m)["saturated"]
    if load.concurrency >= 16 and pace != "gateway":
        why = (f"{pace} set the pace" if pace != "none" else "no process of the run was saturated either "
               "(other load on the machine, or too few connections)")
        notes.append(f"the gateway was not saturated ({measured:.2f} of a core): {why}")
    return {"product_cores": rounded(product), "measured_cores": rounded(measured), "agree": agree,
            "notes": notes}


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
        "saturation": {"gateway": saturation(gateway), "direct": saturation(direct)},
        "consistency": consistency(gateway),
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
        "saturation": {"gateway": saturation(gateway), "direct": saturation(direct)},
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


def floor_document(phases: Sequence[tuple[int, int | None, Measured]]) -> dict[str, Any]:
    """The stack's floor: its phases (each with its block, and the fan-out whose phases followed that
    block; None after the last), CPU per request over all of them, and its p50 at concurrency 1 (the
    first such phase)."""
    measured = [m for _, _, m in phases]
    c1 = next((p for p in measured if p.load.concurrency == 1), None)
    return {"what": FLOOR_WHAT,
            "phases": [{**floor_entry(m), "block": b, "before_fanout": f} for b, f, m in phases],
            "cpu_ms_per_request": cpu_per_completion(measured),
            "p50_ms_at_c1": rounded(ms(percentile(c1.load.latencies, 50))) if c1 is not None else None}


WORKERS_PINNED = "core 0 alone, as every other gateway of the run"
WORKERS_SHARED = "every core, shared with the devnet, the validator, Redis and the load generator"
WORKERS_NOTE = ("fanout 1 at the run's highest concurrency, keys in a Redis of the run's own (auth.store = "
                "\"redis\", as more than one worker needs); one worker is pinned to the gateway's core, more "
                "than one cannot be: they use every core, shared with the peers, so the ratio is what one "
                "machine of this size gains from a second worker, not a per-core figure. CPU is that of the "
                "supervisor and every worker over the load (scoring's work after it is not waited for)")


def workers_entry(workers: int, measured: Measured, *, pinned: bool) -> dict[str, Any]:
    """One workers phase: requests/s and latency, and the CPU of every process of the gateway (the
    supervisor and its workers) over the load."""
    load = measured.load
    return {"workers": workers, "fanout": 1, "concurrency": load.concurrency,
            "cores": WORKERS_PINNED if pinned else WORKERS_SHARED,
            "requests": load.completed, "errors": load.errors, "statuses": _statuses(load),
            "rps": rounded(rps(load), 1), "p50_ms": rounded(ms(percentile(load.latencies, 50))),
            "p99_ms": rounded(ms(percentile(load.latencies, 99))),
            "gateway_cpu_ms_per_completion": rounded(per_request_ms(measured.gateway_cpu_s, load.completed)),
            "gateway_cores_used": rounded(measured.gateway_cpu_load_s / load.wall_s
                                          if measured.gateway_cpu_load_s is not None and load.wall_s > 0 else None),
            **_scoring_drain(measured)}


def workers_document(phases: Sequence[tuple[int, Measured]], *, pinned: bool, skipped: str | None,
                     startups: Sequence[float] = ()) -> dict[str, Any]:
    """The workers phases, and requests/s of the most workers over that of one (None when either is missing)."""
    entries = [{**workers_entry(n, m, pinned=pinned and n == 1),
                "startup_s": round(startups[i], 3) if i < len(startups) else None}
               for i, (n, m) in enumerate(phases)]
    by_count = {e["workers"]: e["rps"] for e in entries}
    most = max(by_count, default=1)
    one, many = by_count.get(1), by_count.get(most)
    ratio = None if not one or many is None or most == 1 else round(many / one, 3)
    return {"what": WORKERS_NOTE, "phases": entries, "ratio": ratio, "ratio_workers": most, "skipped": skipped}


def peak_rps(entries: Sequence[dict[str, Any]], key: str = "gateway") -> float | None:
    """The highest requests/s over a set of phases (the figure of the concurrency that saturated)."""
    values = [e["rps"][key] if isinstance(e["rps"], dict) else e["rps"] for e in entries]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def floor_beside(phases: Sequence[dict[str, Any]], fanout: int) -> float | None:
    """The floor's requests/s that fan-out `fanout`'s share is of: the mean of the peaks of the floor's
    blocks just before and just after its phases (the one before alone when none came after); the
    peak of every phase in a document whose floor has no blocks, or none before this fan-out."""
    before = next((p["block"] for p in phases if "block" in p and p.get("before_fanout") == fanout), None)
    if before is None:
        return peak_rps(phases)
    peaks = [peak for block in (before, before + 1)
             if (peak := peak_rps([p for p in phases if p.get("block") == block])) is not None]
    return round(sum(peaks) / len(peaks), 1) if peaks else None


def share_entry(fanout: int, concurrency: int, pairs: Sequence[tuple[Measured, Measured]]) -> dict[str, Any]:
    """Fan-out `fanout`'s share of the floor from its alternating (floor, gateway) pairs: each pair's
    ratio of requests/s, and their median (None when no pair measured both)."""
    entries = []
    for floor, gateway in pairs:
        floor_rps, gateway_rps = rps(floor.load), rps(gateway.load)
        entries.append({"floor_rps": rounded(floor_rps, 1), "gateway_rps": rounded(gateway_rps, 1),
                        "ratio": rounded(gateway_rps / floor_rps) if floor_rps > 0 else None,
                        "floor_errors": floor.load.errors, "gateway_errors": gateway.load.errors})
    ratios = [e["ratio"] for e in entries if e["ratio"] is not None]
    floors = [e["floor_rps"] for e in entries if e["floor_rps"]]
    return {"fanout": fanout, "concurrency": concurrency, "pairs": entries,
            "share": rounded(statistics.median(ratios)) if ratios else None,
            "floor_rps_median": rounded(statistics.median(floors), 1) if floors else None}


def targets(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with what was measured, whether it was met (None: not measured) and the stack
    floor's figure it is a share of, where there is one."""
    out: list[dict[str, Any]] = []
    floor = document.get("stack_floor") or {}
    pairs = {e["fanout"]: e for e in document.get("floor_shares") or []}
    for fanout, share in TARGET_FLOOR_SHARE.items():
        floor_rps = floor_beside(floor.get("phases") or [], fanout)
        gateway = peak_rps([e for e in document["completions"] if e["fanout"] == fanout])
        of_peaks = None if gateway is None or not floor_rps else round(gateway / floor_rps, 3)
        paired = pairs.get(fanout)
        if paired is not None:
            target = _target(f"fanout {fanout}: requests/s per gateway core, share of the stack floor's "
                             f"(median of alternating pairs at c={paired['concurrency']})", share, paired["share"],
                             paired["floor_rps_median"], at_least=True)
        else:
            target = _target(f"fanout {fanout}: requests/s per gateway core, share of the stack floor's "
                             "(peak over concurrencies)", share, of_peaks, floor_rps, at_least=True)
        out.append({**target, "share_of_peaks": of_peaks})
    process = document["gateway_process"]
    held = next((h for h in process["open_streams"] if h["wanted"] == TARGET_OPEN_STREAMS), None)
    rss = held["rss_mb"] if held is not None and held["opened"] == held["wanted"] else None
    out.append(_target(f"gateway RSS with {TARGET_OPEN_STREAMS} open streams (MB)", TARGET_OPEN_STREAMS_RSS_MB,
                       rss))
    startups = process.get("startup_s") or []
    out.append(_target("start-up: serve to the first /health 200, slowest of the run's gateways (s)",
                       TARGET_STARTUP_S, max(startups) if startups else None))
    return out


def _target(name: str, limit: float, measured: float | None, floor: float | None = None, *,
            at_least: bool = False) -> dict[str, Any]:
    met = None if measured is None else (measured >= limit if at_least else measured <= limit)
    return {"target": name, "limit": limit, "at_least": at_least, "measured": measured, "met": met,
            "stack_floor": floor}


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
    rows += [_row([f"c={p['concurrency']}" + ("" if "block" not in p else ", after the fan-outs"
                                              if p.get("before_fanout") is None
                                              else f", before fanout {p['before_fanout']}"),
                   _fmt(p["rps"], 0), _fmt(p["p50_ms"]), _fmt(p["p99_ms"]),
                   _fmt(p["cpu_ms_per_request"], 3)]) for p in floor["phases"]]
    return rows


def _share_rows(shares: Sequence[dict[str, Any]]) -> list[str]:
    if not shares:
        return []
    rows = ["", _row(["share of the stack floor, alternating pairs", "floor requests/s", "gateway requests/s",
                      "ratio"]), _row(["---", "---:", "---:", "---:"])]
    for e in shares:
        for i, pair in enumerate(e["pairs"], 1):
            rows.append(_row([f"fanout {e['fanout']}, c={e['concurrency']}, pair {i}", _fmt(pair["floor_rps"], 0),
                              _fmt(pair["gateway_rps"], 0), _fmt(pair["ratio"], 3)]))
        rows.append(_row([f"fanout {e['fanout']}: median", _fmt(e["floor_rps_median"], 0), "", _fmt(e["share"], 3)]))
    return rows


def workers_rows(workers: dict[str, Any] | None) -> list[str]:
    if not workers:
        return []
    if workers["skipped"]:
        return ["", f"workers: not measured, {workers['skipped']}"]
    if not workers["phases"]:
        return []
    rows = ["", _row(["server.workers (fanout 1)", "requests/s", "p50 ms", "p99 ms", "CPU ms/req (all processes)",
                      "cores used", "on"]), _row(["---", "---:", "---:", "---:", "---:", "---:", "---"])]
    rows += [_row([f"{p['workers']}, c={p['concurrency']}", _fmt(p["rps"], 0), _fmt(p["p50_ms"]), _fmt(p["p99_ms"]),
                   _fmt(p["gateway_cpu_ms_per_completion"], 3), _fmt(p["gateway_cores_used"]), p["cores"]])
             for p in workers["phases"]]
    rows.append(_row([f"ratio, {workers['ratio_workers']} workers / 1", _fmt(workers["ratio"]), "", "", "",
                      "", "the figure with more workers uses both cores, shared with the peers"]))
    return rows


def _pace_rows(document: dict[str, Any]) -> list[str]:
    """Per gateway phase: who saturated, each process's share of a core, and the consistency check."""
    rows = ["", _row(["phase", "saturated", "gateway cores", "devnet cores", "load cores", "CPU/completion x rate",
                      "check"]), _row(["---", "---", "---:", "---:", "---:", "---:", "---"])]
    for e in document["completions"]:
        pace, check = e["saturation"]["gateway"], e["consistency"]
        shares = pace["shares"]
        rows.append(_row([f"fanout {e['fanout']}, c={e['concurrency']}", str(pace["saturated"]),
                          _fmt(shares.get("gateway")), _fmt(shares.get("devnet")), _fmt(shares.get("load_generator")),
                          _fmt(check["product_cores"]),
                          "ok" if check["agree"] and not check["notes"] else "; ".join(check["notes"]) or "-"]))
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
    load = document["load_generator"]
    extra = [
        "",
        _row(["gateway process", "value"]),
        _row(["---", "---:"]),
        *(_row([f"CPU ms per completion, fanout {f}", _fmt(v, 3)])
          for f, v in process["cpu_ms_per_completion"].items()),
        _row(["peak RSS MB", _fmt(process["peak_rss_mb"], 1)]),
        *(_row([f"RSS MB with {held['opened']}/{held['wanted']} open streams (fanout {held['fanout']})",
                _fmt(held["rss_mb"], 1)]) for held in process["open_streams"]),
        _row(["start-up s, serve to first /health 200 (each gateway)",
              ", ".join(_fmt(x, 2) for x in process.get("startup_s", [])) or "-"]),
        _row(["load generator CPU s / wall s", f"{_fmt(load['cpu_s'], 1)} / {_fmt(load['wall_s'], 1)}"]),
        _row(["miners process CPU s", _fmt(document["miners_process"]["cpu_s"], 1)]),
        _row(["machine: one sr25519 signature, us (22 where the budget was written)",
              _fmt(document["machine"]["calibration"].get("sr25519_sign_us"), 1)]),
        _row(["machine: load average at start / end",
              f"{document['machine']['load_average']['start'][0]} / {document['machine']['load_average']['end'][0]}"]),
        *_floor_rows(document.get("stack_floor")),
        *_share_rows(document.get("floor_shares") or []),
        *workers_rows(document.get("workers")),
        "",
        *_pace_rows(document),
        "",
        _row(["target", "limit", "measured", "met", "stack floor"]),
        _row(["---", "---:", "---:", "---", "---:"]),
        *(_row([t["target"], ("at least " if t.get("at_least") else "at most ") + _fmt(t["limit"], 2),
                _fmt(t["measured"], 3),
                {True: "yes", False: "NO", None: "not measured"}[t["met"]], _fmt(t.get("stack_floor"), 3)])
          for t in document["targets"]),
    ]
    return "\n".join(lines + extra)
