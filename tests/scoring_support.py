"""What the scoring tests share: scripted validators (httpx.MockTransport), organics whose chunks name
their miners, settings, a metagraph, and spool I/O run inline for the autojump clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio
from bittensor_core import Keypair

from config.settings import ScoringSettings, Settings
from wire import jsonio
from wire.metagraph import Neuron, SubnetSnapshot
from wire.organic import MinerAnswer, OrganicResult
from wire.snapshot import SnapshotCell

T = TypeVar("T")


def hotkey(name: str) -> str:
    return Keypair.create_from_uri(f"//{name}").ss58_address


def validator(uid: int, stake: float, *, permit: bool = True, axon: str | None = "auto") -> Neuron:
    return Neuron(uid=uid, hotkey=hotkey(f"validator{uid}"), stake=stake, validator_permit=permit,
                  axon=f"10.0.0.{uid}:8091" if axon == "auto" else axon)


def organic(i: int, uids: Iterable[int] = (12, 40, 7), task: str = "InferenceTask") -> OrganicResult:
    """A finished fan-out whose every chunk names the miner that sent it."""
    answers = tuple(
        MinerAnswer(
            uid=uid, hotkey=hotkey(f"miner{uid}"),
            chunks=[f"r{i}-m{uid}-a", f"r{i}-m{uid}-b"] if uid % 2 == 0 else [f"r{i}-m{uid}"],
            timings=[0.01 * uid, 0.02 * uid] if uid % 2 == 0 else [0.03 * uid],
            raw_chunks=[jsonio.dumps({"choices": [{"index": 0, "delta": {"content": f"r{i}-m{uid}"}}]})],
        )
        for uid in uids
    )
    body = {"messages": [{"role": "user", "content": f"question {i}"}], "seed": i, "task": task}
    return OrganicResult(request_id=f"req-{i}", task=task, body=body, answers=answers, created_at=0.0)



def large_organic(i: int, chunks: int, chunk_chars: int = 8192) -> OrganicResult:
    """An organic whose first miner said much: `chunks` chunks of `chunk_chars` characters each (about
    twice that in memory: the text and the raw chunk), the other two a little."""
    small = organic(i, uids=(40, 7))
    text = f"r{i}-".ljust(chunk_chars, "x")
    raw = jsonio.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})
    large = MinerAnswer(uid=12, hotkey=hotkey("miner12"), chunks=[text] * chunks, timings=[0.1] * chunks,
                        raw_chunks=[raw] * chunks, finish_reason="stop", completed=True)
    return OrganicResult(request_id=small.request_id, task=small.task, body=small.body,
                         answers=(large, *small.answers), created_at=0.0)

@dataclass
class Validators:
    """Scripted validators keyed by axon: "ok", a status ("500", "401", ...), "hang" (never answers),
    "refuse" (connection refused), "big" (a 200 with a 100 KB body), "odd_500" (500 for odd seeds) or
    "echo_422" (a 422 whose body echoes the payload)."""

    modes: dict[str, str] = field(default_factory=dict)
    default: str = "ok"
    gate: trio.Event | None = None  # when set, answers wait for it
    attempts: list[tuple[str, float]] = field(default_factory=list)  # (axon, trio time)
    delivered: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (axon, payload)
    requests: list[httpx.Request] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        axon = f"{request.url.host}:{request.url.port}"
        self.attempts.append((axon, trio.current_time()))
        if self.gate is not None:
            await self.gate.wait()
        mode = self.modes.get(axon, self.default)
        if mode == "hang":
            await trio.sleep_forever()
        if mode == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if mode == "odd_500":  # fails the payloads of odd seeds only
            mode = "500" if json.loads(request.content)["body"]["seed"] % 2 else "ok"
        if mode == "echo_422":  # FastAPI's validation error: the refused body, prompts and all, echoed back
            return httpx.Response(422, json={"detail": [{"type": "missing", "input": json.loads(request.content)}]})
        if mode == "big":  # a 200 with far more than a scoring answer
            return httpx.Response(200, content=b"[" + b"0," * 50_000 + b"0]")
        if mode != "ok":
            return httpx.Response(int(mode), json={"detail": "down"})
        self.requests.append(request)
        self.delivered.append((axon, json.loads(request.content)))
        return httpx.Response(200, json=None)

    def request_ids(self) -> list[int]:
        return [payload["body"]["seed"] for _, payload in self.delivered]


def settings_for(tmp_path: Path, **scoring: Any) -> Settings:
    base = {"min_validator_stake": 1000.0, "backoff_base_s": 1.0, "backoff_max_s": 60.0, "timeout_s": 5.0}
    return Settings(scoring=ScoringSettings(**{**base, **scoring}), base_dir=str(tmp_path))


def subnet_of(*neurons: Neuron) -> SnapshotCell[SubnetSnapshot]:
    return SnapshotCell(SubnetSnapshot.of(1, neurons))




async def run_inline(sync_fn: Callable[..., T], *args: Any) -> T:
    """Spool I/O on the event loop: with the autojump clock, time must not move while the disk works."""
    await trio.lowlevel.checkpoint()
    return sync_fn(*args)


async def until(condition: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Poll a condition on the forwarder's counters (they have no event to wait on)."""
    with trio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)
