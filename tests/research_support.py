"""A devnet and a gateway on it for deep-research and jobs tests, and what a whole devnet run shows."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import httpx
import trio
from openai import AsyncOpenAI

from config.settings import (
    AuthSettings,
    AvailabilitySettings,
    FanoutSettings,
    JobsSettings,
    ResearchSettings,
    ServerSettings,
    Settings,
)
from devnet.miner import MinerTiming
from devnet.network import Devnet
from engine.gateway import Gateway, run

QUESTION = "How do Subnet 1 validators score organic answers?"
FAST = MinerTiming(first_token_s=0.0, token_s=0.0)
HEADINGS = [
    "## Generating Research Plan", "## Research Plan",
    "## Step 1: Planning Tools", "## Executing web_search", "### Tool Results", "## Analyzing Step 1",
    "## Step 1 Summary", "## Updating Research Plan", "## Research Plan Updated",
    "## Step 2: Planning Tools", "## Executing web_search", "### Tool Results", "## Analyzing Step 2",
    "## Step 2 Summary", "## Generating Final Answer", "## Final Answer", "### Sources", "### Limitations"]
CALLS = 12  # model calls of the devnet's whole run: assess, plan, 2 x (tools, query, search answer, think), update, final
SEARCHES = 2


@dataclasses.dataclass
class Net:
    devnet: Devnet
    gateway: Gateway
    client: httpx.AsyncClient
    key: str
    settings: Settings

    def research(self, **extra: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": QUESTION}], "inference_mode": "Chain-of-Thought", **extra}

    def miner_calls(self) -> list[dict[str, Any]]:
        """Every chat request the miners received, in no particular order."""
        return [r.json() for m in self.devnet.miners for r in m.received if r.path == "/v1/chat/completions"]

    def openai(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.gateway.url}/v1", api_key=self.key, max_retries=0, timeout=20)


def net_settings(devnet: Devnet, tmp_path: Path, *, research: ResearchSettings | None = None,
                 jobs: JobsSettings | None = None, auth: AuthSettings | None = None,
                 **fanout: Any) -> Settings:
    settings = devnet.configure(dataclasses.replace(
        Settings(),
        server=ServerSettings(port=0),
        auth=auth or AuthSettings(keys_file=str(tmp_path / "keys.toml")),
        fanout=FanoutSettings(**{"miners": len(devnet.miners), "first_token_timeout_s": 3.0, **fanout}),
        research=research or ResearchSettings(search_timeout_s=5),
        jobs=jobs or JobsSettings(),
        base_dir=str(tmp_path),
    ))
    return dataclasses.replace(settings, availability=AvailabilitySettings(source="none"))


async def start_gateway(nursery: trio.Nursery, settings: Settings, devnet: Devnet) -> Gateway:
    gateway: Gateway = await nursery.start(lambda task_status: run(settings, source=devnet.source,
                                                                     task_status=task_status))
    with trio.fail_after(5):
        while not gateway.services.jobs or not gateway.services.jobs._beating:  # noqa: ASYNC110 - first beat
            await trio.sleep(0.01)
    return gateway


async def open_net(nursery: trio.Nursery, tmp_path: Path, *, timing: MinerTiming = FAST, miners: int = 3,
                   devnet: Devnet | None = None, **options: Any) -> Net:
    """A devnet and a gateway on it (every part on loopback), and a client with a fresh key."""
    if devnet is None:
        devnet = await nursery.start(Devnet(miners=miners, timing=timing, validator_poll_s=60).run)
    settings = net_settings(devnet, tmp_path, **options)
    gateway = await start_gateway(nursery, settings, devnet)
    key, _ = await gateway.services.keys.create(10_000)
    client = httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30)
    return Net(devnet, gateway, client, key, settings)


def text_of(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events
                   if isinstance(e, dict) and e.get("choices"))


def heading_lines(text: str) -> list[str]:
    return [re.sub(r"^(## Step \d+): .*", r"\1: Planning Tools", line) if "Planning Tools" in line else line
            for line in re.findall(r"^#{2,3} .*$", text, re.MULTILINE)]
