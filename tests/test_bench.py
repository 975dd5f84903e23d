"""`sn1-gateway bench --quick`: a tiny real run (devnet, gateways, load) whose JSON must be whole.

These are not performance assertions: the figures depend on the machine. What is checked is that every
figure was measured (no missing value, every number finite), that each has its direct baseline and
ratio, and that the table was printed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.load import Endpoint, Exchange, LoadResult, SseScanner
from bench.report import Measured, compared, percentile, workers_document, workers_rows

COMPARED = {"gateway", "direct", "ratio"}


def assert_compared(figure: Any, where: str) -> None:
    assert isinstance(figure, dict) and set(figure) == COMPARED, where
    for name in COMPARED:
        value = figure[name]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, f"{where}.{name}: {value}"
    assert figure["ratio"] == pytest.approx(figure["gateway"] / figure["direct"], rel=0.01, abs=0.002), where


@dataclass(frozen=True)
class QuickRun:
    doc: dict[str, Any]
    stdout: str
    out: Path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """One `bench --quick` run, whose document the tests below read."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "results.json"
    done = subprocess.run([sys.executable, "-m", "engine.cli", "bench", "--quick", "--out", str(out)],
                          cwd=folder, capture_output=True, check=False, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return QuickRun(json.loads(out.read_text()), done.stdout.decode(), out)


def test_quick_bench_writes_complete_results(quick_run: QuickRun) -> None:
    doc, stdout, out = quick_run.doc, quick_run.stdout, quick_run.out

    assert doc["schema"] == "sn1-gateway-bench/3"
    assert doc["machine"]["cores"] >= 1
    assert doc["versions"]["trio"] and doc["versions"]["sn1-gateway"]
    assert doc["config"]["quick"] is True

    pairs = {(e["fanout"], e["concurrency"]) for e in doc["completions"]}
    assert pairs == {(f, c) for f in doc["config"]["fanouts"] for c in doc["config"]["concurrencies"]}
    for e in doc["completions"]:
        where = f"completions[fanout {e['fanout']}, c={e['concurrency']}]"
        assert e["errors"] == {"gateway": 0, "direct": 0}, where
        assert e["requests"]["gateway"] > 0 and e["requests"]["direct"] > 0, where
        assert e["statuses"] == {"gateway": {"200": e["requests"]["gateway"]},
                                 "direct": {"200": e["requests"]["direct"]}}, where
        for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "load_cpu_ms_per_request"):
            assert_compared(e[key], f"{where}.{key}")
        assert e["p50_ms"]["gateway"] <= e["p90_ms"]["gateway"] <= e["p99_ms"]["gateway"], where
        assert e["gateway_cpu_ms_per_completion"] is not None, where
        # the phase ended once the gateway had forwarded all its organics (their CPU is the phase's)
        assert e["scoring_backlog_left"] == 0 and e["scoring_drain_s"] >= 0, where
        # who set the pace, and the run's own check of its CPU figures
        pace = e["saturation"]["gateway"]
        assert pace["saturated"] and set(pace["shares"]) == {"gateway", "devnet", "load_generator"}, where
        assert all(isinstance(v, float) and 0 <= v < 4 for v in pace["shares"].values()), where
        check = e["consistency"]
        assert check["product_cores"] > 0 and check["measured_cores"] >= 0 and isinstance(check["agree"], bool), where
        assert isinstance(check["notes"], list), where

    assert {e["fanout"] for e in doc["streaming"]} == set(doc["config"]["fanouts"])
    for e in doc["streaming"]:
        where = f"streaming[fanout {e['fanout']}]"
        assert e["errors"] == {"gateway": 0, "direct": 0}, where
        assert e["scoring_backlog_left"] == 0, where
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tokens_per_s_per_stream", "tokens_per_stream"):
            assert_compared(e[key], f"{where}.{key}")
        # the gateway passes on every token of the bench miners' fixed-length answer
        assert e["tokens_per_stream"]["gateway"] == e["tokens_per_stream"]["direct"] == doc["config"]["answer_tokens"]

    process = doc["gateway_process"]
    assert set(process["cpu_ms_per_completion"]) == {str(f) for f in doc["config"]["fanouts"]}
    assert all(v > 0 for v in process["cpu_ms_per_completion"].values())
    assert process["peak_rss_mb"] > 10
    assert [h["wanted"] for h in process["open_streams"]] == doc["config"]["open_streams"] == [20, 50]
    for held in process["open_streams"]:
        assert held["opened"] == held["finished"] == held["wanted"] and held["errors"] == 0, held
        assert held["rss_mb"] > 10, held
    # serve to the first /health 200, for each gateway: two fan-outs and the open-streams one
    assert len(process["startup_s"]) == 3 and all(0 < x < 30 for x in process["startup_s"])
    assert all(run["exit_code"] == 0 for run in process["runs"])  # each gateway stopped cleanly on SIGTERM
    for run in process["runs"]:  # every organic went to the devnet validator, none dropped
        scoring = run["scoring"]
        if scoring is None:  # a workers phase without redis-server: see the workers test
            continue
        # with several workers the report is one worker's, which may have been given no connection
        several = run["name"].startswith("gateway-workers-") and run["name"] != "gateway-workers-1"
        assert (several or scoring["submitted"] > 0) and scoring["dropped"] == {}, run
        assert scoring["attempts_failed"] == 0, run
        assert scoring["delivered"] + scoring["queued"] + scoring["overflow"] + scoring["in_flight"] \
            + scoring["spooled"] >= scoring["submitted"], run

    floor = doc["stack_floor"]
    # a block at every concurrency just before each fan-out's phases, and one after the last
    fanouts, concurrencies = doc["config"]["fanouts"], doc["config"]["concurrencies"]
    assert [(p["block"], p["before_fanout"], p["concurrency"]) for p in floor["phases"]] == \
        [(b, f, c) for b, f in enumerate([*fanouts, None]) for c in concurrencies]
    for p in floor["phases"]:
        assert p["errors"] == 0 and p["requests"] > 0 and p["cpu_ms_per_request"] > 0, p
        assert 0 < p["p50_ms"] <= p["p99_ms"], p
    assert floor["cpu_ms_per_request"] > 0 and floor["p50_ms_at_c1"] > 0
    shares = {e["fanout"]: e for e in doc["floor_shares"]}
    for t, fanout in zip(doc["targets"][:2], (1, 5), strict=True):
        # the share: the median of alternating (floor, gateway) pairs at the concurrency of its peak
        paired = shares[fanout]
        phases = [e for e in doc["completions"] if e["fanout"] == fanout]
        assert paired["concurrency"] == max(phases, key=lambda e: e["rps"]["gateway"])["concurrency"]
        assert len(paired["pairs"]) == 2
        for pair in paired["pairs"]:
            assert pair["floor_errors"] == pair["gateway_errors"] == 0, pair
            assert pair["ratio"] == pytest.approx(pair["gateway_rps"] / pair["floor_rps"], abs=0.001), pair
        assert t["measured"] == paired["share"] == pytest.approx(
            sum(p["ratio"] for p in paired["pairs"]) / 2, abs=0.001), t
        assert t["stack_floor"] == paired["floor_rps_median"]
        # and, for comparison, the peaks' share of the floor's blocks on either side of the fan-out
        block = fanouts.index(fanout)
        peaks = [max(p["rps"] for p in floor["phases"] if p["block"] == b) for b in (block, block + 1)]
        best = max(e["rps"]["gateway"] for e in doc["completions"] if e["fanout"] == fanout)
        assert t["share_of_peaks"] == pytest.approx(best / (sum(peaks) / 2), abs=0.001), t
    assert "share of the stack floor, alternating pairs" in stdout
    assert "stack floor: bare Quart-Trio app on Hypercorn" in stdout

    assert doc["load_generator"]["cpu_s"] > 0 and doc["load_generator"]["wall_s"] > 0
    # every target was measured but the 5,000 open streams, which a quick run does not open
    assert [t["met"] is not None for t in doc["targets"]] == [True, True, False, True]
    assert doc["targets"][3]["measured"] == max(process["startup_s"])
    assert "| phase | saturated |" in stdout

    assert "| figure | gateway | direct | gateway/direct |" in stdout
    assert f"wrote {out}" in stdout


def test_quick_bench_measures_one_and_two_workers(quick_run: QuickRun) -> None:
    """`server.workers` 1 and 2 at fanout 1 (keys in a redis-server of the run's own): requests/s of
    each and their ratio, in the document and the table, the 2-worker figure said to share the cores."""
    doc, stdout = quick_run.doc, quick_run.stdout
    workers = doc["workers"]
    assert doc["config"]["workers"] == [1, 2]
    if shutil.which("redis-server") is None:
        assert "redis-server is not installed" in workers["skipped"] and workers["phases"] == []
        assert "workers: not measured, redis-server is not installed" in stdout
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI is set: .ci/run should have installed it")
        pytest.skip("redis-server is not installed (apt-get install redis-server): the workers phases were skipped")
    assert workers["skipped"] is None
    assert [p["workers"] for p in workers["phases"]] == [1, 2]
    for p in workers["phases"]:
        where = f"workers {p['workers']}"
        assert p["fanout"] == 1 and p["concurrency"] == max(doc["config"]["concurrencies"]), where
        assert p["errors"] == 0 and p["requests"] > 0 and p["statuses"] == {"200": p["requests"]}, where
        assert p["rps"] > 0 and 0 < p["p50_ms"] <= p["p99_ms"], where
        # the CPU of the supervisor and its workers: more than the parent's own few milliseconds
        assert p["gateway_cpu_ms_per_completion"] > 0 and p["gateway_cores_used"] > 0, where
        assert 0 < p["startup_s"] < 30, where
    one, two = workers["phases"]
    assert one["cores"].startswith("core 0 alone") if doc["machine"]["cores"] >= 2 else True
    assert two["cores"].startswith("every core, shared with")
    assert workers["ratio"] == pytest.approx(two["rps"] / one["rps"], abs=0.002) and workers["ratio_workers"] == 2
    names = [run["name"] for run in doc["gateway_process"]["runs"]]
    assert names[-2:] == ["gateway-workers-1", "gateway-workers-2"]
    assert all(run["exit_code"] == 0 for run in doc["gateway_process"]["runs"][-2:])
    assert "| server.workers (fanout 1) | requests/s |" in stdout
    assert "| ratio, 2 workers / 1 |" in stdout and "uses both cores, shared with the peers" in stdout


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0], 100) == 2.0
    assert math.isnan(percentile([], 50))


def test_compared_gives_ratio_and_no_value_for_what_was_not_measured() -> None:
    assert compared(3.0, 2.0) == {"gateway": 3.0, "direct": 2.0, "ratio": 1.5}
    assert compared(math.nan, 2.0) == {"gateway": None, "direct": 2.0, "ratio": None}
    assert compared(1.0, 0.0)["ratio"] is None


def test_sse_scanner_counts_tokens_split_across_reads() -> None:
    exchange = Exchange()
    scanner = SseScanner(exchange)
    events = (b'data: {"choices":[{"delta":{"role":"assistant","content":"Hel"},"logprobs":{"content":[]}}]}\n\n'
              b'data: {"choices": [{"delta": {"content": "lo"}}]}\n\n'
              b'data: {"choices":[{"delta":{"content":""},"finish_reason":"stop"}]}\n\n'
              b"data: [DONE]\n\n")
    for i in range(0, len(events), 7):
        scanner.feed(events[i:i + 7])
    assert exchange.tokens == 2
    assert exchange.done
    assert exchange.first_token is not None and exchange.last_token is not None


def test_endpoint_parses_urls_and_axons() -> None:
    assert Endpoint.parse("http://127.0.0.1:8080", "/v1/chat/completions") == Endpoint(
        "127.0.0.1", 8080, "/v1/chat/completions")
    assert Endpoint.parse("127.0.0.1:9001/v1/x") == Endpoint("127.0.0.1", 9001, "/v1/x")
    with pytest.raises(ValueError):
        Endpoint.parse("https://example.org")


async def test_the_stack_floor_app_parses_the_request_and_answers_a_fixed_completion() -> None:
    from bench.floor import floor_app

    client = floor_app(tokens=5, max_body_bytes=4096).test_client()
    ok = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
    answer = await ok.get_json()
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 5
    assert answer["choices"][0]["message"]["content"].split() == [f"word{i}" for i in range(5)]
    for body, code in ((b"{nope", "invalid_json"), (b"[1]", "invalid_body")):
        bad = await client.post("/v1/chat/completions", data=body)
        assert bad.status_code == 400 and (await bad.get_json())["error"]["code"] == code
    too_big = await client.post("/v1/chat/completions", data=b"x" * 5000)
    assert too_big.status_code == 413


async def test_the_scoring_drain_wait_counts_everything_held_and_gives_up_when_stuck(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart_trio import QuartTrio

    from bench import run

    backlog = {"queued": 1, "overflow": 0, "writing": 1, "in_flight": 1, "spool": 1, "running": 1}
    enabled = {"on": True}
    app = QuartTrio("drain_test")

    @app.get("/health/ready")
    async def ready() -> dict[str, Any]:
        scoring = {"enabled": enabled["on"], "submitted": 9, "delivered": 4, "spooled": 1, "attempts_failed": 0,
                   "dropped": {"overflow": 0}, "spool": {"pending": backlog["spool"]},
                   **{k: backlog[k] for k in ("queued", "overflow", "writing", "in_flight")}}
        return {"ready": True, "scoring": scoring, "fanout": {"running": backlog["running"]}}

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    url = (await nursery.start(serve, app, config))[0]
    monkeypatch.setattr(run, "SCORING_STUCK_S", 0.3)
    with trio.fail_after(10):
        assert await run.wait_scoring_drained(url, 5.0) == 5  # stuck at 5: ends early, says how many
        report = await run.scoring_report(url)
        assert report is not None and report["spool_pending"] == 1 and report["dropped"] == {}

        async def drain() -> None:
            await trio.sleep(0.2)
            backlog.update(queued=0, writing=0, in_flight=0, spool=0, running=0)

        nursery.start_soon(drain)
        assert await run.wait_scoring_drained(url, 5.0) == 0
        enabled["on"] = False
        assert await run.wait_scoring_drained(url, 5.0) is None  # scoring off: nothing to wait for
        assert await run.scoring_report(url) is None


def test_saturation_names_the_process_that_set_the_pace_and_the_check_catches_leaked_cpu() -> None:
    from bench.load import LoadResult
    from bench.report import Measured, consistency, saturation

    load = LoadResult(concurrency=64, latencies=[0.01] * 1000, wall_s=2.0, cpu_s=0.3)
    busy = Measured(load, gateway_cpu_s=1.9, miners_cpu_s=0.4, gateway_cpu_load_s=1.9, gateway_cores=1,
                    other_cores=1, gateway_steady_cores=0.95)
    assert saturation(busy)["saturated"] == "gateway"
    assert consistency(busy) == {"product_cores": 0.95, "measured_cores": 0.95, "agree": True, "notes": []}
    # the devnet and the load generator together fill their one core: they set the pace, and it is said
    held_back = Measured(load, gateway_cpu_s=1.0, miners_cpu_s=1.5, gateway_cpu_load_s=1.0, gateway_cores=1,
                         other_cores=1, gateway_steady_cores=0.5)
    assert saturation(held_back)["saturated"].startswith("devnet")
    notes = consistency(held_back)["notes"]
    assert len(notes) == 1 and "not saturated" in notes[0] and "devnet" in notes[0]
    # CPU per completion counts more than the gateway used over the load: scoring fell behind, or CPU
    # of another phase leaked in
    leaked = Measured(load, gateway_cpu_s=3.0, miners_cpu_s=0.2, gateway_cpu_load_s=1.9, scoring_drain_s=4.0,
                      gateway_cores=1, other_cores=1, gateway_steady_cores=0.95)
    check = consistency(leaked)
    assert check["agree"] is False and "1.50 cores" in check["notes"][0] and "4.0s" in check["notes"][0]


def test_the_population_has_the_issue_s_distributions() -> None:
    import statistics

    from devnet.population import population

    miners = population(2000, duration_s=180, seed=3)
    ttfts = sorted(m.plan(seed, 0.0).ttft_s for m in miners for seed in range(5))
    assert statistics.median(ttfts) == pytest.approx(0.8, rel=0.1)
    assert sum(t > 4.0 for t in ttfts) / len(ttfts) == pytest.approx(0.05, abs=0.01)
    assert all(20 <= m.tokens_per_s <= 80 for m in miners)
    share = {f: sum(m.fault == f for m in miners) / len(miners)
             for f in ("http_500", "refuse", "hang", "stop_mid_stream", "garbage")}
    assert share["http_500"] + share["refuse"] == pytest.approx(0.10, abs=0.002)
    assert share["hang"] == share["stop_mid_stream"] == pytest.approx(0.05, abs=0.001)
    assert share["garbage"] == pytest.approx(0.02, abs=0.001)
    slow = [m for m in miners if m.slow_from_s is not None]
    assert slow and all(m.slow_until_s - m.slow_from_s == pytest.approx(60) for m in slow)  # type: ignore[operator]
    m = slow[0]
    inside, after = m.plan(11, m.slow_from_s + 1), m.plan(11, m.slow_until_s + 1)  # type: ignore[operator]
    assert inside.slow and not after.slow and inside.ttft_s == pytest.approx(8 * after.ttft_s)
    # the same request meets the same plan in every run; another request, another draw
    assert m.plan(11, 0.0) == m.plan(11, 0.0) != m.plan(12, 0.0)


async def test_quick_subnet_scenario_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "subnet.json"
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-m", "engine.cli", "bench", "--scenario", "subnet", "--quick", "--out", str(out)],
            cwd=tmp_path, capture_stdout=True, capture_stderr=True, check=False,
        )
    stdout = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sn1-gateway-bench-subnet/1" and doc["config"]["quick"] is True
    assert len(doc["population"]) == doc["config"]["miners"] == 50
    assert set(doc["runs"]) == {"uniform", "learned"}
    expected = int(doc["config"]["duration_s"] * doc["config"]["rate"])
    for name, run in doc["runs"].items():
        overall = run["overall"]
        assert overall["requests"] == expected, name
        assert 0.9 <= overall["success_rate"] <= 1.0, (name, run["errors"])
        for key in ("stream_ttft_s", "answer_s"):
            figure = overall[key]
            assert figure["count"] > 0, (name, key)
            assert all(isinstance(figure[q], float) and figure[q] > 0 for q in
                       ("client_p50", "client_p99", "oracle_p50", "oracle_p99")), (name, key, figure)
            assert figure["client_p50"] <= figure["client_p99"], (name, key)
        assert sum(w["requests"] for w in run["windows"]) == expected, name
        assert 4.5 <= run["miners_reached_per_request"] <= 5.0, name  # fanout 5, refusing miners aside
        fair = run["fairness"]
        assert len(fair["miners"]) == 50 and fair["organics"] > 4 * expected, name
        assert sum(m["share"] for m in fair["miners"]) == pytest.approx(1.0, abs=0.01), name
        assert 0 < fair["max_gap_s_serving"] <= doc["config"]["duration_s"], name
    assert [t["met"] is not None for t in doc["targets"]] == [True] * 4  # each target was measured
    assert "| choice | window s | requests | success |" in stdout and f"wrote {out}" in stdout


def test_the_workers_ratio_is_of_the_most_workers_to_one_whatever_the_order() -> None:
    def phase(completed: int) -> Measured:
        load = LoadResult(concurrency=64, latencies=[0.01] * completed, wall_s=2.0)
        return Measured(load, gateway_cpu_s=0.002 * completed, gateway_cpu_load_s=0.002 * completed)

    doc = workers_document([(2, phase(900)), (1, phase(600))], pinned=True, skipped=None, startups=[1.5, 0.7])
    assert doc["ratio"] == 1.5 and doc["ratio_workers"] == 2
    two, one = doc["phases"]
    assert (two["rps"], one["rps"]) == (450.0, 300.0) and (two["startup_s"], one["startup_s"]) == (1.5, 0.7)
    assert one["cores"].startswith("core 0 alone") and two["cores"].startswith("every core, shared")
    assert two["gateway_cpu_ms_per_completion"] == 2.0 and two["gateway_cores_used"] == 0.9
    assert workers_document([(1, phase(600))], pinned=True, skipped=None)["ratio"] is None  # nothing to compare
    assert "| ratio, 2 workers / 1 | 1.50 |" in "\n".join(workers_rows(doc))


def test_each_share_is_of_the_floor_measured_beside_its_fanout_or_of_every_phase_in_older_documents() -> None:
    from bench.report import floor_beside

    phases = [{"block": 0, "before_fanout": 1, "rps": 1000.0}, {"block": 0, "before_fanout": 1, "rps": 1100.0},
              {"block": 1, "before_fanout": 5, "rps": 900.0}, {"block": 2, "before_fanout": None, "rps": 1300.0}]
    assert floor_beside(phases, 1) == 1000.0  # the peaks of the blocks before (1,100) and after (900)
    assert floor_beside(phases, 5) == 1100.0  # 900 before, 1,300 after
    assert floor_beside(phases[:3], 5) == 900.0  # none after: the one before
    assert floor_beside(phases, 2) == 1300.0  # none before this fan-out: every phase's peak
    assert floor_beside([{"rps": 1000.0}, {"rps": 800.0}], 1) == 1000.0  # an older document: every phase


async def test_a_floor_that_dies_mid_run_is_given_up_and_the_run_goes_on(tmp_path: Path) -> None:
    """The floor lives through the whole run now; when it is gone, its next block is said and skipped,
    as a floor that cannot start is: the gateways' figures stand without it."""
    from bench.processes import Child
    from bench.run import BenchOptions, Run

    gone = await trio.lowlevel.open_process(["true"])
    await gone.wait()  # its /proc entry is gone: sampling it fails as a dead floor's would
    async with trio.open_nursery() as nursery:
        run = Run(BenchOptions.quick_run(), tmp_path, nursery)
        floor = Child("floor", gone, "http://127.0.0.1:9", tmp_path / "floor.log")
        assert await run.floor_block(floor, 1) is None
        assert await run.floor_block(None, 5) is None
    assert run.floor == []


def test_the_paired_share_is_the_median_of_the_pairs_and_the_target_takes_it() -> None:
    """The host's drift between pairs moves both figures of a pair alike: their median ratio stands
    where the floor's own figure doubles."""
    from bench.report import share_entry, targets

    def phase(rps: float) -> Measured:
        return Measured(LoadResult(concurrency=64, latencies=[0.01] * int(rps * 2), wall_s=2.0))

    pairs = [(phase(1000), phase(500)), (phase(2000), phase(1000)), (phase(1000), phase(300)), (phase(0), phase(5))]
    entry = share_entry(1, 64, pairs)
    assert [p["ratio"] for p in entry["pairs"]] == [0.5, 0.5, 0.3, None]  # no floor request: no ratio
    assert entry["share"] == 0.5 and entry["floor_rps_median"] == 1000.0
    doc = {"completions": [{"fanout": 1, "rps": {"gateway": 450.0}}], "stack_floor": {"phases": [{"rps": 900.0}]},
           "floor_shares": [entry], "gateway_process": {"open_streams": [], "startup_s": []}}
    first, second = targets(doc)[:2]
    assert (first["measured"], first["met"], first["stack_floor"], first["share_of_peaks"]) == (0.5, True, 1000.0, 0.5)
    assert "alternating pairs at c=64" in first["target"]
    assert second["measured"] is None and second["met"] is None  # fanout 5 was not run
    del doc["floor_shares"]  # an older document: the peaks' share
    assert targets(doc)[0]["measured"] == 0.5 and "peak over concurrencies" in targets(doc)[0]["target"]
