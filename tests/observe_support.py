"""A gateway over a devnet with an admin key, for the tests of logs, the status page and its browser test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import trio

from config.settings import AuthSettings, FanoutSettings, ServerSettings, Settings
from devnet.miner import MinerTiming
from devnet.network import Devnet
from engine.gateway import Gateway, run

ADMIN_KEY = "observe-admin-key-distinctive-4711"


@dataclasses.dataclass
class Net:
    devnet: Devnet
    gateway: Gateway
    client: httpx.AsyncClient  # sends `key`
    key: str
    admin: httpx.AsyncClient  # sends no key at all


async def start(nursery: trio.Nursery, tmp_path: Path, *, miners: int = 2, faults: tuple[str, ...] = (),
                timing: MinerTiming | None = None, admin_key: str = ADMIN_KEY, validator_fault: str = "") -> Net:
    """Devnet miners answering at their usual speed (first token after 20 ms), every miner asked, no
    availability polls; a validator that refuses us is retried every 0.3 s at most."""
    devnet: Devnet = await nursery.start(Devnet(miners=miners, faults=faults, validator_fault=validator_fault,
                                                timing=timing or MinerTiming(), validator_poll_s=0.5).run)
    settings = devnet.configure(dataclasses.replace(
        Settings(), server=ServerSettings(port=0),
        auth=AuthSettings(keys_file=str(tmp_path / "keys.toml"), admin_key=admin_key),
        fanout=FanoutSettings(miners=miners, first_token_timeout_s=5.0), base_dir=str(tmp_path)))
    settings = dataclasses.replace(
        settings, availability=dataclasses.replace(settings.availability, source="none"),
        scoring=dataclasses.replace(settings.scoring, backoff_base_s=0.1, backoff_max_s=0.3,
                                    spool_dir=str(tmp_path / "spool")))
    gateway: Gateway = await nursery.start(lambda task_status: run(settings, source=devnet.source,
                                                                     task_status=task_status))
    key, _ = await gateway.services.keys.create(10_000)
    client = httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30)
    return Net(devnet, gateway, client, key, httpx.AsyncClient(base_url=gateway.url, timeout=30))
