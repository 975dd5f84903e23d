"""The Redis key store against a real redis-server, and two gateway processes sharing it."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.keystore import KeyNotFound, KeyStoreError, KeyStoreUnavailable, LegacyKey
from actors.keystore.records import INT64_MAX, Denial, Grant, InvalidRateLimit, key_id_of
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
from tests.redis_server import RedisServer, free_port, start_redis, stop_redis


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


# -- usage counters against a real Redis: nothing a miner reports or Redis holds jams the flush ------------


async def test_a_batch_with_a_counter_that_would_overflow_counts_every_other_key_once(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with RedisKeyStore.connect(redis_url) as store:
        keys = [await store.create(10) for _ in range(4)]
        near, good, corrupt, big = (info for _, info in keys)
        redis_server.command("HSET", store._key(near.id), "tokens", str(INT64_MAX - 5))
        redis_server.command("HSET", store._key(corrupt.id), "tokens", "garbage")
        redis_server.command("HSET", store._key(big.id), "tokens", "9" * 25)
        for info in (near, good, corrupt, big):
            store.record_usage_nowait(info.id, tokens=10)
        store.record_usage_nowait(good.id, tokens=2**64 - 1)  # refused where it enters
        await store.flush()
        for _ in range(3):  # before: the script failed half-way and `good` was added again each time
            await store.flush()
        tokens = {info.id: (await store.info(info.id)).tokens for info in (near, good, corrupt, big)}  # type: ignore[union-attr]
        assert tokens == {near.id: INT64_MAX, good.id: 10, corrupt.id: 10, big.id: INT64_MAX}
        health = store.health()
        assert health["unflushed_usage_keys"] == 0 and health["usage_refused"] == 1
        assert health["counters_saturated"] == 1 and health["counters_repaired"] == 2
        # The totals Redis holds are what it can hold: its own HINCRBY still works on them.
        assert redis_server.command("HINCRBY", store._key(good.id), "tokens", "1").startswith(b":11")
        assert redis_server.command("HGET", store._key(big.id), "tokens") == f"$19\r\n{INT64_MAX}\r\n".encode()


async def test_a_flush_whose_reply_is_lost_is_not_added_twice(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RedisKeyStore.connect(redis_url) as store:
        _, info = await store.create(10)
        store.record_usage_nowait(info.id, tokens=40)
        real_run = store._run
        lost: list[object] = []

        async def reply_lost(script: Any, keys: list[str], args: list[Any]) -> Any:
            result = await real_run(script, keys, args)  # Redis did it...
            if script is store._add_tokens and not lost:
                lost.append(result)
                raise KeyStoreUnavailable("timed out")  # ...and the answer never arrived
            return result

        monkeypatch.setattr(store, "_run", reply_lost)
        with pytest.raises(KeyStoreUnavailable):
            await store.flush()
        store.record_usage_nowait(info.id, tokens=2)  # counted meanwhile: goes in the next batch
        await store.flush()  # the same batch again (already added, so skipped), then what came meanwhile
        assert (await store.info(info.id)).tokens == 42  # type: ignore[union-attr]
        assert store.health()["unflushed_usage_keys"] == 0


async def test_corrupt_counters_and_limits_in_redis_are_survived(redis_server: RedisServer, redis_url: str) -> None:
    async with RedisKeyStore.connect(redis_url) as store:
        key, info = await store.create(10)
        redis_server.command("HSET", store._key(info.id), "requests", "lots", "tokens", "-4")
        assert isinstance(await store.check(key), Grant)  # before: HINCRBY failed, every request a 503
        listed = await store.list_keys()  # before: int("lots") raised
        assert [(i.requests, i.tokens) for i in listed] == [(1, 0)]
        assert store.health()["counters_repaired"] >= 2

        redis_server.command("HSET", store._key(info.id), "requests", str(INT64_MAX))
        assert isinstance(await store.check(key), Grant)  # before: HINCRBY overflowed
        assert (await store.info(info.id)).requests == INT64_MAX  # type: ignore[union-attr]
        assert store.health()["counters_saturated"] == 1

        redis_server.command("HSET", store._key(info.id), "rate_limit", "ten")
        with pytest.raises(KeyStoreUnavailable, match="rate_limit"):
            await store.check(key)
        assert (await store.info(info.id)) is not None  # listing still works


# -- a changed limit applies at once, atomically, wherever the change was made ------------------------------


async def burst(store: RedisKeyStore, key: str) -> int:
    passed = 0
    while isinstance(await store.check(key), Grant):
        passed += 1
    return passed


async def test_a_limit_changed_by_another_process_rescales_the_shared_bucket(redis_url: str) -> None:
    async with RedisKeyStore.connect(redis_url) as serving, RedisKeyStore.connect(redis_url) as admin:
        key, _ = await serving.create(5)
        assert await burst(serving, key) == 5
        await admin.modify(key, 10)  # used 5 of 5, raised to 10: 5 more at once
        grant = await serving.check(key)
        assert isinstance(grant, Grant) and (grant.limit, grant.remaining) == (10, 4)
        assert await burst(admin, key) == 4  # the other process shares the same bucket

        lowered, _ = await serving.create(10)
        for _ in range(3):
            assert isinstance(await serving.check(lowered), Grant)
        await admin.modify(lowered, 5)  # used 3, lowered to 5: 2 more
        assert await burst(serving, lowered) == 2

        deep, _ = await serving.create(100)
        for _ in range(7):
            assert isinstance(await admin.check(deep), Grant)
        await admin.modify(deep, 5)  # used 7 of a new 5: none until one is back (12 s)
        denial = await serving.check(deep)
        assert isinstance(denial, Denial) and (denial.limit, denial.retry_after_s) == (5, 12)

        await admin.modify(key, 0)  # blocked, then unblocked: what was used stays used
        assert (await serving.check(key)) == Denial("blocked", retry_after_s=60)
        await admin.modify(key, 12)
        assert await burst(serving, key) == 2


# -- listing every key costs a few round trips, not one per key -------------------------------------------


async def counting_proxy(nursery: trio.Nursery, port: int, writes: list[int]) -> int:
    """A loopback TCP proxy to 127.0.0.1:`port`; each read of what a client sends is counted in `writes`."""

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream, counted: bool) -> None:
        async with sink:
            while data := await source.receive_some(65536):
                if counted:
                    writes.append(len(data))
                await sink.send_all(data)

    async def handle(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", port) as server, trio.open_nursery() as both:
            both.start_soon(pipe, client, server, True)
            both.start_soon(pipe, server, client, False)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_listing_1200_keys_takes_a_few_round_trips(
        redis_server: RedisServer, redis_url: str, nursery: trio.Nursery) -> None:
    async with RedisKeyStore.connect(redis_url) as direct:
        created = [(await direct.create(7))[1] for _ in range(1200)]
    writes: list[int] = []
    port = await counting_proxy(nursery, redis_server.port, writes)
    with trio.fail_after(20):
        async with RedisKeyStore.connect(f"redis://127.0.0.1:{port}/0") as store:
            before = len(writes)
            listed = await store.list_keys()
            sent = len(writes) - before
    assert sorted(i.id for i in listed) == sorted(i.id for i in created)
    assert all(i.rate_limit == 7 for i in listed)
    assert sent <= 12, sent  # before: one request per key, 1201 round trips
