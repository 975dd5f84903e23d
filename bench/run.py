"""`sn1-gateway bench`: a lean devnet and a gateway in their own processes, load from this one.

The devnet (`python -m devnet.lean`: raw-socket miners and validator, never the bottleneck) runs
miners in "bench" mode (a fixed-length answer at once) plus one "slow_tokens" miner for the
open-streams phase; each gateway (`sn1-gateway serve --config`) gets a generated config and an API key
made with `sn1-gateway keys create`. With two cores or more the gateway (and the stack floor, measured around them)
runs alone on one core and everything else on the others, so its figures are per gateway core. For
every fan-out and concurrency the same load goes through the gateway and straight to one miner
(Epistula-signed as the gateway signs), back to back, so each figure has a no-gateway limit measured
in the same run. CPU and RSS come from /proc; the load generator's own CPU from getrusage.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx
import tomlkit
import trio
from bittensor_core import Keypair

from actors.fanout.bounds import request_timeout_s
from bench import report
from bench.load import (
    Connection,
    Endpoint,
    HeldStreams,
    LoadResult,
    ProtocolError,
    cpu_seconds,
    hold_streams,
    request_bytes,
    run_load,
)
from bench.processes import (
    Child,
    ChildFailed,
    byte_compile,
    cli,
    compiled_env,
    core_plan,
    pin,
    raise_fd_limit,
    run_command,
    sample,
    sample_tree,
    start_child,
)
from bench.report import Measured, ProcessSample
from config.settings import FanoutSettings
from web.chat_request import parse_chat_request
from wire.epistula import Signer, routing_headers

CHAT_PATH = "/v1/chat/completions"
BENCH_MINERS = 5
DEVNET_GATEWAY_URI = "//devnet/gateway"  # the devnet trusts this development key unless told otherwise
RATE_LIMIT = 1_000_000  # requests per minute: never the bottleneck
FD_WANTED = 65536
_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True)
class BenchOptions:
    out: Path = Path("bench-results.json")
    quick: bool = False
    duration_s: float = 6.0  # per phase
    max_requests: int = 50_000  # per phase
    concurrencies: tuple[int, ...] = (1, 16, 64)
    fanouts: tuple[int, ...] = (1, 5)
    stream_concurrency: int = 64
    open_streams: tuple[int, ...] = (1000, 5000)  # streams held open at once, one figure each
    answer_tokens: int = 16  # the bench miners' fixed answer length
    scoring: bool = True
    target_gateway: str | None = None
    target_fanout: int | None = None
    api_key: str | None = None
    gateway_pid: int | None = None
    target_miner: str | None = None
    miner_hotkey: str | None = None
    signer_uri: str = DEVNET_GATEWAY_URI
    keep_dir: Path | None = None  # keep configs and logs here (else a temporary folder)
    profile: bool = False  # record the gateway with py-spy during the fan-out phases
    workers: tuple[int, ...] = (1, 2)  # `server.workers` of the workers phases (fanout 1); empty: skipped

    @classmethod
    def quick_run(cls, **kw: Any) -> BenchOptions:
        defaults: dict[str, Any] = dict(quick=True, duration_s=0.5, max_requests=25, concurrencies=(1, 4),
                                        stream_concurrency=4, open_streams=(20, 50))
        return cls(**{**defaults, **kw})


def client_body(*, stream: bool, max_tokens: int, seed: int = 7) -> dict[str, Any]:
    # no "model": any miner will do, whatever models a target gateway's availability knows of
    return {"messages": [{"role": "user", "content": "Benchmark: answer with anything."}],
            "stream": stream, "seed": seed, "max_tokens": max_tokens}


@dataclass(frozen=True)
class MinerTarget:
    endpoint: Endpoint
    hotkey: str


@dataclass
class Devnet:
    """What `sn1-gateway devnet` printed: the gateway settings that point at it."""

    config: dict[str, Any]

    def neurons(self) -> list[dict[str, Any]]:
        neurons: list[dict[str, Any]] = self.config["subnet"]["neurons"]
        return neurons

    def miners(self) -> list[dict[str, Any]]:
        return [n for n in self.neurons() if not n.get("validator_permit")]

    def validators(self) -> list[dict[str, Any]]:
        return [n for n in self.neurons() if n.get("validator_permit")]


def devnet_ready(expected_neurons: int) -> Callable[[str], Devnet | None]:
    """Reads the devnet's printed TOML once all of it (every neuron and the scoring section) is there."""

    def ready(text: str) -> Devnet | None:
        start = text.find("[")
        comment = text.find("#")
        if comment >= 0 and (start < 0 or comment < start):
            start = comment
        if start < 0:
            return None
        lines = text[start:].splitlines()
        for end in range(len(lines), 0, -1):  # tolerate a trailing banner or a half-written line
            try:
                config = tomllib.loads("\n".join(lines[:end]))
            except tomllib.TOMLDecodeError:
                continue
            neurons = config.get("subnet", {}).get("neurons", [])
            if len(neurons) >= expected_neurons and "validator_hotkey" in config.get("scoring", {}):
                return Devnet(config)
        return None

    return ready


def gateway_ready(text: str) -> str | None:
    found = _LISTENING.search(text)
    return found.group(1) if found else None


def gateway_config(devnet: Devnet, *, uids: set[int], fanout: int, scoring: bool, workdir: Path, name: str,
                   streams: int = 0, workers: int | None = None, port: int = 0, redis_url: str = "") -> str:
    """A gateway config for the devnet: the miners `uids` (and the validator), fan-out `fanout`; a spool of
    its own (one gateway never replays another's organics while it is measured). `streams`: room for
    that many client requests open at once. `workers`: `server.workers`, on `port`, with the key store
    (and what workers share) in the Redis at `redis_url`."""
    neurons = [n for n in devnet.miners() if n["uid"] in uids] + devnet.validators()
    room = max(4096, 2 * streams)
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port, "max_connections": max(2048, streams + 256)}
    if workers is not None:
        server["workers"] = workers
    config: dict[str, Any] = {
        "server": server,
        "auth": {"store": "file", "keys_file": str(workdir / "keys.toml"), "admin_key": ""},
        "wallet": {"uri": devnet.config.get("wallet", {}).get("uri", DEVNET_GATEWAY_URI)},
        "subnet": {"source": "static", "netuid": devnet.config["subnet"].get("netuid", 1), "neurons": neurons},
        "availability": {"source": "none"},
        "fanout": {"miners": fanout, "max_inflight": room, "max_background": room,
                   "max_connections": max(8192, 2 * streams + 1024), "first_token_timeout_s": 60.0},
        "scoring": {"enabled": scoring, **{k: v for k, v in devnet.config.get("scoring", {}).items()
                                           if k in ("validator", "validator_hotkey")},
                    "spool_dir": str(workdir / f"spool-{name}")},
    }
    if workers is not None:
        config["auth"] = {"store": "redis", "redis_url": redis_url, "admin_key": ""}
    return tomlkit.dumps(config)


def listening_count(count: int) -> Callable[[str], str | None]:
    """Ready once `count` serving processes have said where they listen (each worker says it)."""

    def ready(text: str) -> str | None:
        found = _LISTENING.findall(text)
        return found[0] if len(found) >= count else None

    return ready


_REDIS_READY = re.compile(r"ready to accept connections", re.IGNORECASE)


def redis_ready(text: str) -> bool | None:
    return True if _REDIS_READY.search(text) else None


def free_port() -> int:
    """A loopback port free just now (for the processes that need a fixed one: workers, redis)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Run:
    """The state of one benchmark run while it goes."""

    options: BenchOptions
    workdir: Path
    nursery: trio.Nursery
    devnet: Child[Devnet] | None = None
    completions: list[dict[str, Any]] = field(default_factory=list)
    streaming: list[dict[str, Any]] = field(default_factory=list)
    completion_phases: dict[int, list[Measured]] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    held: list[tuple[HeldStreams, float]] = field(default_factory=list)  # with the RSS before opening them
    held_fanout: int = 1
    gateway_cpus: frozenset[int] | None = None
    other_cpus: frozenset[int] | None = None
    startups: list[float] = field(default_factory=list)  # seconds from `serve` to the first /health 200
    child_env: dict[str, str] | None = None  # gateways start byte-compiled, as an installed package does
    load_cpu_s: float = 0.0
    load_wall_s: float = 0.0
    gateways: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, float] = field(default_factory=dict)
    load_at_start: list[float] = field(default_factory=list)
    floor: list[tuple[int, int | None, Measured]] = field(default_factory=list)  # (block, fan-out next, phase)
    shares: list[dict[str, Any]] = field(default_factory=list)  # each fan-out's alternating pairs (`share_pairs`)
    all_cpus: frozenset[int] = frozenset()  # every core this run may use (the workers phases share them)
    workers: list[tuple[int, Measured]] = field(default_factory=list)  # (server.workers, its phase)
    workers_skipped: str | None = None  # why the workers phases were not run
    workers_startups: list[float] = field(default_factory=list)  # serve to the first /health 200, per phase

    def log(self, message: str) -> None:
        print(f"[bench] {message}", flush=True)

    # -- processes ------------------------------------------------------------------------------------

    async def start_devnet(self, modes: list[str]) -> Child[Devnet]:
        argv = [sys.executable, "-m", "devnet.lean", "--modes", ",".join(modes)]
        child = await start_child(self.nursery, "devnet", argv, cwd=self.workdir,
                                  ready=devnet_ready(len(modes) + 1), cpus=self.other_cpus)
        self.log(f"lean devnet up: {len(modes)} miners and the validator (pid {child.pid})")
        return child

    async def start_gateway(self, name: str, config_text: str, *, workers: int = 1,
                            cpus: frozenset[int] | None = None) -> tuple[Child[str], str]:
        """A gateway up and answering /health, and an API key of its own. `workers`: the serving processes
        to wait for; `cpus` (a workers phase): where they may run, instead of the gateway core (their
        start-up is then noted apart from the other gateways', which the start-up target is about)."""
        path = self.workdir / f"{name}.toml"
        path.write_text(config_text, encoding="utf-8")
        key_out = await run_command(cli("keys", "create", "--rate-limit", str(RATE_LIMIT), "--config", str(path)),
                                    cwd=self.workdir)
        api_key = key_out.strip().splitlines()[0]
        child = await start_child(self.nursery, name, cli("serve", "--config", str(path)), cwd=self.workdir,
                                  ready=listening_count(workers), cpus=cpus or self.gateway_cpus, env=self.child_env)
        startup = await wait_health(child.ready, child.spawned_at)
        (self.workers_startups if cpus is not None else self.startups).append(startup)
        self.log(f"{name} up at {child.ready} (pid {child.pid}; serve to first /health 200: {startup:.2f}s)")
        return child, api_key

    async def stop_gateway(self, child: Child[str]) -> None:
        self.note_peak(child.pid)
        scoring = await scoring_report(child.ready)
        if scoring is not None:
            self.log(f"{child.name} scoring: {scoring['submitted']} submitted, {scoring['delivered']} delivered, "
                     f"{scoring['spooled']} spooled, {scoring['queued']} queued, dropped {scoring['dropped']}")
        code = await child.stop()
        self.gateways.append({"name": child.name, "exit_code": code, "scoring": scoring})

    def note_peak(self, pid: int | None) -> None:
        if pid is not None:
            self.peak_rss_mb = max(self.peak_rss_mb, sample(pid).peak_rss_mb)

    # -- phases ---------------------------------------------------------------------------------------

    async def measure(self, endpoint: Endpoint, make_request: Callable[[], bytes], *, concurrency: int,
                      stream: bool, gateway_pid: int | None, scoring_url: str | None = None,
                      gateway_peak: bool = True, tree: bool = False, duration_s: float | None = None) -> Measured:
        """One load phase. With `scoring_url` (a gateway's URL), the phase ends only once that gateway has
        forwarded every organic it took (or `SCORING_DRAIN_S` passed): the CPU of scoring the phase's
        completions is the phase's, not the next one's, and nothing is left for the next gateway.
        `tree`: the gateway's figures are those of its process and every descendant (its workers)."""
        of_gateway = sample_tree if tree else sample
        before: dict[str, ProcessSample | None] = {}
        after: dict[str, ProcessSample | None] = {}
        miners_pid = self.devnet.pid if self.devnet is not None else None

        def probe(into: dict[str, ProcessSample | None]) -> Callable[[], None]:
            def take() -> None:
                into["gateway"] = of_gateway(gateway_pid) if gateway_pid is not None else None
                into["miners"] = sample(miners_pid) if miners_pid is not None else None
            return take

        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        options = self.options
        samples: list[tuple[float, float]] = []  # (perf_counter, gateway CPU s) while the load runs

        async def sample_gateway() -> None:
            assert gateway_pid is not None
            while True:
                samples.append((time.perf_counter(), of_gateway(gateway_pid).cpu_s))
                await trio.sleep(STEADY_SAMPLE_S)

        async with trio.open_nursery() as sampling:
            if gateway_pid is not None:
                sampling.start_soon(sample_gateway)
            result = await run_load(endpoint, make_request, concurrency=concurrency,
                                    max_requests=options.max_requests, duration_s=duration_s or options.duration_s,
                                    stream=stream, on_start=probe(before), on_stop=probe(after))
            sampling.cancel_scope.cancel()
        self.load_wall_s += time.perf_counter() - wall0
        self.load_cpu_s += cpu_seconds() - cpu0
        backlog: int | None = None
        drain_s = 0.0
        if scoring_url is not None:
            drained = time.perf_counter()
            backlog = await wait_scoring_drained(scoring_url, SCORING_DRAIN_S)
            drain_s = time.perf_counter() - drained
        load_end = after.get("gateway")
        if scoring_url is not None:
            # the gateway's CPU meanwhile is its scoring of this phase; the devnet process (which also
            # runs the validator) keeps its figure from the end of the load, as the direct phase does
            after["gateway"] = of_gateway(gateway_pid) if gateway_pid is not None else None
        if gateway_peak and not tree:
            self.note_peak(gateway_pid)
        return Measured(result, gateway_cpu_s=_delta(before["gateway"], after["gateway"]),
                        miners_cpu_s=_delta(before["miners"], after["miners"]), scoring_drain_s=drain_s,
                        scoring_backlog=backlog, gateway_cpu_load_s=_delta(before["gateway"], load_end),
                        gateway_cores=None if tree else len(self.gateway_cpus) if self.gateway_cpus else None,
                        other_cores=None if tree else len(self.other_cpus) if self.other_cpus else None,
                        gateway_steady_cores=steady_use(samples, result.started_at, result.wall_s))

    async def fanout_phases(self, fanout: int, gateway: Endpoint, api_key: str, gateway_pid: int | None,
                            miner: MinerTarget, label: str) -> None:
        options = self.options
        for concurrency in options.concurrencies:
            body = client_body(stream=False, max_tokens=4 * options.answer_tokens)
            direct = await self.measure(miner.endpoint, self.direct_requests(miner, body),
                                        concurrency=concurrency, stream=False, gateway_pid=None)
            through = await self.measure(gateway, self.gateway_requests(gateway, api_key, body),
                                         concurrency=concurrency, stream=False, gateway_pid=gateway_pid,
                                         scoring_url=gateway.base_url)
            entry = report.completion_entry(fanout, through, direct)
            self.completions.append(entry)
            self.completion_phases.setdefault(fanout, []).append(through)
            self.log(f"{label} c={concurrency}: {entry['rps']['gateway']} req/s "
                     f"(direct {entry['rps']['direct']}), p50 {entry['p50_ms']['gateway']} ms "
                     f"(direct {entry['p50_ms']['direct']}), gateway CPU "
                     f"{entry['gateway_cpu_ms_per_completion']} ms/req, errors {entry['errors']}, statuses {entry['statuses']}")
        body = client_body(stream=True, max_tokens=4 * options.answer_tokens)
        concurrency = options.stream_concurrency
        direct = await self.measure(miner.endpoint, self.direct_requests(miner, body), concurrency=concurrency,
                                    stream=True, gateway_pid=None)
        through = await self.measure(gateway, self.gateway_requests(gateway, api_key, body),
                                     concurrency=concurrency, stream=True, gateway_pid=gateway_pid,
                                     scoring_url=gateway.base_url)
        entry = report.streaming_entry(fanout, through, direct)
        self.streaming.append(entry)
        self.log(f"{label} streaming x{concurrency}: first token p50 {entry['ttft_p50_ms']['gateway']} ms "
                 f"(direct {entry['ttft_p50_ms']['direct']}), {entry['tokens_per_s_per_stream']['gateway']} "
                 f"tokens/s per stream (direct {entry['tokens_per_s_per_stream']['direct']})")

    def gateway_requests(self, gateway: Endpoint, api_key: str, body: dict[str, Any]) -> Callable[[], bytes]:
        raw = request_bytes(gateway, json.dumps(body).encode(), {"api-key": api_key})
        return lambda: raw

    def direct_requests(self, miner: MinerTarget, body: dict[str, Any]) -> Callable[[], bytes]:
        """What the gateway would send the miner for `body`, signed afresh per request (as it signs)."""
        miner_body = parse_chat_request(body, default_model=FanoutSettings().default_model).miner_body
        body_bytes = json.dumps(miner_body, separators=(",", ":")).encode()
        routing = {**routing_headers(miner_body, client_timeout_s=request_timeout_s(miner_body)),
                   "Accept": "text/event-stream"}
        signer = Signer(Keypair.create_from_uri(self.options.signer_uri))
        endpoint = miner.endpoint
        return lambda: request_bytes(endpoint, body_bytes, {**routing, **signer.headers(body_bytes, miner.hotkey)})

    async def start_floor(self) -> Child[str] | None:
        """A bare Quart-Trio app on Hypercorn (`bench.floor`) on the gateway core, idle between its
        phases; None (said) when it cannot start: the gateways' figures stand without it."""
        try:
            child = await start_child(self.nursery, "floor", [sys.executable, "-m", "bench.floor", "--tokens",
                                                              str(self.options.answer_tokens)],
                                      cwd=self.workdir, ready=gateway_ready, cpus=self.gateway_cpus,
                                      env=self.child_env)
        except (ChildFailed, OSError) as exc:
            self.log(f"stack floor not measured: {exc}")
            return None
        self.log(f"stack floor (bare Quart-Trio on Hypercorn) up at {child.ready} (pid {child.pid})")
        return child

    async def floor_block(self, floor: Child[str] | None, before: int | None) -> Child[str] | None:
        """`floor_phases`, and the floor given up (said) when it fails: the gateways' figures stand
        without it."""
        return await self._with_floor(floor, lambda child: self.floor_phases(child, before))

    async def share_block(self, floor: Child[str] | None, fanout: int, gateway: Endpoint, api_key: str,
                          gateway_pid: int | None) -> Child[str] | None:
        """`share_pairs`, and the floor given up (said) when it fails, as `floor_block` does."""
        return await self._with_floor(floor, lambda child: self.share_pairs(child, fanout, gateway, api_key,
                                                                            gateway_pid))

    async def _with_floor(self, floor: Child[str] | None,
                          phases: Callable[[Child[str]], Awaitable[None]]) -> Child[str] | None:
        """Run `phases` of a floor still measured; the floor (None once it failed, said)."""
        if floor is None:
            return None
        failed: BaseException | None = None
        try:
            await phases(floor)
        except* (ChildFailed, OSError) as group:  # also from the sampling task of a phase
            failed = group
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
        if failed is not None:
            self.log(f"stack floor not measured further: {failed}")
            return None
        return floor

    async def share_pairs(self, floor: Child[str], fanout: int, gateway: Endpoint, api_key: str,
                          gateway_pid: int | None) -> None:
        """Fan-out `fanout`'s share of the floor, from pairs of short phases a few seconds apart: the
        floor, then the gateway (the other way round every other pair), at the concurrency of the
        gateway's peak in its phases (the run's highest when it has none). The share is the median of
        the pairs' ratios: the host's speed, which drifts by a third within minutes, is about the same
        within a pair, where the floor's blocks on either side of the fan-out's phases are minutes
        apart."""
        options = self.options
        phases = [e for e in self.completions if e["fanout"] == fanout and e["rps"]["gateway"] is not None]
        concurrency = (max(phases, key=lambda e: e["rps"]["gateway"])["concurrency"] if phases
                       else max(options.concurrencies))
        body = client_body(stream=False, max_tokens=4 * options.answer_tokens)
        duration_s = options.duration_s / 3
        floor_endpoint = Endpoint.parse(floor.ready, CHAT_PATH)

        async def floor_phase() -> Measured:
            return await self.measure(floor_endpoint, self.gateway_requests(floor_endpoint, "floor", body),
                                      concurrency=concurrency, stream=False, gateway_pid=floor.pid,
                                      gateway_peak=False, duration_s=duration_s)

        async def gateway_phase() -> Measured:
            return await self.measure(gateway, self.gateway_requests(gateway, api_key, body),
                                      concurrency=concurrency, stream=False, gateway_pid=gateway_pid,
                                      scoring_url=gateway.base_url, duration_s=duration_s)

        pairs: list[tuple[Measured, Measured]] = []
        for k in range(SHARE_PAIRS_QUICK if options.quick else SHARE_PAIRS):
            if k % 2 == 0:
                floor_m = await floor_phase()
                gateway_m = await gateway_phase()
            else:
                gateway_m = await gateway_phase()
                floor_m = await floor_phase()
            pairs.append((floor_m, gateway_m))
        entry = report.share_entry(fanout, concurrency, pairs)
        self.shares.append(entry)
        self.log(f"fanout {fanout} share of the floor, {len(pairs)} alternating pairs at c={concurrency}: "
                 f"median {entry['share']} (each {', '.join(str(p['ratio']) for p in entry['pairs'])})")

    async def floor_phases(self, child: Child[str], before: int | None) -> None:
        """One block of the stack floor: the same completion requests at every concurrency, just before
        the phases of fan-out `before` (None: after the last). The share of the peaks
        (`share_of_peaks`) is taken of the blocks on either side of a fan-out's phases; the targets'
        share comes from `share_pairs`."""
        options = self.options
        block = 1 + max((b for b, _, _ in self.floor), default=-1)
        endpoint = Endpoint.parse(child.ready, CHAT_PATH)
        body = client_body(stream=False, max_tokens=4 * options.answer_tokens)
        for concurrency in options.concurrencies:
            measured = await self.measure(endpoint, self.gateway_requests(endpoint, "floor", body),
                                          concurrency=concurrency, stream=False, gateway_pid=child.pid,
                                          gateway_peak=False)
            self.floor.append((block, before, measured))
            entry = report.floor_entry(measured)
            self.log(f"stack floor c={concurrency}: {entry['rps']} req/s, p50 {entry['p50_ms']} ms, "
                     f"CPU {entry['cpu_ms_per_request']} ms/req, errors {entry['errors']}")

    async def workers_phases(self, devnet: Devnet) -> None:
        """Fanout 1 at the highest concurrency through a gateway with each `server.workers` of
        `options.workers` (keys in a redis-server of the run's own, as more than one worker needs).
        One worker is pinned to the gateway core as in the other phases; more than one cannot be, and
        share every core with the devnet, the validator, Redis and the load generator."""
        # Every gateway here uses the Redis store (one worker too), so the two differ only in
        # `server.workers` and in the cores they may use.
        options = self.options
        exe = shutil.which("redis-server")
        if exe is None:
            self.workers_skipped = ("redis-server is not installed (more than one worker needs auth.store = "
                                    "\"redis\"; apt-get install redis-server)")
            self.log(f"workers phases skipped: {self.workers_skipped}")
            return
        port = free_port()
        redis = await start_child(self.nursery, "redis", [exe, "--port", str(port), "--bind", "127.0.0.1",
                                                          "--save", "", "--appendonly", "no", "--daemonize", "no"],
                                  cwd=self.workdir, ready=redis_ready, cpus=self.other_cpus)
        try:
            concurrency = max(options.concurrencies)
            body = client_body(stream=False, max_tokens=4 * options.answer_tokens)
            for count in options.workers:
                name = f"gateway-workers-{count}"
                config = gateway_config(devnet, uids=set(range(BENCH_MINERS)), fanout=1, scoring=options.scoring,
                                        workdir=self.workdir, name=name, workers=count, port=free_port(),
                                        redis_url=f"redis://127.0.0.1:{port}/0")
                cpus = (self.gateway_cpus if count == 1 else None) or self.all_cpus
                child, api_key = await self.start_gateway(name, config, workers=count, cpus=cpus)
                try:
                    gateway = Endpoint.parse(child.ready, CHAT_PATH)
                    # No wait for scoring to drain after the load: with several workers /health/ready is
                    # one worker's report. CPU is counted over the load alone, for each worker count.
                    measured = await self.measure(gateway, self.gateway_requests(gateway, api_key, body),
                                                  concurrency=concurrency, stream=False, gateway_pid=child.pid,
                                                  tree=True)
                    self.workers.append((count, measured))
                    entry = report.workers_entry(count, measured, pinned=count == 1 and self.gateway_cpus is not None)
                    self.log(f"{count} worker(s), fanout 1 c={concurrency}: {entry['rps']} req/s, p50 "
                             f"{entry['p50_ms']} ms, gateway CPU {entry['gateway_cpu_ms_per_completion']} ms/req "
                             f"(all its processes), errors {entry['errors']}, on {entry['cores']}")
                finally:
                    await self.stop_gateway(child)
        finally:
            await redis.stop()

    async def open_streams_phase(self, devnet: Devnet, slow_uid: int) -> None:
        """Each count of `open_streams` in turn, on one gateway (fanout 1, the slow miner): its RSS is
        read while all of them are open at once."""
        options = self.options
        name = "gateway-open-streams"
        most = max(options.open_streams)
        config = gateway_config(devnet, uids={slow_uid}, fanout=1, scoring=options.scoring, workdir=self.workdir,
                                name=name, streams=most)
        child, api_key = await self.start_gateway(name, config)
        try:
            endpoint = Endpoint.parse(child.ready, CHAT_PATH)
            max_tokens = 24 if not options.quick else 6
            raw = request_bytes(endpoint, json.dumps(client_body(stream=True, max_tokens=max_tokens)).encode(),
                                {"api-key": api_key})
            # one stream first, so the measured baseline has the gateway's first-use costs behind it
            await hold_streams(endpoint, lambda: raw, streams=1, sample=lambda: 0.0, open_timeout_s=10)
            for count in options.open_streams:
                before = child.sample().rss_mb
                self.log(f"opening {count} streams (fanout 1, slow miner uid {slow_uid})")
                wall0, cpu0 = time.perf_counter(), cpu_seconds()
                held = await hold_streams(endpoint, lambda: raw, streams=count,
                                          sample=lambda: child.sample().rss_mb,
                                          open_timeout_s=60 if not options.quick else 10)
                self.load_wall_s += time.perf_counter() - wall0
                self.load_cpu_s += cpu_seconds() - cpu0
                self.held.append((held, before))
                self.log(f"{held.opened}/{held.wanted} streams open after {held.open_s:.1f}s: gateway RSS "
                         f"{held.sample:.1f} MB (before {before:.1f} MB); "
                         f"{held.finished} finished, {held.errors} errors")
                await wait_scoring_drained(child.ready, SCORING_DRAIN_S)
        finally:
            await self.stop_gateway(child)

    # -- the whole run --------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        options = self.options
        started = time.time()
        self.calibration = calibration()
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]
        self.all_cpus = frozenset(os.sched_getaffinity(0))
        self.gateway_cpus, self.other_cpus = core_plan(os.cpu_count() or 1)
        if self.other_cpus is not None:
            pin(0, self.other_cpus)  # the load generator, and the devnet it starts, stay off the gateway's core
            self.log(f"gateway on core {sorted(self.gateway_cpus or ())}, devnet and load on "
                     f"{sorted(self.other_cpus)}")
        fd_limit = raise_fd_limit(FD_WANTED)
        self.child_env = compiled_env(self.workdir / "pycache")
        await byte_compile(self.child_env, self.workdir)
        most = max(options.open_streams, default=0)
        if fd_limit < most * 2 + 256:
            self.log(f"warning: open-files limit {fd_limit} is low for {most} streams")
        try:
            return await self._run(started, fd_limit)
        finally:
            if self.devnet is not None:
                await self.devnet.stop()

    async def _run(self, started: float, fd_limit: int) -> dict[str, Any]:
        options = self.options
        own_devnet = options.target_gateway is None or options.target_miner is None
        devnet: Devnet | None = None
        slow_uid = BENCH_MINERS
        if own_devnet:
            self.devnet = await self.start_devnet(["bench"] * BENCH_MINERS + ["slow_tokens"])
            devnet = self.devnet.ready
        if options.target_miner is not None:
            if options.miner_hotkey is None:
                raise ChildFailed("--target-miner needs --miner-hotkey (the miner's SS58 address)")
            miner = MinerTarget(Endpoint.parse(options.target_miner, CHAT_PATH), options.miner_hotkey)
        else:
            assert devnet is not None
            first = devnet.miners()[0]
            miner = MinerTarget(Endpoint.parse(first["axon"], CHAT_PATH), first["hotkey"])
        floor = await self.start_floor()
        try:
            await self._phases(devnet, miner, slow_uid, floor)
        finally:
            if floor is not None:
                await floor.stop()
        miners_cpu = self.devnet.sample().cpu_s if self.devnet is not None else None
        return self.document(started, fd_limit, miners_cpu)

    async def _phases(self, devnet: Devnet | None, miner: MinerTarget, slow_uid: int,
                      floor: Child[str] | None) -> None:
        options = self.options
        if options.target_gateway is not None:
            if options.api_key is None:
                raise ChildFailed("--target-gateway needs --api-key")
            fanout = options.target_fanout or 0
            floor = await self.floor_block(floor, fanout)
            gateway = Endpoint.parse(options.target_gateway, CHAT_PATH)
            await self.fanout_phases(fanout, gateway, options.api_key, options.gateway_pid, miner,
                                     f"target gateway (fanout {fanout or '?'})")
            floor = await self.share_block(floor, fanout, gateway, options.api_key, options.gateway_pid)
            self.note_peak(options.gateway_pid)
            await self.floor_block(floor, None)
        else:
            assert devnet is not None
            for fanout in options.fanouts:
                floor = await self.floor_block(floor, fanout)
                name = f"gateway-fanout-{fanout}"
                config = gateway_config(devnet, uids=set(range(BENCH_MINERS)), fanout=fanout,
                                        scoring=options.scoring, workdir=self.workdir, name=name)
                child, api_key = await self.start_gateway(name, config)
                try:
                    gateway = Endpoint.parse(child.ready, CHAT_PATH)
                    with self.profiling(child.pid, f"fanout-{fanout}"):
                        await self.fanout_phases(fanout, gateway, api_key, child.pid, miner, f"fanout {fanout}")
                    floor = await self.share_block(floor, fanout, gateway, api_key, child.pid)
                finally:
                    await self.stop_gateway(child)
            if options.fanouts:
                await self.floor_block(floor, None)
            if any(options.open_streams):
                await self.open_streams_phase(devnet, slow_uid)
            if options.workers:
                try:
                    await self.workers_phases(devnet)
                except (ChildFailed, OSError) as exc:  # the other figures stand without them
                    self.workers_skipped = f"the workers phases failed: {exc}"
                    self.log(self.workers_skipped)

    @contextmanager
    def profiling(self, pid: int, name: str) -> Iterator[None]:
        """py-spy records the gateway while the block runs (with `--profile`): collapsed stacks in the work dir."""
        if not self.options.profile:
            yield
            return
        import subprocess

        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = self.workdir / f"profile-{name}.txt"
        recorder = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "250", "--output", str(out),
                                     "--format", "raw", "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
            self.log(f"profile written to {out}")

    def document(self, started: float, fd_limit: int, miners_cpu_s: float | None) -> dict[str, Any]:
        options = self.options
        cpu_per = {str(f): report.cpu_per_completion(phases) for f, phases in self.completion_phases.items()}
        doc: dict[str, Any] = {
            "schema": report.SCHEMA,
            "created": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - started, 1),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "fd_limit": fd_limit,
                        "load_average": {"start": self.load_at_start,
                                         "end": [round(x, 2) for x in os.getloadavg()]},
                        "calibration": self.calibration},
            "versions": {name: _version(name) for name in
                         ("sn1-gateway", "trio", "hypercorn", "quart-trio", "quart", "httpx", "bittensor")},
            "config": {
                "quick": options.quick, "duration_s": options.duration_s, "max_requests": options.max_requests,
                "concurrencies": list(options.concurrencies), "fanouts": list(options.fanouts),
                "stream_concurrency": options.stream_concurrency, "open_streams": list(options.open_streams),
                "workers": list(options.workers),
                "answer_tokens": options.answer_tokens, "scoring": options.scoring, "availability": "none",
                "target_gateway": options.target_gateway, "target_miner": options.target_miner,
                "miners": "devnet 'bench' mode (fixed-length answer at once), one process for all miners",
                "direct": "the same request as the gateway sends, Epistula-signed per request, to one miner",
            },
            "completions": self.completions,
            "streaming": self.streaming,
            "gateway_process": {
                "cpu_ms_per_completion": cpu_per,
                "peak_rss_mb": report.rounded(self.peak_rss_mb or None, 1),
                "open_streams": [report.open_streams_entry(held, fanout=self.held_fanout, rss_before_mb=before)
                                 for held, before in self.held],
                "startup_s": [round(x, 3) for x in self.startups],
                "runs": self.gateways,
            },
            "stack_floor": report.floor_document(self.floor),
            "floor_shares": self.shares,
            "workers": report.workers_document(self.workers, pinned=self.gateway_cpus is not None,
                                               skipped=self.workers_skipped, startups=self.workers_startups),
            "miners_process": {"cpu_s": report.rounded(miners_cpu_s, 2)},
            "load_generator": {"cpu_s": round(self.load_cpu_s, 2), "wall_s": round(self.load_wall_s, 2),
                               "cpu_share": round(self.load_cpu_s / self.load_wall_s, 3)
                               if self.load_wall_s else None},
        }
        doc["targets"] = report.targets(doc)
        return doc


SHARE_PAIRS = 6  # alternating (floor, gateway) phase pairs each fan-out's share is the median of
SHARE_PAIRS_QUICK = 2
SCORING_DRAIN_S = 60.0  # the longest a phase waits for its gateway to forward its organics
SCORING_STUCK_S = 5.0  # ... and how long it waits while that number does not go down
SCORING_POLL_S = 0.1


async def wait_scoring_drained(gateway_url: str, limit_s: float) -> int | None:
    """Until the gateway holds no organic still to forward: fan-outs still collecting answers, and
    payloads queued, overflowing, being written, in flight or in its spool. Returns how many it still
    held when the wait ended (0 when drained; it ends early when the number stops going down, e.g. the
    validator is unreachable), or None when the gateway does not report scoring (off, or not ours)."""
    left: int | None = None
    best, best_at = math.inf, time.perf_counter()
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
        with trio.move_on_after(limit_s):
            while True:
                report = await readiness(http, gateway_url)
                if report is None or (stats := scoring_of(report)) is None:
                    return None
                left = (stats["queued"] + stats["overflow"] + stats["writing"] + stats["in_flight"]
                        + stats["spool_pending"] + int(report.get("fanout", {}).get("running", 0)))
                if left == 0:
                    return 0
                if left < best:
                    best, best_at = left, time.perf_counter()
                elif time.perf_counter() - best_at > SCORING_STUCK_S:
                    break
                await trio.sleep(SCORING_POLL_S)
    return left


HEALTH_POLL_S = 0.005


async def wait_health(url: str, spawned_at: float, limit_s: float = 30.0) -> float:
    """Seconds from `spawned_at` (perf_counter, when `serve` was started) to the first 200 of `GET /health`."""
    endpoint = Endpoint.parse(url, "/health")
    request = (f"GET /health HTTP/1.1\r\nHost: {endpoint.host}:{endpoint.port}\r\n\r\n").encode()
    with trio.fail_after(limit_s):
        while True:
            try:
                conn = await Connection.open(endpoint)
                try:
                    if (await conn.exchange(request, scan=False)).status == 200:
                        return time.perf_counter() - spawned_at
                finally:
                    await conn.aclose()
            except (OSError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await trio.sleep(HEALTH_POLL_S)


SCORING_FIGURES = ("submitted", "delivered", "spooled", "queued", "overflow", "writing", "in_flight",
                   "attempts_failed")


async def readiness(http: httpx.AsyncClient, gateway_url: str) -> dict[str, Any] | None:
    """A gateway's `/health/ready` report, or None when it gave none."""
    try:
        report = (await http.get(f"{gateway_url}/health/ready")).json()
    except (httpx.HTTPError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def scoring_of(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The scoring forwarder's counts in a readiness report; None when scoring is off or not reported."""
    try:
        stats = report["scoring"]  # type: ignore[index]
        if not stats["enabled"]:
            return None
        return {**{name: stats[name] for name in SCORING_FIGURES}, "spool_pending": stats["spool"]["pending"],
                "dropped": {k: v for k, v in stats["dropped"].items() if v}}
    except (KeyError, TypeError):
        return None


async def scoring_report(gateway_url: str) -> dict[str, Any] | None:
    """What a gateway's scoring forwarder did (from `/health/ready`), so a run shows whether every
    organic reached the validator; None when the gateway did not say."""
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
        return scoring_of(await readiness(http, gateway_url))


def calibration() -> dict[str, float]:
    """How fast this machine is right now, in units the design notes quote (one sr25519 signature
    took about 22 us where the performance budget was written): absolute times scale with it."""
    keypair = Keypair.create_from_uri("//bench/calibration")
    message = b"x" * 128
    rounds = 300
    started = time.perf_counter()
    for _ in range(rounds):
        keypair.sign(message)
    sign_us = (time.perf_counter() - started) / rounds * 1e6
    document = {"choices": [{"index": 0, "delta": {"content": "word "}, "logprobs": None}] * 4}
    started = time.perf_counter()
    for _ in range(rounds):
        json.loads(json.dumps(document))
    json_us = (time.perf_counter() - started) / rounds * 1e6
    return {"sr25519_sign_us": round(sign_us, 1), "json_roundtrip_us": round(json_us, 1)}


STEADY_SAMPLE_S = 0.1


def steady_use(samples: list[tuple[float, float]], started: float, wall_s: float) -> float | None:
    """CPU use in cores between the first and the last sample inside the middle half of the load
    (`started`, `wall_s`: its perf_counter start and length); None when fewer than two fall there."""
    inside = [s for s in samples if started + wall_s / 4 <= s[0] <= started + 3 * wall_s / 4]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _delta(before: ProcessSample | None, after: ProcessSample | None) -> float | None:
    return None if before is None or after is None else after.cpu_s - before.cpu_s


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


async def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; write the JSON to `options.out`, print the table; the document."""
    keep = options.keep_dir
    workdir = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="sn1-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        async with trio.open_nursery() as nursery:
            run = Run(options, workdir.resolve(), nursery)
            try:
                doc = await run.run()
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(doc, indent=2, allow_nan=False)
    await trio.Path(options.out).write_text(text + "\n", encoding="utf-8")
    print(report.table(doc), flush=True)
    print(f"\nwrote {options.out}", flush=True)
    return doc


def finite_numbers(value: Any) -> bool:
    """Every number in a JSON document is finite (the document never carries NaN or infinity)."""
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


__all__ = ["BenchOptions", "LoadResult", "finite_numbers", "run_bench"]
