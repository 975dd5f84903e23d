"""Failed authentications are throttled per client address: the throttle alone, then over real HTTP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import trio
import trio.testing

from actors.keystore.throttle import MAX_ADDRESSES, FailedAuthThrottle, address_key
from config.settings import Settings
from tests.keys_support import ADMIN, running_gateway, settings_in
from tests.metrics_support import scrape


async def test_an_address_is_refused_after_its_failures_and_recovers_at_the_configured_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    throttle = FailedAuthThrottle(30)
    assert [throttle.fail("192.0.2.1") for _ in range(30)] == [0] * 30
    assert throttle.fail("192.0.2.1") == 2  # the 31st within the minute: wait 60/30 s
    assert throttle.refusal("192.0.2.1") == 2 and throttle.fail("192.0.2.9") == 0  # others unaffected
    # Refused attempts are not counted: trying on does not get more through, nor lock out for longer.
    for _ in range(100):
        assert throttle.fail("192.0.2.1") > 0
    await trio.sleep(2)
    assert throttle.fail("192.0.2.1") == 0 and throttle.fail("192.0.2.1") == 2
    await trio.sleep(60)
    assert [throttle.fail("192.0.2.1") for _ in range(30)] == [0] * 30
    stats = throttle.statistics()
    assert (stats["failures"], stats["refused"], stats["episodes"]) == (62, 103, 2)

    off = FailedAuthThrottle(0)
    assert all(off.fail("192.0.2.1") == 0 for _ in range(1000)) and off.statistics()["addresses"] == 0


async def test_the_throttle_holds_at_most_its_bound_of_addresses(autojump_clock: trio.testing.MockClock) -> None:
    throttle = FailedAuthThrottle(1)
    for i in range(MAX_ADDRESSES + 1):
        throttle.fail(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    stats = throttle.statistics()
    assert (stats["addresses"], stats["evicted"]) == (MAX_ADDRESSES, 1)
    assert throttle.refusal("10.0.0.0") == 0, "the least recently failed address was forgotten"
    assert throttle.refusal("10.0.0.1") == 60


def test_ipv6_peers_count_by_their_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" == address_key("192.0.2.7")
    assert address_key(None) == "local"


def limited(tmp_path: Path, per_minute: int) -> Settings:
    settings = settings_in(tmp_path)
    return dataclasses.replace(settings, auth=dataclasses.replace(settings.auth, failed_auth_per_minute=per_minute))


def error_code(response: httpx.Response) -> object:
    return response.json()["error"]["code"]


async def test_repeated_401s_from_one_address_become_429_but_a_good_key_still_passes(tmp_path: Path) -> None:
    async with running_gateway(limited(tmp_path, 6)) as (gateway, client):
        key = (await client.post("/create-api-key/", params={"rate_limit": 100}, headers=ADMIN)).json()["api_key"]
        wrong = {"api-key": "sn1-wrong-key-000000000000000000000000"}
        for _ in range(5):
            response = await client.get("/api_management/whoami", headers=wrong)
            assert response.status_code == 401 and error_code(response) == "invalid_api_key"
        assert (await client.get("/v1/models")).status_code == 401  # a missing key counts too: the 6th
        for headers in (wrong, {}, {**wrong, "X-Forwarded-For": "203.0.113.9", "Remote-Addr": "203.0.113.9"}):
            response = await client.get("/api_management/whoami", headers=headers)
            assert response.status_code == 429, headers
            assert error_code(response) == "too_many_failed_auth"
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert 1 <= int(response.headers["Retry-After"]) <= 10
        chat = await client.post("/v1/chat/completions", headers=wrong, json={"messages": []})
        assert chat.status_code == 429 and error_code(chat) == "too_many_failed_auth"

        # The right key still passes, so a legitimate client sharing the address recovers at once.
        me = await client.get("/api_management/whoami", headers={"api-key": key})
        assert me.status_code == 200 and me.json()["prefix"] == key[:8]
        # The admin key is not even compared from a throttled address, right or wrong.
        for headers in ({"admin-key": "guess"}, ADMIN):
            response = await client.get("/api_management/keys", headers=headers)
            assert response.status_code == 429 and error_code(response) == "too_many_failed_auth"

        # Another address is not affected (the peer address, whatever headers claim).
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=gateway.url, transport=transport, timeout=20) as elsewhere:
            response = await elsewhere.get("/api_management/whoami",
                                           headers={**wrong, "X-Forwarded-For": "127.0.0.1"})
            assert response.status_code == 401
            assert (await elsewhere.get("/api_management/keys", headers=ADMIN)).status_code == 200

        stats = (await client.get("/health/ready")).json()["keys"]["failed_auth"]
        assert (stats["failures"], stats["episodes"], stats["addresses"]) == (7, 1, 2)
        assert stats["refused"] == 6
        metrics = scrape((await client.get("/metrics")).text)
        assert metrics.value("sn1_gateway_keys_failed_auth_refused_total") == 6


async def test_wrong_admin_keys_are_throttled_and_the_throttle_can_be_off(tmp_path: Path) -> None:
    (tmp_path / "on").mkdir()
    async with running_gateway(limited(tmp_path / "on", 3)) as (_, client):
        statuses = [(await client.post("/create-api-key/", params={"rate_limit": 1},
                                       headers={"admin-key": f"guess-{i}"})).status_code for i in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        response = await client.post("/create-api-key/", params={"rate_limit": 1}, headers=ADMIN)
        assert response.status_code == 429 and int(response.headers["Retry-After"]) <= 20

    (tmp_path / "off").mkdir()
    async with running_gateway(limited(tmp_path / "off", 0)) as (_, client):
        for i in range(40):
            assert (await client.get("/api_management/whoami", headers={"api-key": f"x{i}"})).status_code == 401
        assert (await client.get("/api_management/keys", headers={"admin-key": "guess"})).status_code == 401
        assert (await client.get("/api_management/keys", headers=ADMIN)).status_code == 200
