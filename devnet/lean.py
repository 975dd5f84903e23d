"""Lean simulated peers for the benchmark: miners and a validator on `devnet.rawhttp`, never the bottleneck.

They speak what the Quart-based devnet speaks (Epistula checked on every request, the same chunk
shapes and text) at a fraction of its cost per exchange. Miner modes:
- "bench": a fixed-length answer at once, in one write (as the devnet's `bench` fault);
- "slow_tokens": a token every `slow_token_s` (for holding thousands of streams open);
- "subnet": the miner of a `devnet.population` profile: its plan for the request's seed decides when
  the first token comes, how fast the rest follow, and whether it fails (HTTP 500, hang, break
  mid-stream, garbage; "refuse" miners do not listen at all). Each request's plan is reported to
  `on_plan`, so the benchmark knows what every asked miner was going to do.

The validator takes `POST /scoring` from the gateway's hotkey and answers 200 `null`, counting what it got.
`python -m devnet.lean --modes bench,bench,slow_tokens` runs them and prints the gateway's config
sections, as `sn1-gateway devnet` does.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tomlkit
import trio
from bittensor_core import Keypair

from devnet import text
from devnet.miner import ChunkMaker
from devnet.population import MinerProfile, Plan
from devnet.rawhttp import RawRequest, RawServer, Responder, StreamStopped
from wire import jsonio
from wire.epistula import EpistulaError, Verifier
from wire.metagraph import Neuron
from wire.sse import DONE_EVENT

DEFAULT_GATEWAY_URI = "//devnet/gateway"
CHAT_PATH = "/v1/chat/completions"
MODEL = "mrfakename/mistral-small-3.1-24b-instruct-2503-hf"
MODES = ("bench", "slow_tokens", "subnet")
BENCH_CACHE = 64  # answers kept per bench miner (the benchmark sends a handful of distinct bodies)


def _error(status: int, message: str, code: str) -> bytes:
    return jsonio.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                   "invalid_request_error", "param": None, "code": code}})


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request a subnet miner received, and what it was going to do with it."""

    uid: int
    seed: int
    at_s: float  # seconds into the scenario
    stream: bool
    plan: Plan


class LeanMiner:
    def __init__(self, uid: int, *, signers: Sequence[str], mode: str = "bench", bench_tokens: int = 16,
                 first_token_s: float = 0.02, slow_token_s: float = 0.5, profile: MinerProfile | None = None,
                 started_at: Callable[[], float | None] = lambda: None,
                 on_plan: Callable[[PlannedRequest], None] | None = None,
                 incentive: float = 0.0, stake: float = 0.0, host: str = "127.0.0.1") -> None:
        if mode not in MODES:
            raise ValueError(f"miner mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode == "subnet" and profile is None:
            raise ValueError("a subnet miner needs a profile")
        self.uid = uid
        self.mode = mode
        self.keypair = Keypair.create_from_uri(f"//devnet/miner/{uid}")
        self.hotkey: str = self.keypair.ss58_address
        self.verifier = Verifier(self.hotkey, frozenset(signers))
        self.bench_tokens = bench_tokens
        self.first_token_s = first_token_s
        self.slow_token_s = slow_token_s
        self.profile = profile
        self.started_at = started_at  # trio time the scenario's clock started (None: not yet)
        self.on_plan = on_plan
        self.incentive = incentive
        self.stake = stake
        self.chunks = ChunkMaker(f"chatcmpl-devnet-{uid}", MODEL)
        self.server = RawServer(self.handle, host=host, name=f"lean miner {uid}")
        self.answered = 0
        self.rejected = 0
        self._bench: dict[tuple[Any, bytes, int], bytes] = {}

    @property
    def listening(self) -> bool:
        return not (self.profile is not None and self.profile.fault == "refuse")

    @property
    def address(self) -> str:
        return self.server.address

    def neuron(self) -> Neuron:
        return Neuron(uid=self.uid, hotkey=self.hotkey, axon=self.address, incentive=self.incentive,
                      stake=self.stake)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        if self.listening:
            await self.server.run(task_status=task_status)
            return
        # "refuse": hold a port nobody listens on, so connections to the axon are refused
        import socket

        holder = socket.socket()
        try:
            holder.bind((self.server.host, 0))
            self.server.port = holder.getsockname()[1]
            task_status.started(self.address)
            await trio.sleep_forever()
        finally:
            holder.close()

    async def handle(self, request: RawRequest, out: Responder) -> None:
        if request.method != "POST" or request.path != CHAT_PATH:
            await out.send(404, _error(404, f"no route {request.method} {request.path}", "not_found"))
            return
        try:
            self.verifier.verify(request.headers, request.body)
            body = jsonio.loads(request.body)
        except EpistulaError as exc:
            self.rejected += 1
            await out.send(exc.status, _error(exc.status, str(exc), exc.code))
            return
        except ValueError:
            self.rejected += 1
            await out.send(400, _error(400, "the body is not valid JSON", "invalid_json"))
            return
        if not isinstance(body, dict):
            await out.send(400, _error(400, "the body must be a JSON object", "invalid_body"))
            return
        self.answered += 1
        if self.mode == "bench":
            await out.send(200, self._bench_answer(body), "text/event-stream")
        elif self.mode == "slow_tokens":
            answer = text.fixed_answer(body.get("seed"), body.get("messages"), 10_000, text.max_tokens_of(body))
            await self._stream(out, answer, self.first_token_s, self.slow_token_s)
        else:
            await self._subnet(body, out)

    def _bench_answer(self, body: dict[str, Any]) -> bytes:
        max_tokens = text.max_tokens_of(body)
        key = (body.get("seed"), jsonio.dumps(body.get("messages")), max_tokens)
        found = self._bench.get(key)
        if found is None:
            answer = text.fixed_answer(key[0], body.get("messages"), self.bench_tokens, max_tokens)
            chunks = self.chunks
            found = b"".join([*(chunks.content(t.text, t.logprobs(with_bytes=False), role=i == 0)
                                for i, t in enumerate(answer.tokens)),
                              chunks.finish(answer.finish_reason), DONE_EVENT])
            if len(self._bench) >= BENCH_CACHE:
                self._bench.clear()
            self._bench[key] = found
        return found

    async def _stream(self, out: Responder, answer: text.Answer, first_s: float, step_s: float,
                      *, stop_at: int | None = None, garbage: bool = False) -> None:
        chunks = self.chunks
        await trio.sleep(first_s)
        await out.start(200, first=b'data: {"choices": [{"index": 0, "delta": {"content": "broken\n\n'
                        if garbage else chunks.role())
        if garbage:
            await out.end()
            return
        for i, token in enumerate(answer.tokens):
            if i == stop_at:
                raise StreamStopped(f"miner {self.uid} stops mid-stream (simulated)")
            if i > 0:
                await trio.sleep(step_s)
            await out.chunk(chunks.content(token.text, token.logprobs(with_bytes=False)))
        await out.end(chunks.finish(answer.finish_reason) + DONE_EVENT)

    async def _subnet(self, body: dict[str, Any], out: Responder) -> None:
        assert self.profile is not None
        seed = body.get("seed")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        started = self.started_at()
        at = trio.current_time() - started if started is not None else 0.0
        plan = self.profile.plan(seed, at)
        if self.on_plan is not None and started is not None:
            self.on_plan(PlannedRequest(self.uid, seed, at, bool(body.get("stream")), plan))
        if plan.outcome == "http_500":
            await trio.sleep(min(plan.ttft_s, 0.5))
            await out.send(500, _error(500, f"miner {self.uid} failed (simulated)", "simulated_failure"))
            return
        if plan.outcome == "hang":
            await out.start(200)
            await out.wait_closed()
            raise StreamStopped("the client left a hanging miner")
        answer = text.answer(seed, body.get("messages"), text.max_tokens_of(body))
        stop_at = len(answer.tokens) // 2 if plan.outcome == "stop_mid_stream" else None
        await self._stream(out, answer, plan.ttft_s, plan.token_s, stop_at=stop_at,
                           garbage=plan.outcome == "garbage")


class LeanValidator:
    """Takes scoring posts from the gateway; counts them (nothing is kept)."""

    def __init__(self, uid: int, *, gateway_hotkey: str, host: str = "127.0.0.1",
                 on_scored: Callable[[bytes], None] | None = None) -> None:
        """`on_scored`: given each accepted payload (the benchmark reads which miners it covers)."""
        self.uid = uid
        self.on_scored = on_scored
        self.keypair = Keypair.create_from_uri("//devnet/validator")
        self.hotkey: str = self.keypair.ss58_address
        self.verifier = Verifier(self.hotkey, frozenset({gateway_hotkey}))
        self.server = RawServer(self.handle, host=host, name="lean validator")
        self.scored = 0
        self.scored_bytes = 0
        self.rejected = 0

    @property
    def address(self) -> str:
        return self.server.address

    def neuron(self) -> Neuron:
        return Neuron(uid=self.uid, hotkey=self.hotkey, axon=self.address, stake=50_000.0, validator_permit=True)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await self.server.run(task_status=task_status)

    async def handle(self, request: RawRequest, out: Responder) -> None:
        if request.method != "POST" or request.path != "/scoring":
            await out.send(404, _error(404, f"no route {request.method} {request.path}", "not_found"))
            return
        try:
            self.verifier.verify(request.headers, request.body)
        except EpistulaError as exc:
            self.rejected += 1
            await out.send(exc.status, _error(exc.status, str(exc), exc.code))
            return
        self.scored += 1
        self.scored_bytes += len(request.body)
        if self.on_scored is not None:
            self.on_scored(request.body)
        await out.send(200, b"null")


class LeanDevnet:
    """Lean miners (uids 0..n-1) and the lean validator (uid n)."""

    def __init__(self, modes: Sequence[str] = (), *, profiles: Sequence[MinerProfile] = (),
                 gateway_uri: str = DEFAULT_GATEWAY_URI, netuid: int = 1, slow_token_s: float = 0.5,
                 on_plan: Callable[[PlannedRequest], None] | None = None,
                 on_scored: Callable[[bytes], None] | None = None, host: str = "127.0.0.1") -> None:
        self.netuid = netuid
        self.gateway_uri = gateway_uri
        self.gateway_hotkey: str = Keypair.create_from_uri(gateway_uri).ss58_address
        self.started_at: float | None = None
        count = len(profiles) or len(modes)
        self.validator = LeanValidator(count, gateway_hotkey=self.gateway_hotkey, host=host, on_scored=on_scored)
        weight_total = count * (count + 1) / 2
        self.miners = [
            LeanMiner(uid, signers=(self.gateway_hotkey,), mode="subnet" if profiles else modes[uid],
                      profile=profiles[uid] if profiles else None, slow_token_s=slow_token_s,
                      started_at=lambda: self.started_at, on_plan=on_plan,
                      incentive=round((count - uid) / weight_total, 6), stake=10.0 + uid, host=host)
            for uid in range(count)
        ]

    def start_clock(self) -> None:
        """The scenario starts now: plans are timed from here, and reported from here on."""
        self.started_at = trio.current_time()

    async def run(self, *, task_status: trio.TaskStatus[LeanDevnet] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for miner in self.miners:
                await nursery.start(miner.run)
            await nursery.start(self.validator.run)
            task_status.started(self)

    def neurons(self) -> list[Neuron]:
        gateway = Neuron(uid=self.validator.uid + 1, hotkey=self.gateway_hotkey, axon=None, stake=20_000.0,
                         validator_permit=True)
        return [*(m.neuron() for m in self.miners), self.validator.neuron(), gateway]

    def config(self) -> dict[str, Any]:
        """The config sections a gateway needs to use this devnet (as `Devnet.config_toml` writes them)."""
        return {
            "wallet": {"uri": self.gateway_uri},
            "subnet": {"source": "static", "netuid": self.netuid, "neurons": [
                {"uid": n.uid, "hotkey": n.hotkey, "axon": n.axon or "", "incentive": n.incentive,
                 "stake": n.stake, "validator_permit": n.validator_permit} for n in self.neurons()]},
            "availability": {"source": "none"},
            "scoring": {"validator": self.validator.address, "validator_hotkey": self.validator.hotkey},
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devnet.lean", description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="bench,bench,bench,bench,bench,slow_tokens",
                        help="one miner mode per uid, comma-separated (bench, slow_tokens)")
    parser.add_argument("--slow-token-s", type=float, default=0.5)
    parser.add_argument("--gateway-uri", default=DEFAULT_GATEWAY_URI)
    args = parser.parse_args(argv)

    async def run() -> None:
        devnet = LeanDevnet([m.strip() for m in args.modes.split(",") if m.strip()],
                            gateway_uri=args.gateway_uri, slow_token_s=args.slow_token_s)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(devnet.run)
                print(tomlkit.dumps(devnet.config()), flush=True)
                print(f"# lean devnet: {len(devnet.miners)} miners and a validator; SIGTERM stops",
                      file=sys.stderr, flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
        print(f"# validator took {devnet.validator.scored} scoring posts", file=sys.stderr, flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
