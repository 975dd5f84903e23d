"""`sn1-gateway keys ...` as an operator runs it, alone and next to a running gateway."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import httpx
import pytest
import trio

from actors.keystore import keyfile
from actors.keystore.records import key_id_of
from engine.cli import main
from engine.keys_commands import NoKeyGiven, read_ref
from tests.keys_support import ADMIN, cli, running_gateway, settings_in, wait_until, write_config


async def test_create_list_modify_delete_and_import(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    created = await cli("keys", "create", "--rate-limit", "25", "--config", config, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.decode().strip()
    assert key.startswith("sn1-") and len(key) == 36
    assert b"shown only now" in created.stderr
    text = (tmp_path / "keys.toml").read_text()
    assert key not in text and key_id_of(key) in text

    listed = await cli("keys", "list", "--config", config, cwd=tmp_path)
    assert listed.returncode == 0
    out = listed.stdout.decode()
    assert key_id_of(key) in out and key[:8] in out and key not in out and " 25 " in out

    modified = await cli("keys", "modify", key, "--rate-limit", "0", "--config", config, cwd=tmp_path)
    assert modified.returncode == 0 and b"0 requests/min" in modified.stdout
    assert keyfile.read(tmp_path / "keys.toml").keys[key_id_of(key)].rate_limit == 0

    legacy = tmp_path / "api_keys.json"
    legacy.write_text(json.dumps({"old-key-0123456789abcdef": {"rate_limit": 60, "usage": 17},
                                  "old-key-fedcba9876543210": {"rate_limit": 5, "usage": 0}}))
    imported = await cli("keys", "import", str(legacy), "--config", config, cwd=tmp_path)
    assert imported.returncode == 0 and b"imported 2 key(s); skipped 0" in imported.stdout
    again = await cli("keys", "import", str(legacy), "--config", config, cwd=tmp_path)
    assert b"imported 0 key(s); skipped 2" in again.stdout
    as_json = json.loads((await cli("keys", "list", "--json", "--config", config, cwd=tmp_path)).stdout)
    usage = {entry["id"]: (entry["rate_limit"], entry["usage"]["requests"]) for entry in as_json}
    assert usage == {key_id_of(key): (0, 0), key_id_of("old-key-0123456789abcdef"): (60, 17),
                     key_id_of("old-key-fedcba9876543210"): (5, 0)}
    assert "old-key-0123456789abcdef" not in (tmp_path / "keys.toml").read_text()

    # Delete by the id shown in `keys list`, and by the key itself.
    deleted = await cli("keys", "delete", key_id_of(key), "--config", config, cwd=tmp_path)
    assert deleted.returncode == 0 and b"deleted" in deleted.stdout
    deleted = await cli("keys", "delete", "old-key-fedcba9876543210", "--config", config, cwd=tmp_path)
    assert deleted.returncode == 0
    assert set(keyfile.read(tmp_path / "keys.toml").keys) == {key_id_of("old-key-0123456789abcdef")}


async def test_operator_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    for args, status, message in [
        (("keys", "create", "--rate-limit", "-1"), 2, b"expected 0 to"),
        (("keys", "create", "--rate-limit", "2.5"), 2, b"expected an integer"),
        (("keys", "modify", "sn1-nope", "--rate-limit", "3"), 1, b"error: no such API key"),
        (("keys", "delete", "sn1-nope"), 1, b"error: no such API key"),
        (("keys", "import", "missing.json"), 1, b"error:"),
    ]:
        result = await cli(*args, "--config", config, cwd=tmp_path)
        assert result.returncode == status, (args, result.stderr)
        assert message in result.stderr and b"Traceback" not in result.stderr

    (tmp_path / "api_keys.json").write_text('{"some-legacy-key": {"rate_limit": "many"}}')
    result = await cli("keys", "import", "api_keys.json", "--config", config, cwd=tmp_path)
    assert result.returncode == 1 and b"entry 1 (som...): rate_limit" in result.stderr
    assert b"some-legacy-key" not in result.stderr

    (tmp_path / "keys.toml").write_text("version = 1\nkeys = 3\n")
    for args in (("keys", "list"), ("serve",)):
        result = await cli(*args, "--config", config, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert b"keys.toml: keys: expected a table" in result.stderr and b"Traceback" not in result.stderr
    assert (tmp_path / "keys.toml").read_text() == "version = 1\nkeys = 3\n"


async def test_cli_changes_reach_a_running_gateway_without_a_restart(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    async with running_gateway(settings_in(tmp_path)) as (_, client):
        created = await cli("keys", "create", "--rate-limit", "3", "--config", config, cwd=tmp_path)
        key = created.stdout.decode().strip()

        async def whoami() -> httpx.Response:
            return await client.get("/api_management/whoami", headers={"api-key": key})

        async def accepted() -> bool:
            return (await whoami()).status_code == 200

        assert await wait_until(accepted) < 1.5
        # The gateway counts usage; a CLI change made meanwhile must not be lost to its flushes, nor
        # the gateway's counts to the CLI's write.
        assert (await whoami()).status_code == 200
        await cli("keys", "modify", key, "--rate-limit", "40", "--config", config, cwd=tmp_path)

        async def raised() -> bool:
            return (await whoami()).headers.get("X-RateLimit-Limit") == "40"

        assert await wait_until(raised) < 1.5

        async def saved() -> bool:
            info = keyfile.read(tmp_path / "keys.toml").keys[key_id_of(key)]
            return info.rate_limit == 40 and info.requests >= 2

        await wait_until(saved)
        admin_key = (await client.post("/create-api-key/", params={"rate_limit": 1}, headers=ADMIN)).json()
        listed = await cli("keys", "list", "--json", "--config", config, cwd=tmp_path)
        assert key_id_of(admin_key["api_key"]) in listed.stdout.decode()

        await cli("keys", "delete", key, "--config", config, cwd=tmp_path)

        async def revoked() -> bool:
            return (await whoami()).status_code == 401

        assert await wait_until(revoked) < 1.5
        with trio.fail_after(5):
            listing = (await client.get("/api_management/keys", headers=ADMIN)).json()["data"]
        assert [entry["id"] for entry in listing] == [key_id_of(admin_key["api_key"])]


async def test_a_key_given_as_dash_is_read_from_standard_input(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    keys = [(await cli("keys", "create", "--rate-limit", "5", "--config", config, cwd=tmp_path)).stdout.decode().strip()
            for _ in range(2)]
    modified = await cli("keys", "modify", "-", "--rate-limit", "77", "--config", config, cwd=tmp_path,
                         stdin=f"{keys[0]}\n".encode())
    assert modified.returncode == 0, modified.stderr
    assert b"77 requests/min" in modified.stdout and keys[0].encode() not in modified.stdout + modified.stderr
    assert keyfile.read(tmp_path / "keys.toml").keys[key_id_of(keys[0])].rate_limit == 77
    # An id works too, and only the first line is read.
    deleted = await cli("keys", "delete", "-", "--config", config, cwd=tmp_path,
                        stdin=f"  {key_id_of(keys[1])}  \r\n{keys[0]}\n".encode())
    assert deleted.returncode == 0, deleted.stderr
    assert set(keyfile.read(tmp_path / "keys.toml").keys) == {key_id_of(keys[0])}

    result = await cli("keys", "delete", "-", "--config", config, cwd=tmp_path, stdin=b"   \n")
    assert result.returncode == 1 and b"error: standard input held no key" in result.stderr
    assert set(keyfile.read(tmp_path / "keys.toml").keys) == {key_id_of(keys[0])}


def test_dash_is_documented_and_an_empty_standard_input_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for action in ("modify", "delete"):
        with pytest.raises(SystemExit):
            main(["keys", action, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "- reads it from standard input" in text and "process list" in text, action
    for given in ("", "\n", " \t \r\n", "x" * 5000 + "\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(given))
        with pytest.raises(NoKeyGiven):
            read_ref("-")
    monkeypatch.setattr(sys, "stdin", io.StringIO(" sn1-abc \nsecond\n"))
    assert read_ref("-") == "sn1-abc" and read_ref("sn1-given") == "sn1-given"
