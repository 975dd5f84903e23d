"""`sn1-gateway bench --scenario subnet`: quality of service over miners as they really are.

A lean devnet of 50 miners drawn from `devnet.population` (log-normal time to first token, 20-80
tokens/s, errors, refusals, hangs, breaks, garbage, miners slow for a minute) runs in this process
beside the load; a gateway (`sn1-gateway serve`, on its own core) serves clients sending streaming and
non-streaming requests at a steady rate. The same requests (the same seeds, so every miner plans the
same for each) go through one gateway per miner choice: "uniform" (upstream's: uniform among the top
by incentive, first to answer wins) and "learned". Every miner reports what it planned for each
request it got, so each request has its oracle: the fastest healthy miner among those asked. The
validator reads which miners each organic covers (fairness).

Reported per minute and overall, per choice: success rate, the client's time to first token (streams)
and to the whole answer (non-streaming) at p50/p99 next to the oracle's, and each miner's share of
organics with the longest stretch it went without one.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomlkit
import trio

from bench import report
from bench.load import Connection, Endpoint, ProtocolError, request_bytes
from bench.processes import (
    Child,
    ChildFailed,
    byte_compile,
    cli,
    compiled_env,
    core_plan,
    pin,
    run_command,
    start_child,
)
from devnet import text
from devnet.lean import LeanDevnet, PlannedRequest
from devnet.population import MinerProfile, population
from wire import jsonio

SCHEMA = "sn1-gateway-bench-subnet/1"
CHAT_PATH = "/v1/chat/completions"
RATE_LIMIT = 1_000_000
PROMPT = "Tell me about the subnet."
# Targets for the learned choice (issue 15 section 2).
TARGET_SUCCESS = 0.995
TARGET_ORACLE_RATIO = 1.15  # client p50 within 15% of the best-of-asked oracle
TARGET_GAIN_OVER_UNIFORM = 0.30  # client p50 at least 30% better than uniform choice
TARGET_MAX_GAP_S = 120.0  # no serving miner without organics for longer (a run is 3 minutes)


@dataclass(frozen=True)
class ScenarioOptions:
    out: Path = Path("bench-subnet.json")
    quick: bool = False
    duration_s: float = 180.0  # of client load, per miner choice
    rate: float = 4.0  # client requests per second
    miners: int = 50
    fanout: int = 5
    stream_share: float = 0.5
    max_tokens: int = 48
    selections: tuple[str, ...] = ("uniform", "learned")
    explore_share: float = 0.2
    window_s: float = 60.0  # the per-minute rows
    population_seed: int = 1
    request_seed: int = 7
    settle_s: float = 20.0  # after the load, how long requests still running may finish
    keep_dir: Path | None = None

    @classmethod
    def quick_run(cls, **kw: Any) -> ScenarioOptions:
        defaults: dict[str, Any] = dict(quick=True, duration_s=12.0, rate=5.0, max_tokens=16, window_s=4.0,
                                        settle_s=6.0)
        return cls(**{**defaults, **kw})


@dataclass
class ClientRequest:
    """One client request as sent, and what the client saw."""

    index: int
    seed: int
    stream: bool
    at_s: float  # when it was sent, seconds into the run
    status: int = 0
    ok: bool = False
    ttft_s: float | None = None  # streams: to the first content token; otherwise to the whole answer
    error: str | None = None


@dataclass
class Organic:
    """One scoring payload the validator took: the request's seed and the miners it covers."""

    seed: int
    uids: list[int]
    at_s: float


@dataclass
class RunRecord:
    selection: str
    requests: list[ClientRequest] = field(default_factory=list)
    plans: dict[int, list[PlannedRequest]] = field(default_factory=dict)  # by seed
    organics: list[Organic] = field(default_factory=list)
    startup_s: float | None = None
    gateway_cpu_s: float | None = None
    wall_s: float = 0.0


def schedule(options: ScenarioOptions) -> list[tuple[int, int, bool, float]]:
    """(index, seed, stream, send time) of every request: a steady rate, the same in every run."""
    rng = random.Random(options.request_seed)
    count = int(options.duration_s * options.rate)
    return [(i, 1_000_000 + i, rng.random() < options.stream_share, i / options.rate) for i in range(count)]


def client_body(seed: int, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": PROMPT}], "stream": stream, "seed": seed,
            "max_tokens": max_tokens}


def answer_tokens(seed: int, max_tokens: int) -> int:
    """How many tokens every miner answers the request with `seed` (the same text at each miner)."""
    return len(text.answer(seed, [{"role": "user", "content": PROMPT}], max_tokens).tokens)


class Scenario:
    def __init__(self, options: ScenarioOptions, workdir: Path, nursery: trio.Nursery) -> None:
        self.options = options
        self.workdir = workdir
        self.nursery = nursery
        self.profiles: list[MinerProfile] = population(options.miners, duration_s=options.duration_s,
                                                       seed=options.population_seed)
        self.record: RunRecord | None = None
        self.devnet = LeanDevnet(profiles=self.profiles, on_plan=self._planned, on_scored=self._scored)
        self.gateway_cpus, self.other_cpus = core_plan(os.cpu_count() or 1)
        self.child_env = compiled_env(workdir / "pycache")

    def log(self, message: str) -> None:
        print(f"[bench subnet] {message}", flush=True)

    def _planned(self, planned: PlannedRequest) -> None:
        if self.record is not None:
            self.record.plans.setdefault(planned.seed, []).append(planned)

    def _scored(self, body: bytes) -> None:
        started = self.devnet.started_at
        if self.record is None or started is None:
            return
        try:
            payload = jsonio.loads(body)
            seed = int(payload["body"]["seed"])
            uids = [int(u) for u in payload["uids"]]
        except (ValueError, KeyError, TypeError):
            return
        self.record.organics.append(Organic(seed, uids, trio.current_time() - started))

    def gateway_config(self, selection: str) -> str:
        options = self.options
        config = self.devnet.config()
        config.update({
            "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 1.0},
            "auth": {"store": "file", "keys_file": str(self.workdir / f"keys-{selection}.toml"), "admin_key": ""},
            "fanout": {"miners": options.fanout, "selection": selection, "explore_share": options.explore_share},
        })
        config["scoring"] = {**config["scoring"], "enabled": True, "spool_dir": str(self.workdir / f"spool-{selection}")}
        return tomlkit.dumps(config)

    async def start_gateway(self, selection: str) -> tuple[Child[str], str, float]:
        from bench.run import gateway_ready, wait_health

        path = self.workdir / f"gateway-{selection}.toml"
        path.write_text(self.gateway_config(selection), encoding="utf-8")
        out = await run_command(cli("keys", "create", "--rate-limit", str(RATE_LIMIT), "--config", str(path)),
                                cwd=self.workdir)
        child = await start_child(self.nursery, f"gateway-{selection}", cli("serve", "--config", str(path)),
                                  cwd=self.workdir, ready=gateway_ready, cpus=self.gateway_cpus, env=self.child_env)
        startup = await wait_health(child.ready, child.spawned_at)
        return child, out.strip().splitlines()[0], startup

    async def one_run(self, selection: str) -> RunRecord:
        options = self.options
        child, api_key, startup = await self.start_gateway(selection)
        self.log(f"{selection}: gateway up at {child.ready} (pid {child.pid}, start-up {startup:.2f}s); "
                 f"{options.rate:g} requests/s for {options.duration_s:g}s")
        record = RunRecord(selection, startup_s=startup)
        endpoint = Endpoint.parse(child.ready, CHAT_PATH)
        try:
            cpu0 = child.sample().cpu_s
            self.record = record
            self.devnet.start_clock()
            started = trio.current_time()
            wall0 = time.perf_counter()
            with trio.move_on_after(options.duration_s + options.settle_s):
                async with trio.open_nursery() as clients:
                    for index, seed, stream, at in schedule(options):
                        await trio.sleep_until(started + at)
                        request = ClientRequest(index, seed, stream, at)
                        record.requests.append(request)
                        clients.start_soon(self.send, endpoint, api_key, request)
            record.wall_s = time.perf_counter() - wall0
            record.gateway_cpu_s = child.sample().cpu_s - cpu0
            await trio.sleep(0.5)  # the organics of the last answers reach the validator
        finally:
            self.record = None
            await child.stop()
        for request in record.requests:
            if request.status == 0 and request.error is None:
                request.error = "still waiting when the run ended"
        return record

    async def send(self, endpoint: Endpoint, api_key: str, request: ClientRequest) -> None:
        body = json.dumps(client_body(request.seed, request.stream, self.options.max_tokens)).encode()
        raw = request_bytes(endpoint, body, {"api-key": api_key, "Connection": "close"})
        sent = time.perf_counter()
        try:
            conn = await Connection.open(endpoint)
            try:
                exchange = await conn.exchange(raw, scan=request.stream, keep_body=not request.stream)
            finally:
                await conn.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, ValueError) as exc:
            request.error = f"{type(exc).__name__}: {exc}"
            return
        request.status = exchange.status
        if request.stream:
            request.ok = exchange.status == 200 and exchange.done and exchange.tokens > 0
            if exchange.first_token is not None:  # perf_counter, as `sent`
                request.ttft_s = exchange.first_token - sent
        else:
            request.ok = exchange.status == 200 and _has_content(exchange.body)
            request.ttft_s = time.perf_counter() - sent
        if not request.ok:
            request.error = f"HTTP {exchange.status}" + ("" if exchange.status != 200 else ", incomplete answer")

    async def run(self) -> dict[str, Any]:
        options = self.options
        started = time.time()
        load_start = [round(x, 2) for x in os.getloadavg()]
        if self.other_cpus is not None:
            pin(0, self.other_cpus)
        await byte_compile(self.child_env, self.workdir)
        await self.nursery.start(self.devnet.run)
        faulty = sum(1 for p in self.profiles if p.fault)
        self.log(f"devnet: {len(self.profiles)} lean miners ({faulty} with faults, "
                 f"{sum(1 for p in self.profiles if p.slow_from_s is not None)} slow for a while)")
        runs = []
        for selection in options.selections:
            record = await self.one_run(selection)
            runs.append(record)
            summary = analyse(record, self.profiles, options)
            overall = summary["overall"]
            self.log(f"{selection}: success {overall['success_rate']}, stream TTFT p50 "
                     f"{overall['stream_ttft_s']['client_p50']}s (oracle {overall['stream_ttft_s']['oracle_p50']}s)")
        doc = document(runs, self.profiles, options, started, load_start)
        return doc


def _has_content(body: bytes | None) -> bool:
    try:
        answer = jsonio.loads(body or b"")
        return bool(answer["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        return False


# -- analysis -------------------------------------------------------------------------------------


def oracle_s(request: ClientRequest, plans: list[PlannedRequest], tokens: int) -> float | None:
    """The fastest healthy miner among those asked: its first token (streams) or last (otherwise)."""
    healthy = [p.plan for p in plans if p.plan.healthy]
    if not healthy:
        return None
    return min(p.ttft_s if request.stream else p.answer_s(tokens) for p in healthy)


def _p(values: list[float], q: float) -> float | None:
    return report.rounded(report.percentile(values, q), 3) if values else None


def summarise(requests: list[ClientRequest], oracle: dict[int, float | None]) -> dict[str, Any]:
    done = [r for r in requests]
    ok = [r for r in done if r.ok]
    out: dict[str, Any] = {"requests": len(done), "succeeded": len(ok),
                           "success_rate": report.rounded(len(ok) / len(done), 4) if done else None}
    for stream, key in ((True, "stream_ttft_s"), (False, "answer_s")):
        mine = [r for r in ok if r.stream == stream and r.ttft_s is not None]
        client = [r.ttft_s for r in mine if r.ttft_s is not None]
        best = [o for r in mine if (o := oracle.get(r.index)) is not None]
        out[key] = {"client_p50": _p(client, 50), "client_p99": _p(client, 99),
                    "oracle_p50": _p(best, 50), "oracle_p99": _p(best, 99), "count": len(client)}
    return out


def fairness(record: RunRecord, profiles: list[MinerProfile], options: ScenarioOptions) -> dict[str, Any]:
    """Each miner's share of organics (the requests it was asked: what the miners received, and what
    the validator was sent, which also names miners that refused the connection), and the longest it
    went without one (serving miners: those that listen), timed by when the client sent the request,
    from the start of the run to its end."""
    end = options.duration_s
    sent_at = {r.seed: r.at_s for r in record.requests}
    asked: dict[int, set[int]] = {}
    for seed, plans in record.plans.items():
        asked.setdefault(seed, set()).update(p.uid for p in plans)
    for organic in record.organics:
        asked.setdefault(organic.seed, set()).update(organic.uids)
    times: dict[int, list[float]] = {p.uid: [] for p in profiles}
    for seed, uids in asked.items():
        at = sent_at.get(seed)
        if at is None:
            continue
        for uid in uids:
            if uid in times:
                times[uid].append(at)
    total = sum(len(v) for v in times.values())
    miners: list[dict[str, Any]] = []
    for profile in profiles:
        seen = sorted(t for t in times[profile.uid] if t <= end)
        edges = [0.0, *seen, end]
        gap = max(b - a for a, b in itertools.pairwise(edges))
        miners.append({"uid": profile.uid, "fault": profile.fault or None,
                       "median_ttft_s": round(profile.ttft_median_s, 3),
                       "organics": len(times[profile.uid]),
                       "share": report.rounded(len(times[profile.uid]) / total, 4) if total else None,
                       "longest_gap_s": round(gap, 1)})
    serving = [m for m in miners if m["fault"] != "refuse"]
    shares = sorted(m["share"] or 0.0 for m in serving)
    return {"organics": sum(len(v) for v in times.values()), "payloads": len(record.organics), "miners": miners,
            "max_gap_s_serving": max((m["longest_gap_s"] for m in serving), default=None),
            "min_share_serving": shares[0] if shares else None,
            "max_share": max((m["share"] or 0.0 for m in miners), default=None),
            "without_organics_serving": [m["uid"] for m in serving if not m["organics"]]}


def analyse(record: RunRecord, profiles: list[MinerProfile], options: ScenarioOptions) -> dict[str, Any]:
    tokens = {r.index: answer_tokens(r.seed, options.max_tokens) for r in record.requests}
    oracle = {r.index: oracle_s(r, record.plans.get(r.seed, []), tokens[r.index]) for r in record.requests}
    windows = []
    count = max(1, int(-(-options.duration_s // options.window_s)))
    for w in range(count):
        lo, hi = w * options.window_s, (w + 1) * options.window_s
        mine = [r for r in record.requests if lo <= r.at_s < hi]
        windows.append({"from_s": lo, "to_s": min(hi, options.duration_s), **summarise(mine, oracle)})
    errors: dict[str, int] = {}
    for r in record.requests:
        if not r.ok:
            errors[r.error or "failed"] = errors.get(r.error or "failed", 0) + 1
    asked = [len(record.plans.get(r.seed, [])) for r in record.requests]
    return {"selection": record.selection, "overall": summarise(record.requests, oracle), "windows": windows,
            "errors": errors, "fairness": fairness(record, profiles, options),
            "miners_reached_per_request": report.rounded(sum(asked) / len(asked), 2) if asked else None,
            "startup_s": report.rounded(record.startup_s, 3),
            "gateway_cpu_s": report.rounded(record.gateway_cpu_s, 2), "wall_s": round(record.wall_s, 1)}


def targets(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    learned, uniform = runs.get("learned"), runs.get("uniform")
    out: list[dict[str, Any]] = []

    def add(name: str, limit: float, measured: float | None, at_least: bool) -> None:
        met = None if measured is None else (measured >= limit if at_least else measured <= limit)
        out.append({"target": name, "limit": limit, "at_least": at_least, "measured": measured, "met": met})

    lo = learned["overall"] if learned else None
    add("learned: success rate", TARGET_SUCCESS, lo["success_rate"] if lo else None, True)
    ratio = None
    if lo and lo["stream_ttft_s"]["client_p50"] and lo["stream_ttft_s"]["oracle_p50"]:
        ratio = round(lo["stream_ttft_s"]["client_p50"] / lo["stream_ttft_s"]["oracle_p50"], 3)
    add("learned: client time to first token p50 / best-of-asked oracle p50", TARGET_ORACLE_RATIO, ratio, False)
    gain = None
    if lo and uniform and lo["stream_ttft_s"]["client_p50"] and uniform["overall"]["stream_ttft_s"]["client_p50"]:
        gain = round(1 - lo["stream_ttft_s"]["client_p50"] / uniform["overall"]["stream_ttft_s"]["client_p50"], 3)
    add("learned: time to first token p50 better than uniform choice by (share)", TARGET_GAIN_OVER_UNIFORM, gain,
        True)
    add("learned: longest stretch a serving miner went without organics (s)", TARGET_MAX_GAP_S,
        learned["fairness"]["max_gap_s_serving"] if learned else None, False)
    return out


def document(records: list[RunRecord], profiles: list[MinerProfile], options: ScenarioOptions, started: float,
             load_start: list[float]) -> dict[str, Any]:
    runs = {r.selection: analyse(r, profiles, options) for r in records}
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {"cores": os.cpu_count(),
                    "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}},
        "config": {"quick": options.quick, "duration_s": options.duration_s, "rate": options.rate,
                   "miners": options.miners, "fanout": options.fanout, "stream_share": options.stream_share,
                   "max_tokens": options.max_tokens, "selections": list(options.selections),
                   "explore_share": options.explore_share, "window_s": options.window_s,
                   "population_seed": options.population_seed, "request_seed": options.request_seed},
        "population": [{"uid": p.uid, "ttft_median_s": round(p.ttft_median_s, 3),
                        "tokens_per_s": round(p.tokens_per_s, 1), "fault": p.fault or None,
                        "slow_window_s": None if p.slow_from_s is None else
                        [round(p.slow_from_s, 1), round(p.slow_until_s or 0.0, 1)]} for p in profiles],
        "runs": runs,
    }
    doc["targets"] = targets(runs)
    return doc


# -- the table ------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(doc: dict[str, Any]) -> str:
    lines = [_row(["choice", "window s", "requests", "success", "TTFT p50 s", "oracle p50", "TTFT p99 s",
                   "oracle p99", "answer p50 s", "oracle p50"]),
             _row(["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])]
    for name, run in doc["runs"].items():
        for w in [*run["windows"], {**run["overall"], "from_s": "all", "to_s": None}]:
            where = "overall" if w["from_s"] == "all" else f"{w['from_s']:g}-{w['to_s']:g}"
            t, a = w["stream_ttft_s"], w["answer_s"]
            lines.append(_row([name, where, str(w["requests"]), _fmt(w["success_rate"], 4), _fmt(t["client_p50"]),
                               _fmt(t["oracle_p50"]), _fmt(t["client_p99"]), _fmt(t["oracle_p99"]),
                               _fmt(a["client_p50"]), _fmt(a["oracle_p50"])]))
    lines += ["", _row(["choice", "organics", "share of the most served miner", "least served (serving)",
                        "longest gap s (serving)", "serving miners without organics", "start-up s", "errors"]),
              _row(["---", "---:", "---:", "---:", "---:", "---", "---:", "---"])]
    for name, run in doc["runs"].items():
        f = run["fairness"]
        lines.append(_row([name, str(f["organics"]), _fmt(f["max_share"], 4), _fmt(f["min_share_serving"], 4),
                           _fmt(f["max_gap_s_serving"], 1), ", ".join(map(str, f["without_organics_serving"])) or "none",
                           _fmt(run["startup_s"], 2),
                           "; ".join(f"{k}: {v}" for k, v in run["errors"].items()) or "none"]))
    lines += ["", _row(["target", "limit", "measured", "met"]), _row(["---", "---:", "---:", "---"])]
    for t in doc["targets"]:
        lines.append(_row([t["target"], ("at least " if t["at_least"] else "at most ") + _fmt(t["limit"], 3),
                           _fmt(t["measured"]), {True: "yes", False: "NO", None: "not measured"}[t["met"]]]))
    return "\n".join(lines)


async def run_scenario(options: ScenarioOptions) -> dict[str, Any]:
    """Run the scenario; write the JSON to `options.out`, print the table; the document."""
    keep = options.keep_dir
    workdir = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="sn1-bench-subnet-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        async with trio.open_nursery() as nursery:
            try:
                doc = await Scenario(options, workdir.resolve(), nursery).run()
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    await trio.Path(options.out).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(table(doc), flush=True)
    print(f"\nwrote {options.out}", flush=True)
    return doc


__all__ = ["ChildFailed", "ScenarioOptions", "run_scenario"]
