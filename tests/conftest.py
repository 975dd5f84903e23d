"""Fixtures shared by several test modules. A fixture moves here once a second module needs it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from config.settings import (
    AuthSettings,
    AvailabilitySettings,
    ScoringSettings,
    ServerSettings,
    Settings,
    SubnetSettings,
    WalletSettings,
)
from tests.chat_stack import Stack, open_stack
from tests.redis_server import RedisServer, free_port, start_redis, stop_redis
from wire.pool import KeepAliveTransport


@pytest.fixture
def stack_clock() -> trio.testing.MockClock:
    """A clock that jumps over idle waits, as pytest-trio's `autojump_clock` does, but only after
    the loop has been idle for a moment of real time: a whole gateway reads its files and
    metagraph in worker threads, and a clock jumping at once would time those reads out."""
    return trio.testing.MockClock(autojump_threshold=0.5)


@pytest.fixture
def gateway_settings(tmp_path: Path) -> Settings:
    """Settings for a gateway run in-process: a free port, an empty static subnet, a development
    hotkey, nothing polled or forwarded, and every file it writes under `tmp_path`."""
    return dataclasses.replace(
        Settings(),
        server=ServerSettings(port=0),
        auth=AuthSettings(keys_file=str(tmp_path / "keys.toml")),
        wallet=WalletSettings(uri="//Alice"),
        subnet=SubnetSettings(source="static"),
        availability=AvailabilitySettings(source="none"),
        scoring=ScoringSettings(enabled=False, spool_dir=str(tmp_path / "spool")),
        base_dir=str(tmp_path),
    )


@pytest.fixture
async def stack(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Stack]:
    """A gateway on loopback whose miners are scripted (tests/chat_stack.py), with an API key."""
    async with open_stack(tmp_path, nursery) as opened:
        yield opened


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the tests' own on a free loopback port (skipped where there is none, outside CI)."""
    port = free_port()
    proc = start_redis(port)
    try:
        yield RedisServer(port)
    finally:
        stop_redis(proc)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The server's URL, emptied for this test."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, KeepAliveTransport]]:
    """An httpx client on the gateway's own outbound pool."""
    transport = KeepAliveTransport()
    async with httpx.AsyncClient(transport=transport, timeout=5) as http:
        yield http, transport
