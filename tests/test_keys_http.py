"""API keys over HTTP, against a real gateway on 127.0.0.1: admin endpoints, client auth, rate limits."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import httpx
import pytest
import trio

from actors.keystore import keyfile
from actors.keystore.records import key_id_of
from tests.keys_support import ADMIN, running_gateway, settings_in, wait_until


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return dict(body["error"])


@pytest.mark.parametrize("prefix", ["/api_management", ""])
async def test_create_modify_delete_as_in_the_seed_document(tmp_path: Path, prefix: str) -> None:
    settings = settings_in(tmp_path)
    async with running_gateway(settings) as (_, client):
        created = await client.post(f"{prefix}/create-api-key/", params={"rate_limit": 5}, headers=ADMIN)
        assert created.status_code == 200
        body = created.json()
        assert body["message"] == "API key created" and set(body) == {"message", "api_key"}
        key = body["api_key"]
        assert key.startswith("sn1-") and len(key) == 36
        # The trailing slash is optional, and there is no redirect.
        again = await client.post(f"{prefix}/create-api-key", params={"rate_limit": 1}, headers=ADMIN)
        assert again.status_code == 200

        text = (tmp_path / "keys.toml").read_text()
        assert key not in text and key_id_of(key) in text

        me = await client.get("/api_management/whoami", headers={"api-key": key})
        assert me.status_code == 200 and me.json()["rate_limit"] == 5

        modified = await client.put(f"{prefix}/modify-api-key/{key}", params={"rate_limit": 9}, headers=ADMIN)
        assert modified.status_code == 200
        assert modified.json() == {"message": "API key updated", "api_key": key}
        me = await client.get("/api_management/whoami", headers={"api-key": key})
        assert me.json()["rate_limit"] == 9 and me.headers["X-RateLimit-Limit"] == "9"
        assert keyfile.read(tmp_path / "keys.toml").keys[key_id_of(key)].rate_limit == 9

        deleted = await client.delete(f"{prefix}/delete-api-key/{key}", headers=ADMIN)
        assert deleted.status_code == 200 and deleted.json() == {"message": "API key deleted"}
        gone = await client.get("/api_management/whoami", headers={"api-key": key})
        assert gone.status_code == 401 and error_of(gone)["code"] == "invalid_api_key"
        assert key_id_of(key) not in keyfile.read(tmp_path / "keys.toml").keys

        for response in (
            await client.put(f"{prefix}/modify-api-key/{key}", params={"rate_limit": 1}, headers=ADMIN),
            await client.delete(f"{prefix}/delete-api-key/{key}", headers=ADMIN),
        ):
            assert response.status_code == 404 and error_of(response)["type"] == "not_found_error"


async def test_bad_rate_limits_are_400_and_name_the_parameter(tmp_path: Path) -> None:
    async with running_gateway(settings_in(tmp_path)) as (_, client):
        for bad in ("-1", "1.5", "ten", "", "99999999999"):
            response = await client.post("/api_management/create-api-key/", params={"rate_limit": bad},
                                         headers=ADMIN)
            assert response.status_code == 400, bad
            assert error_of(response)["param"] == "rate_limit"
        missing = await client.post("/api_management/create-api-key/", headers=ADMIN)
        assert missing.status_code == 400
        key = (await client.post("/create-api-key/", params={"rate_limit": 2}, headers=ADMIN)).json()["api_key"]
        response = await client.put(f"/modify-api-key/{key}", params={"rate_limit": "-5"}, headers=ADMIN)
        assert response.status_code == 400
        assert (await client.get("/api_management/keys", headers=ADMIN)).json()["data"][0]["rate_limit"] == 2


async def test_admin_key_checks(tmp_path: Path) -> None:
    async with running_gateway(settings_in(tmp_path)) as (_, client):
        for headers in ({}, {"admin-key": "wrong"}, {"admin-key": ""}, {"api-key": ADMIN["admin-key"]}):
            response = await client.post("/api_management/create-api-key/", params={"rate_limit": 1},
                                         headers=headers)
            assert response.status_code == 401 and error_of(response)["code"] == "invalid_admin_key"
            listing = await client.get("/api_management/keys", headers=headers)
            assert listing.status_code == 401
        assert keyfile.read(tmp_path / "keys.toml").keys == {}

    (tmp_path / "off").mkdir()
    enabled = settings_in(tmp_path / "off")
    disabled = dataclasses.replace(enabled, auth=dataclasses.replace(enabled.auth, admin_key=""))
    async with running_gateway(disabled) as (_, client):
        for headers in ({}, {"admin-key": ""}, {"admin-key": "anything"}):
            response = await client.post("/create-api-key/", params={"rate_limit": 1}, headers=headers)
            assert response.status_code == 403 and error_of(response)["type"] == "permission_error"
        assert (await client.delete("/delete-api-key/sn1-x", headers={"admin-key": ""})).status_code == 403


async def test_listing_shows_prefix_limit_and_usage_but_never_a_key(tmp_path: Path) -> None:
    async with running_gateway(settings_in(tmp_path)) as (_, client):
        keys = [
            (await client.post("/create-api-key/", params={"rate_limit": n}, headers=ADMIN)).json()["api_key"]
            for n in (3, 0)
        ]
        for _ in range(2):
            assert (await client.get("/api_management/whoami", headers={"api-key": keys[0]})).status_code == 200
        listing = await client.get("/api_management/keys", headers=ADMIN)
        assert listing.status_code == 200
        assert all(key not in listing.text for key in keys)
        data = listing.json()["data"]
        assert [(d["prefix"], d["rate_limit"], d["usage"]["requests"]) for d in data] == [
            (keys[0][:8], 3, 2), (keys[1][:8], 0, 0)]
        assert data[0]["id"] == key_id_of(keys[0]) and data[0]["last_used_at"]


async def test_client_auth_header_forms_and_failures(tmp_path: Path) -> None:
    async with running_gateway(settings_in(tmp_path)) as (_, client):
        key = (await client.post("/create-api-key/", params={"rate_limit": 50}, headers=ADMIN)).json()["api_key"]
        for headers in ({"api-key": key}, {"Authorization": f"Bearer {key}"}, {"authorization": f"bearer  {key}"}):
            response = await client.get("/api_management/whoami", headers=headers)
            assert response.status_code == 200, headers
            assert response.json()["prefix"] == key[:8] and key not in response.text

        missing = await client.get("/api_management/whoami")
        assert missing.status_code == 401 and error_of(missing)["code"] == "missing_api_key"
        for headers in ({"api-key": key + "x"}, {"Authorization": f"Basic {key}"}, {"Authorization": "Bearer"}):
            response = await client.get("/api_management/whoami", headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["type"] == "authentication_error"
            assert key not in response.text

        blocked = (await client.post("/create-api-key/", params={"rate_limit": 0}, headers=ADMIN)).json()["api_key"]
        response = await client.get("/api_management/whoami", headers={"api-key": blocked})
        assert response.status_code == 429 and error_of(response)["code"] == "key_blocked"


async def test_200_concurrent_requests_against_limit_n_exactly_n_pass(tmp_path: Path) -> None:
    limit = 10  # one request every 6 s after the burst: far longer than the burst takes
    async with running_gateway(settings_in(tmp_path)) as (_, client):
        key = (await client.post("/create-api-key/", params={"rate_limit": limit}, headers=ADMIN)).json()["api_key"]
        responses: list[httpx.Response] = []

        async def one() -> None:
            responses.append(await client.get("/api_management/whoami", headers={"api-key": key}))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(one)

        ok = [r for r in responses if r.status_code == 200]
        limited = [r for r in responses if r.status_code == 429]
        assert len(ok) == limit and len(limited) == 200 - limit
        assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in ok) == list(range(limit))
        for r in ok:
            assert r.headers["X-RateLimit-Limit"] == str(limit) and int(r.headers["X-RateLimit-Reset"]) > 0
        for r in limited:
            assert error_of(r)["type"] == "rate_limit_error"
            assert 1 <= int(r.headers["Retry-After"]) <= 6
            assert r.headers["X-RateLimit-Remaining"] == "0" and r.headers["X-RateLimit-Limit"] == str(limit)

        # Usage counts only what was let through, and is persisted.
        async def persisted() -> bool:
            return keyfile.read(tmp_path / "keys.toml").keys[key_id_of(key)].requests == limit

        await wait_until(persisted)


async def test_a_corrupt_keys_file_stops_the_gateway_at_start(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text("[keys\n")
    from actors.keystore import KeyStoreError

    with pytest.RaisesGroup(KeyStoreError, flatten_subgroups=True, allow_unwrapped=True):
        async with running_gateway(settings_in(tmp_path)):
            pytest.fail("the gateway started on a corrupt keys file")
    assert (tmp_path / "keys.toml").read_text() == "[keys\n"


async def test_usage_is_saved_when_the_gateway_stops(tmp_path: Path) -> None:
    async with running_gateway(settings_in(tmp_path)) as (gateway, client):
        key = (await client.post("/create-api-key/", params={"rate_limit": 50}, headers=ADMIN)).json()["api_key"]
        for _ in range(3):
            assert (await client.get("/api_management/whoami", headers={"Authorization": f"Bearer {key}"})
                    ).status_code == 200
        gateway.services.keys.record_usage_nowait(key_id_of(key), tokens=123)
    saved = keyfile.read(tmp_path / "keys.toml").keys[key_id_of(key)]
    assert (saved.requests, saved.tokens) == (3, 123)


async def test_no_key_ever_appears_in_a_log_record_or_an_error_body(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_key = "sn1-WRONGwrongWRONGwrong-distinctive0"
    wrong_admin = "admin-GUESS-distinctive-0123456789"
    settings = settings_in(tmp_path)
    settings = dataclasses.replace(settings, auth=dataclasses.replace(settings.auth, failed_auth_per_minute=20))
    caplog.set_level(logging.DEBUG)
    errors: list[httpx.Response] = []
    async with running_gateway(settings) as (_, client):
        key = (await client.post("/create-api-key/", params={"rate_limit": 50}, headers=ADMIN)).json()["api_key"]
        secrets = (key, wrong_key, wrong_admin, ADMIN["admin-key"])

        async def call(method: str, path: str, **kw: object) -> httpx.Response:
            response = await client.request(method, path, **kw)  # type: ignore[arg-type]
            if response.status_code >= 400:
                errors.append(response)
            return response

        for headers in ({"api-key": key}, {"Authorization": f"Bearer {key}"}, {"api-key": wrong_key},
                        {"Authorization": f"Bearer {wrong_key}"}):
            await call("GET", "/api_management/whoami", headers=headers)
            await call("GET", "/v1/models", headers=headers)
            await call("POST", "/v1/chat/completions", headers=headers, json={"messages": [{"role": "user",
                                                                                             "content": "hi"}]})
            await call("POST", "/v1/chat/completions", headers=headers, content=b"{not json")
        for prefix in ("/api_management", ""):
            for ref in (key, wrong_key):
                await call("PUT", f"{prefix}/modify-api-key/{ref}", params={"rate_limit": "x"}, headers=ADMIN)
                await call("PUT", f"{prefix}/modify-api-key/{ref}", params={"rate_limit": 9},
                           headers={"admin-key": wrong_admin})
                await call("GET", f"{prefix}/modify-api-key/{ref}", headers=ADMIN)
                await call("DELETE", f"{prefix}/delete-api-key/{ref}", headers={"admin-key": wrong_admin})
            assert (await call("PUT", f"{prefix}/modify-api-key/{key}", params={"rate_limit": 9},
                               headers=ADMIN)).status_code == 200
            assert (await call("PUT", f"{prefix}/modify-api-key/{wrong_key}", params={"rate_limit": 9},
                               headers=ADMIN)).status_code == 404
        await call("GET", "/api_management/keys", headers={"admin-key": wrong_admin})
        assert (await call("DELETE", f"/delete-api-key/{key}", headers=ADMIN)).status_code == 200
        await call("GET", "/api_management/whoami", headers={"api-key": key})
        for _ in range(10):  # into the failed-auth throttle, whose log line names the address only
            await call("GET", "/api_management/whoami", headers={"api-key": wrong_key})
            await call("DELETE", f"/delete-api-key/{key}", headers=ADMIN)

    assert {r.status_code for r in errors} >= {400, 401, 404, 405, 429}
    for response in errors:
        assert not any(secret in response.text for secret in secrets), (response.status_code, response.text)
    # httpx and httpcore are this test's own client, which logs the URLs it asks for.
    records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name == "sn1_gateway.keys" for r in records)
    for record in records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert not any(secret in text for secret in secrets), (record.name, text)
