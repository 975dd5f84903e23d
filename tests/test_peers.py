"""The workers' reports to each other (`actors/peers.py`, `web/peer_report.py`): cheap to build, and read
from Redis as untrusted bytes."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from actors.keystore.records import KeyInfo
from actors.peers import MAX_SNAPSHOT_BYTES, WorkerPeers
from tests.chat_stack import Stack
from tests.redis_server import RedisServer
from web.peer_report import worker_report


async def test_a_workers_report_does_not_list_the_keys_and_the_status_reads_them_once(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    services = stack.gateway.services
    real_list = services.keys.list_keys
    listings: list[int] = []

    async def counted() -> list[KeyInfo]:
        listings.append(1)
        return await real_list()

    monkeypatch.setattr(services.keys, "list_keys", counted)
    report = worker_report(services)
    for _ in range(3):  # every few seconds, whether anyone looks or not
        published = await report()
    assert listings == []  # before: the whole key store read for every report
    assert "keys" not in published["status"] and published["status"]["ready"] is True
    assert "sn1_gateway_ready 1.0" in published["metrics"]
    response = await stack.client.get("/status/data", headers={"admin-key": "admin"})
    assert response.status_code == 200, response.text
    assert response.json()["keys"]["count"] == 1 and len(listings) == 1  # read when asked, once


async def test_bad_reports_of_other_workers_are_skipped_counted_and_logged_once(
        redis_url: str, redis_server: RedisServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:

    async def nothing() -> dict[str, object]:
        return {}

    peers = WorkerPeers(redis_url, group="g", index=0, count=5, snapshot=nothing, interval_s=3600)
    await nursery.start(peers.run)
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    redis_server.command("SET", peers.key(1), json.dumps({"index": 1, "status": deep}))
    redis_server.command("SET", peers.key(2), json.dumps({"index": 2, "status": {"ready": True}}))
    redis_server.command("SET", peers.key(3), "{not json")
    redis_server.command("SET", peers.key(4), json.dumps({"index": 4, "pad": "x" * MAX_SNAPSHOT_BYTES}))
    with caplog.at_level(logging.WARNING, logger="sn1_gateway.workers"), trio.fail_after(10):
        first = await peers.others()
        second = await peers.others()
    assert [r["index"] for r in first] == [2] and [r["index"] for r in second] == [2]
    assert peers.health()["bad_reports"] == 6  # 3 bad reports, read twice
    skipped = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert len(skipped) == 3 and any("nested" in line for line in skipped), skipped  # once per worker
