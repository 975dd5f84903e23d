"""The Redis key store against a real redis-server, and two gateway processes sharing it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from actors.keystore import KeyNotFound, KeyStoreError, LegacyKey
from actors.keystore.records import Denial, Grant, InvalidRateLimit, key_id_of
from actors.keystore.redisstore import RedisKeyStore
from tests.keys_support import (
    ADMIN,
    cli,
    running_gateway,
    serve_process,
    settings_in,
    wait_until,
    write_config,
)
from tests.redis_server import free_port, redis_server, redis_url, start_redis, stop_redis

__all__ = ["redis_server", "redis_url"]  # fixtures


async def test_create_check_modify_delete(redis_url: str) -> None:
    async with RedisKeyStore.connect(redis_url) as store:
        key, info = await store.create(3)
        assert info.id == key_id_of(key)
        grant = await store.check(key)
        assert isinstance(grant, Grant) and (grant.limit, grant.remaining, grant.prefix) == (3, 2, key[:8])
        assert grant.headers == {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2",
                                 "X-RateLimit-Reset": "20"}
        store.record_usage_nowait(info.id, tokens=40)
        await store.flush()
        saved = await store.info(info.id)
        assert saved is not None and (saved.requests, saved.tokens, saved.rate_limit) == (1, 40, 3)
        assert saved.last_used_at is not None

        assert (await store.modify(key, 0)).rate_limit == 0
        blocked = await store.check(key)
        assert isinstance(blocked, Denial) and blocked.reason == "blocked"
        with pytest.raises(InvalidRateLimit):
            await store.modify(key, -1)

        assert [i.id for i in await store.list_keys()] == [info.id]
        await store.delete(info.id)
        assert await store.check(key) == Denial("unknown")
        assert await store.list_keys() == []
        with pytest.raises(KeyNotFound):
            await store.delete(key)
        with pytest.raises(KeyNotFound):
            await store.modify(key, 5)
        # Usage for a deleted key does not bring it back.
        store.record_usage_nowait(info.id, tokens=5)
        await store.flush()
        assert await store.info(info.id) is None


async def test_the_largest_limit_keeps_exact_integer_arithmetic_in_lua(redis_url: str) -> None:
    async with RedisKeyStore.connect(redis_url) as store:
        key, _ = await store.create(1_000_000)
        grant = await store.check(key)
        assert isinstance(grant, Grant) and grant.remaining == 999_999


async def test_200_concurrent_checks_pass_exactly_the_limit(redis_url: str) -> None:
    async with RedisKeyStore.connect(redis_url) as store:
        key, _ = await store.create(12)
        results: list[Grant | Denial] = []

        async def one() -> None:
            results.append(await store.check(key))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(one)
        grants = [r for r in results if isinstance(r, Grant)]
        assert len(grants) == 12 and sorted(g.remaining for g in grants) == list(range(12))
        denials = [r for r in results if isinstance(r, Denial)]
        assert {d.reason for d in denials} == {"rate_limited"}
        assert all(1 <= d.retry_after_s <= 5 for d in denials)
        info = await store.info(key_id_of(key))
        assert info is not None and info.requests == 12


async def test_import_keeps_existing_keys(redis_url: str) -> None:
    async with RedisKeyStore.connect(redis_url) as store:
        entries = [LegacyKey("legacy-key-aaaaaaaaaaaa", 7, 70), LegacyKey("legacy-key-bbbbbbbbbbbb", 0, 0)]
        report = await store.import_keys(entries)
        assert (report.added, report.skipped) == (2, 0)
        await store.modify("legacy-key-aaaaaaaaaaaa", 9)
        assert (await store.import_keys(entries)).skipped == 2
        info = await store.info(key_id_of("legacy-key-aaaaaaaaaaaa"))
        assert info is not None and (info.rate_limit, info.requests) == (9, 70)


async def test_an_unreachable_redis_is_a_clear_error_at_start(tmp_path: Path) -> None:
    dead = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(KeyStoreError, match="cannot reach Redis") as caught:
        async with RedisKeyStore.connect(dead, timeout_s=1.0):
            pytest.fail("connected to nothing")
    assert "s3cret" not in str(caught.value)

    config = write_config(tmp_path, store="redis", redis_url=dead)
    result = await cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1 and b"error: auth.redis_url: cannot reach Redis" in result.stderr
    assert b"s3cret" not in result.stderr and b"Traceback" not in result.stderr


async def test_a_redis_outage_is_a_503_and_service_resumes_when_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = await trio.to_thread.run_sync(start_redis, port)
    try:
        async with running_gateway(settings_in(tmp_path, store="redis", redis_url=url)) as (_, client):
            key = (await client.post("/create-api-key/", params={"rate_limit": 5}, headers=ADMIN)).json()["api_key"]
            assert (await client.get("/api_management/whoami", headers={"api-key": key})).status_code == 200

            await trio.to_thread.run_sync(stop_redis, proc)
            down = await client.get("/api_management/whoami", headers={"api-key": key})
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "key_store_unavailable" and key not in down.text
            failed = await client.post("/create-api-key/", params={"rate_limit": 5}, headers=ADMIN)
            assert failed.status_code == 503

            proc = await trio.to_thread.run_sync(start_redis, port)  # a fresh, empty Redis

            async def serving() -> bool:
                response = await client.get("/api_management/whoami", headers={"api-key": key})
                return response.status_code == 401

            await wait_until(serving)
            health = (await client.get("/health/ready")).json()["keys"]
            assert health["failures"] >= 2 and health["url"] == url
    finally:
        await trio.to_thread.run_sync(stop_redis, proc)


async def test_two_gateway_processes_share_one_limit_and_see_a_revocation_at_once(
    redis_url: str, tmp_path: Path
) -> None:
    folders = [tmp_path / "a", tmp_path / "b"]
    configs = []
    for folder in folders:
        folder.mkdir()
        configs.append(write_config(folder, store="redis", redis_url=redis_url))
    with trio.fail_after(90):
        async with (
            serve_process(configs[0]) as url_a,
            serve_process(configs[1]) as url_b,
            httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=300)) as client,
        ):
            assert url_a != url_b
            created = await client.post(f"{url_a}/api_management/create-api-key/", params={"rate_limit": 10},
                                        headers=ADMIN)
            key = created.json()["api_key"]
            statuses: list[int] = []

            async def one(url: str) -> None:
                response = await client.get(f"{url}/api_management/whoami", headers={"api-key": key})
                statuses.append(response.status_code)

            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(one, url_a if i % 2 else url_b)
            assert statuses.count(200) == 10 and statuses.count(429) == 50

            # A key created on one process works on the other; deleted on the first, the second
            # refuses it on the very next request.
            other = (await client.post(f"{url_b}/create-api-key/", params={"rate_limit": 100},
                                       headers=ADMIN)).json()["api_key"]
            assert (await client.get(f"{url_a}/api_management/whoami", headers={"api-key": other})).status_code == 200
            deleted = await client.delete(f"{url_b}/api_management/delete-api-key/{other}", headers=ADMIN)
            assert deleted.status_code == 200
            start = trio.current_time()

            async def refused() -> bool:
                response = await client.get(f"{url_a}/api_management/whoami", headers={"api-key": other})
                return response.status_code == 401

            await wait_until(refused)
            assert trio.current_time() - start < 1.0

            # The CLI works on the same store while both serve.
            config = str(configs[0])
            result = await cli("keys", "modify", key, "--rate-limit", "1000", "--config", config, cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            response = await client.get(f"{url_b}/api_management/whoami", headers={"api-key": key})
            assert response.headers["X-RateLimit-Limit"] == "1000"
            listed = json.loads((await cli("keys", "list", "--json", "--config", config, cwd=tmp_path)).stdout)
            assert [entry["id"] for entry in listed] == [key_id_of(key)]
            assert listed[0]["usage"]["requests"] == 11


async def test_a_redis_url_that_is_not_one_is_refused() -> None:
    for url in ("http://127.0.0.1:6379/0", "redis://", "127.0.0.1:6379", "redis://h:port/0"):
        with pytest.raises(KeyStoreError, match=r"auth\.redis_url"):
            async with RedisKeyStore.connect(url):
                pytest.fail(f"accepted {url}")
