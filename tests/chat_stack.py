"""A gateway on real loopback HTTP whose miners are scripted servers on loopback too."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from bittensor_core import Keypair

from config.settings import (
    AuthSettings,
    AvailabilitySettings,
    FanoutSettings,
    NeuronSettings,
    ServerSettings,
    Settings,
    SubnetSettings,
    WalletSettings,
)
from engine.gateway import Gateway, run
from tests.scripted_miners import Miners
from web.app import create_app
from web.asgi import shield_response_end

UIDS = (1, 2, 3)


def settings_for(tmp_path: Path, scripted: Miners | None = None, **fanout: Any) -> Settings:
    """The stack's settings: a static subnet of `UIDS` (at the miners' loopback axons when served)."""
    neurons = tuple(
        NeuronSettings(uid=uid, hotkey=Keypair.create_from_uri(f"//miner{uid}").ss58_address,
                       axon=scripted.axon(uid) if scripted is not None else f"127.0.0.1:{9000 + uid}",
                       incentive=0.1 * uid)
        for uid in UIDS
    )
    return dataclasses.replace(
        Settings(),
        server=ServerSettings(port=0),
        auth=AuthSettings(keys_file=str(tmp_path / "keys.toml"), admin_key="admin"),
        wallet=WalletSettings(uri="//Gateway"),
        subnet=SubnetSettings(source="static", neurons=neurons),
        availability=AvailabilitySettings(source="none"),
        fanout=FanoutSettings(**{"miners": 3, "first_token_timeout_s": 1.5, **fanout}),
        base_dir=str(tmp_path),
    )


@dataclasses.dataclass
class Stack:
    gateway: Gateway
    miners: Miners
    key: str
    client: httpx.AsyncClient

    @property
    def gateway_app(self) -> Any:
        """The application as the server runs it (inside the gateway's ASGI wrapper), to drive over
        ASGI directly where a socket cannot time a disconnect."""
        return shield_response_end(create_app(self.gateway.services), 5.0)

    async def chat(self, **body: Any) -> httpx.Response:
        body.setdefault("messages", [{"role": "user", "content": "hello"}])
        return await self.client.post("/v1/chat/completions", json=body)


@asynccontextmanager
async def open_stack(tmp_path: Path, nursery: trio.Nursery, **fanout: Any) -> AsyncIterator[Stack]:
    """A gateway whose miners are scripted loopback servers, with `fanout` settings overriding the defaults."""
    miners = Miners()
    await miners.serve(nursery, UIDS)  # real loopback servers, reached through the gateway's own pool
    gateway: Gateway = await nursery.start(lambda task_status: run(
        settings_for(tmp_path, miners, **fanout), task_status=task_status))
    key, _ = await gateway.services.keys.create(1000)
    async with httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30) as client:
        yield Stack(gateway, miners, key, client)
    gateway.shutdown()


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@dataclasses.dataclass
class AsgiResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_post(app: Any, path: str, payload: Any, headers: dict[str, str]) -> AsgiResponse:
    """One POST straight to the ASGI app, without a socket: for tests on the autojump clock, where a
    real connection's waits would let virtual time run out from under it."""
    body = json.dumps(payload).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2), "extensions": {},
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         *((k.lower().encode(), v.encode()) for k, v in headers.items())]}
    sent = [False]
    done = trio.Event()
    response = AsgiResponse(0, {}, b"")

    async def receive() -> dict[str, Any]:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            response.body += message.get("body", b"")
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return response
