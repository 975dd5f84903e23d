"""A gateway over a devnet (real miners and a real validator on loopback, real Epistula), for
end-to-end tests."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from config.settings import AuthSettings, AvailabilitySettings, FanoutSettings, ServerSettings, Settings
from devnet.miner import MinerTiming
from devnet.network import Devnet
from engine.gateway import Gateway, run

HEALTHY_FIRST_TOKEN_S = 0.02
SLOW_S = 5.0


@dataclasses.dataclass
class Net:
    devnet: Devnet
    gateway: Gateway
    client: httpx.AsyncClient
    key: str


async def start(nursery: trio.Nursery, tmp_path: Path, *, faults: tuple[str, ...] = (), miners: int = 5,
                availability: str = "none", fanout: int = 5, **fanout_settings: Any) -> Net:
    timing = MinerTiming(first_token_s=HEALTHY_FIRST_TOKEN_S, token_s=0.002, slow_first_token_s=SLOW_S,
                         slow_token_s=SLOW_S)
    devnet: Devnet = await nursery.start(Devnet(miners=miners, faults=faults, timing=timing,
                                                validator_poll_s=0.5).run)
    settings = devnet.configure(dataclasses.replace(
        Settings(),
        server=ServerSettings(port=0),
        auth=AuthSettings(keys_file=str(tmp_path / "keys.toml")),
        fanout=FanoutSettings(**{"miners": fanout, "first_token_timeout_s": 3.0, **fanout_settings}),
        base_dir=str(tmp_path),
    ))
    settings = dataclasses.replace(settings, availability=AvailabilitySettings(source=availability,  # type: ignore[arg-type]
                                                                               interval_s=1.0))
    gateway: Gateway = await nursery.start(lambda task_status: run(settings, source=devnet.source,
                                                                     task_status=task_status))
    key, _ = await gateway.services.keys.create(10_000)
    client = httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30)
    if availability != "none":
        cell = gateway.services.availability
        with trio.fail_after(10):
            while not cell.get().ever_known:
                await cell.wait_newer(cell.version)
    return Net(devnet, gateway, client, key)


async def stream_chat(client: httpx.AsyncClient, content: str, **extra: Any) -> tuple[float, list[Any]]:
    """Send one streaming request; return the time to the first content and the events."""
    body = {"messages": [{"role": "user", "content": content}], "stream": True, "seed": 1, **extra}
    started = time.monotonic()
    ttft = float("inf")
    events: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                events.append(data)
                continue
            event = json.loads(data)
            if ttft == float("inf") and event.get("choices") and event["choices"][0]["delta"].get("content"):
                ttft = time.monotonic() - started
            events.append(event)
    return ttft, events
