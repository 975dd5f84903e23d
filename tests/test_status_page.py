"""`GET /status` (the page) and `GET /status/data` (what it shows, behind the admin key) over a devnet."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import httpx
import trio

from actors.keystore.records import display_prefix
from tests import devnet_stack
from tests.observe_support import ADMIN_KEY, start

CHAT = "/v1/chat/completions"


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_the_page_loads_without_a_key_and_can_load_nothing_from_elsewhere(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start(nursery, tmp_path, miners=1)
        response = await net.admin.get("/status")
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    html = response.text
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert "status/data" in script and "sessionStorage" in script and "admin-key" in script
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == csp_hash(script)  # the page's own script, and no other
    assert policy["style-src"] == csp_hash(style)
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "data:"
    # Every reference is to the page itself (a data: icon): no CDN, no other origin.
    assert re.findall(r'(?:src|href)="([^"]*)"', html) == ["data:,"]
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) == {"http://www.w3.org/2000/svg"}
    assert ADMIN_KEY not in html
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_the_data_needs_the_admin_key(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        on = await start(nursery, tmp_path / "on", miners=1)
        missing = await on.admin.get("/status/data")
        wrong = await on.admin.get("/status/data", headers={"admin-key": ADMIN_KEY + "x"})
        right = await on.admin.get("/status/data", headers={"admin-key": ADMIN_KEY})
        off = await start(nursery, tmp_path / "off", admin_key="", miners=1)
        disabled = await off.admin.get("/status/data", headers={"admin-key": "anything"})
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "invalid_admin_key")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_admin_key")
    assert right.status_code == 200 and right.headers["cache-control"] == "no-store"
    assert (disabled.status_code, disabled.json()["error"]["code"]) == (403, "admin_disabled")


async def test_the_data_shows_miners_requests_scoring_keys_and_actors(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        net = await start(nursery, tmp_path, miners=3, faults=("", "", "http_500"))
        devnet, gateway, client = net.devnet, net.gateway, net.admin
        await gateway.services.keys.delete(net.key)
        busy, _ = await gateway.services.keys.create(1000)
        idle, _ = await gateway.services.keys.create(5)
        user = httpx.AsyncClient(base_url=gateway.url, headers={"api-key": busy}, timeout=30)
        for i in range(4):
            await devnet_stack.stream_chat(user, f"question {i}")
        await gateway.services.fanout.wait_idle()
        with trio.fail_after(10):
            while gateway.services.readiness()["scoring"]["delivered"] < 4:  # noqa: ASYNC110 - a figure
                await trio.sleep(0.05)
        await trio.sleep_until(trio.current_time() // 1 + 1.01)  # the requests' second is completed
        response = await client.get("/status/data", headers={"admin-key": ADMIN_KEY})
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    assert busy not in response.text and idle not in response.text and ADMIN_KEY not in response.text
    assert data["ready"] is True and data["draining"] is False and data["hotkey"] == devnet.gateway_hotkey

    hotkeys = {m.uid: m.hotkey for m in devnet.miners}
    miners = {m["uid"]: m for m in data["miners"]}
    assert sorted(miners) == [0, 1, 2]  # one row per miner, not the validator nor the gateway
    assert {uid: m["hotkey"] for uid, m in miners.items()} == hotkeys
    assert miners[0]["hotkey_short"] == f"{hotkeys[0][:6]}…{hotkeys[0][-4:]}"
    assert miners[0]["breaker"] == "closed" and miners[0]["requests"] == 4 and miners[0]["ttft_s"] > 0.01
    failing = miners[2]
    assert failing["breaker"] == "open" and failing["requests"] == failing["failures"] == 3
    assert failing["last_error"] == "HTTP 500" and failing["failure_rate"] > 0.4 and failing["ttft_s"] is None

    assert data["requests"]["total"] >= 4 and data["requests"]["errors"] == 0
    points = data["chart"]["points"]
    assert data["chart"]["step_s"] == 5 and len(points) >= 60
    busiest = max(points, key=lambda p: p["requests_per_s"])
    assert busiest["requests_per_s"] > 0 and busiest["ttft_p50_s"] >= 0.01
    assert busiest["ttft_p50_s"] <= busiest["ttft_p99_s"] < 5

    scoring = data["scoring"]
    assert (scoring["enabled"], scoring["delivered"], scoring["refused"], scoring["dropped_total"]) == (True, 4, 0, 0)
    (validator,) = scoring["validators"]
    assert validator["hotkey"] == devnet.validator.hotkey and validator["delivered"] == 4
    assert validator["refused_signer"] is False and validator["hint"] is None

    keys = data["keys"]
    assert keys["count"] == 2 and keys["error"] is None
    assert [k["prefix"] for k in keys["top"]] == [display_prefix(busy), display_prefix(idle)]
    assert keys["top"][0]["requests"] == 4 and keys["top"][1]["requests"] == 0
    actors = {a["name"]: a for a in data["actors"]}
    assert set(actors) == {"keys", "subnet", "availability", "scoring", "fanout", "jobs"}
    assert all(a["status"] == "running" and a["restarts"] == 0 for a in actors.values())


async def test_a_validator_refusing_the_gateways_hotkey_comes_with_the_api_hotkey_fix(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        net = await start(nursery, tmp_path, miners=1, validator_fault="refuse_signer")
        devnet, gateway, client = net.devnet, net.gateway, net.admin
        answered = await net.client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
        assert answered.status_code == 200
        with trio.fail_after(10):
            while not gateway.services.readiness()["scoring"]["validators_refusing_signer"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        data = (await client.get("/status/data", headers={"admin-key": ADMIN_KEY})).json()
    scoring = data["scoring"]
    assert scoring["refused"] == 1 and scoring["delivered"] == 0
    (validator,) = scoring["validators"]
    assert validator["refused_signer"] is True
    assert f"set API_HOTKEY={devnet.gateway_hotkey}" in validator["hint"]
    assert any("API_HOTKEY" in w for w in scoring["warnings"])
    assert scoring["spool_pending"] + scoring["queued"] + scoring["in_flight"] >= 1  # waiting, not lost
