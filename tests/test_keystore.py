"""The key store's file backend and the rate limiter: exact limits, hashed storage, crash safety."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

import wire.files
from actors.keystore import (
    FileKeyStore,
    KeyNotFound,
    KeyStoreError,
    KeyStoreUnavailable,
    LegacyKey,
    keyfile,
    limiter,
)
from actors.keystore.legacy import LegacyFormatError, parse_legacy_keys
from actors.keystore.records import (
    INT64_MAX,
    MAX_TOKENS_PER_REQUEST,
    Denial,
    Grant,
    InvalidRateLimit,
    display_prefix,
    key_id_of,
)
from config.settings import Settings
from tests.keys_support import wait_until

ROOT = Path(__file__).resolve().parent.parent


# -- the limiter --------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3, 7, 10, 59, 60, 61, 199, 997, 1000, 100_003])
def test_a_burst_against_a_fresh_key_lets_exactly_the_limit_through(limit: int) -> None:
    level: int | None = None
    passed = 0
    for _ in range(limit + 5):
        outcome = limiter.take(level, 1_000, limit, 1_000)
        if outcome.allowed:
            level = outcome.level
            passed += 1
    assert passed == limit


def test_the_bucket_refills_at_the_limit_per_minute() -> None:
    # 6/min: after the burst, one more every 10 s, never early.
    first = limiter.take(None, 0, 6, 0)
    level = first.level
    for _ in range(5):
        level = limiter.take(level, 0, 6, 0).level
    denied = limiter.take(level, 0, 6, 9_999)
    assert not denied.allowed and denied.retry_after_ms == 1
    allowed = limiter.take(level, 0, 6, 10_000)
    assert allowed.allowed and allowed.remaining == 0
    # After a full idle minute the whole limit is back, not more.
    rested = limiter.take(level, 0, 6, 3_600_000)
    assert rested.allowed and rested.remaining == 5 and rested.reset_ms == 10_000


# -- the in-memory store (the same code as the file store, without the file) ---------------------------


async def test_200_concurrent_checks_on_a_key_with_limit_n_pass_exactly_n(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FileKeyStore()
    key, _ = await store.create(37)
    results: list[Grant | Denial] = []

    async def one() -> None:
        await trio.lowlevel.checkpoint()
        results.append(await store.check(key))

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(one)
    grants = [r for r in results if isinstance(r, Grant)]
    denials = [r for r in results if isinstance(r, Denial)]
    assert len(grants) == 37
    assert sorted(g.remaining for g in grants) == list(range(37))
    assert {d.reason for d in denials} == {"rate_limited"} and len(denials) == 163
    assert all(d.retry_after_s >= 1 for d in denials)
    # Sixty seconds later the whole limit is available again.
    await trio.sleep(60)
    assert isinstance(await store.check(key), Grant)
    assert (await store.info(key_id_of(key))).requests == 38  # type: ignore[union-attr]


async def test_unknown_blocked_and_revoked_keys_are_denied(autojump_clock: trio.testing.MockClock) -> None:
    store = FileKeyStore()
    assert await store.check("sn1-nope") == Denial("unknown")
    blocked, _ = await store.create(0)
    verdict = await store.check(blocked)
    assert isinstance(verdict, Denial) and verdict.reason == "blocked"
    key, info = await store.create(5)
    assert isinstance(await store.check(key), Grant)
    await store.delete(info.id)  # by id
    assert await store.check(key) == Denial("unknown")
    with pytest.raises(KeyNotFound):
        await store.delete(key)


async def test_rate_limit_must_be_a_non_negative_integer() -> None:
    store = FileKeyStore()
    for bad in (-1, 1.5, "10", True, 10**9):
        with pytest.raises(InvalidRateLimit):
            await store.create(bad)  # type: ignore[arg-type]
    key, _ = await store.create(1)
    with pytest.raises(InvalidRateLimit):
        await store.modify(key, -3)


async def burst(store: FileKeyStore, key: str) -> int:
    """How many requests pass at once, right now."""
    passed = 0
    while isinstance(await store.check(key), Grant):
        passed += 1
    return passed


async def test_a_raised_limit_gives_the_headroom_at_once(autojump_clock: trio.testing.MockClock) -> None:
    store = FileKeyStore()
    key, _ = await store.create(5)
    assert await burst(store, key) == 5
    await store.modify(key, 10)
    # Used 5 of 5, raised to 10: 5 more at once, not a wait for the old budget to drain.
    grant = await store.check(key)
    assert isinstance(grant, Grant) and (grant.limit, grant.remaining) == (10, 4)
    assert await burst(store, key) == 4
    denial = await store.check(key)
    assert isinstance(denial, Denial) and denial.limit == 10 and denial.retry_after_s == 6


async def test_a_lowered_limit_never_lets_more_than_it_through(autojump_clock: trio.testing.MockClock) -> None:
    store = FileKeyStore()
    key, _ = await store.create(10)
    for _ in range(3):
        assert isinstance(await store.check(key), Grant)
    await store.modify(key, 5)
    assert await burst(store, key) == 2  # used 3, the new limit 5: 2 more

    other, _ = await store.create(100)
    for _ in range(7):
        assert isinstance(await store.check(other), Grant)
    await store.modify(other, 5)
    denial = await store.check(other)  # used 7 of a new 5: nothing until one is back at the new rate
    assert isinstance(denial, Denial) and denial.limit == 5 and denial.retry_after_s == 12
    # Over the minute after the change, at most the new limit passes (one every 12 s).
    passed = 0
    start = trio.current_time()
    while trio.current_time() - start <= 60:
        passed += isinstance(await store.check(other), Grant)
        await trio.sleep(0.5)
    assert passed == 5


async def test_a_limit_changed_by_another_writer_is_rescaled_on_reload(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "keys.toml"
    server = await FileKeyStore.open(path)
    key, _ = await server.create(5)
    assert await burst(server, key) == 5
    cli = await FileKeyStore.open(path)
    await cli.modify(key, 10)
    assert await server.reload_if_changed()
    assert await burst(server, key) == 5
    await cli.modify(key, 0)  # blocked and unblocked: what was used stays used
    assert await server.reload_if_changed()
    assert (await server.check(key)) == Denial("blocked", retry_after_s=60)
    await cli.modify(key, 12)
    assert await server.reload_if_changed()
    assert await burst(server, key) == 2


# -- the file ------------------------------------------------------------------------------------------


async def test_keys_are_stored_hashed_with_usage_and_survive_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "keys.toml"
    store = await FileKeyStore.open(path)
    key, info = await store.create(10)
    other, _ = await store.create(3)
    for _ in range(4):
        grant = await store.check(key)
        assert isinstance(grant, Grant)
    store.record_usage_nowait(grant.key_id, tokens=250)
    store.record_usage_nowait(grant.key_id, tokens=12)
    await store.flush()

    text = path.read_text()
    assert key not in text and other not in text
    assert key[8:20] not in text  # nothing of the key beyond its display prefix
    assert info.id == key_id_of(key) and f"[keys.{info.id}]" in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    reopened = await FileKeyStore.open(path)
    saved = await reopened.info(info.id)
    assert saved is not None
    assert (saved.prefix, saved.rate_limit, saved.requests, saved.tokens) == (key[:8], 10, 4, 262)
    assert saved.last_used_at is not None
    assert isinstance(await reopened.check(key), Grant)


async def test_a_corrupt_file_is_a_clear_error_not_an_empty_store(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text("version = 1\n[keys.abc\nprefix = ")
    with pytest.raises(KeyStoreError, match=r"keys\.toml: not a valid keys file"):
        await FileKeyStore.open(path)
    path.write_text("version = 1\n[keys.abc]\nprefix = 'x'\nrate_limit = 1\ncreated_at = 2026-01-01T00:00:00Z\n")
    with pytest.raises(KeyStoreError, match=r"keys\.abc: a key id is"):
        await FileKeyStore.open(path)
    key_id = "a" * 64
    path.write_text(f"version = 1\n[keys.{key_id}]\nprefix = 'x'\nrate_limit = -4\n"
                    "created_at = 2026-01-01T00:00:00Z\n")
    with pytest.raises(KeyStoreError, match=rf"keys\.{key_id}\.rate_limit"):
        await FileKeyStore.open(path)
    assert not (tmp_path / "missing.toml").exists()
    assert await (await FileKeyStore.open(tmp_path / "missing.toml")).list_keys() == []


async def test_changes_by_another_writer_are_picked_up_and_usage_is_merged_not_overwritten(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "keys.toml"
    server = await FileKeyStore.open(path)
    key, info = await server.create(5)
    for _ in range(3):
        assert isinstance(await server.check(key), Grant)

    cli = await FileKeyStore.open(path)  # another writer, as `sn1-gateway keys` is
    await cli.modify(key, 9)
    new_key, _ = await cli.create(4)

    # The server flushes its usage before it has noticed the change: the change must survive.
    await server.flush()
    on_disk = keyfile.read(path).keys
    assert on_disk[info.id].rate_limit == 9 and on_disk[info.id].requests == 3
    assert key_id_of(new_key) in on_disk
    assert isinstance(await server.check(new_key), Grant)

    await cli.delete(key)
    assert await server.reload_if_changed()
    assert await server.check(key) == Denial("unknown")
    assert not await server.reload_if_changed()


async def test_maintain_reloads_within_a_second_and_flushes_usage(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    server = await FileKeyStore.open(path, flush_interval_s=0.5)
    writer = await FileKeyStore.open(path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.maintain)
            key, info = await writer.create(2)

            async def granted() -> bool:
                return isinstance(await server.check(key), Grant)

            assert await wait_until(granted) < 1.0
            server.record_usage_nowait(info.id, tokens=7)

            async def flushed() -> bool:
                return keyfile.read(path).keys[info.id].tokens == 7

            await wait_until(flushed)
            assert keyfile.read(path).keys[info.id].requests == 1

            await writer.delete(key)

            async def revoked() -> bool:
                return await server.check(key) == Denial("unknown")

            assert await wait_until(revoked) < 1.0
            nursery.cancel_scope.cancel()


async def test_a_file_corrupted_while_serving_keeps_the_last_good_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    server = await FileKeyStore.open(path, watch_interval_s=0.02, flush_interval_s=0.05)
    key, _ = await server.create(50)
    path.write_text("garbage = [")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.maintain)

            async def noticed() -> bool:
                return server.health()["last_error"] is not None

            await wait_until(noticed)
            assert "not a valid keys file" in server.health()["last_error"]
            assert isinstance(await server.check(key), Grant)
            with pytest.raises(KeyStoreUnavailable):
                await server.create(1)
            await trio.sleep(0.3)  # usage flushes fail and keep their counts
            nursery.cancel_scope.cancel()
    assert path.read_text() == "garbage = ["
    assert server.health()["unflushed_usage"]


async def test_import_of_the_predecessors_file(tmp_path: Path) -> None:
    text = '{"abcdefghijklmnopqrstuvwxyz012345": {"rate_limit": 10, "usage": 42}, "shortkey": {"rate_limit": 0}}'
    entries = parse_legacy_keys(text, "api_keys.json")
    assert entries == [LegacyKey("abcdefghijklmnopqrstuvwxyz012345", 10, 42), LegacyKey("shortkey", 0, 0)]
    store = await FileKeyStore.open(tmp_path / "keys.toml")
    report = await store.import_keys(entries)
    assert (report.added, report.skipped) == (2, 0)
    assert (await store.import_keys(entries)).skipped == 2
    info = await store.info(key_id_of("abcdefghijklmnopqrstuvwxyz012345"))
    assert info is not None and (info.prefix, info.rate_limit, info.requests) == ("abcdefgh", 10, 42)
    assert display_prefix("shortkey") == "sh"
    assert "shortkey" not in (tmp_path / "keys.toml").read_text()

    for bad, message in [
        ("[1, 2]", "expected an object"),
        ('{"k1234567": {"rate_limit": -1}}', r"entry 1 \(k1\.\.\.\): rate_limit"),
        ('{"k1234567": {"rate_limit": 1, "usage": "x"}}', "usage"),
        ("{", "not valid JSON"),
    ]:
        with pytest.raises(LegacyFormatError, match=message):
            parse_legacy_keys(bad, "api_keys.json")


# -- usage counters: miners report them, so nothing they send may break the store -----------------------


def numbers_in(path: Path) -> list[int]:
    return [int(n) for n in re.findall(rb"= (-?[0-9]+)\n", path.read_bytes())]


async def test_usage_increments_are_checked_and_totals_saturate_at_int64(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.toml"
    store = await FileKeyStore.open(path)
    key, info = await store.create(10)
    _, near = await store.create(10)
    await store.flush()
    keyfile.transact(path, lambda keys: keys.update(
        {near.id: dataclasses.replace(keys[near.id], tokens=INT64_MAX - 5)}))
    assert await store.reload_if_changed()

    caplog.set_level(logging.WARNING, "sn1_gateway.keys")
    for bad in (2**64 - 1, -5, 1.5, True, "10", None, MAX_TOKENS_PER_REQUEST + 1):
        store.record_usage_nowait(info.id, tokens=bad)  # type: ignore[arg-type]
    store.record_usage_nowait(info.id, tokens=MAX_TOKENS_PER_REQUEST)
    store.record_usage_nowait(info.id, tokens=7)
    store.record_usage_nowait(near.id, tokens=1_000)
    await store.flush()

    saved = keyfile.read(path).keys
    assert saved[info.id].tokens == MAX_TOKENS_PER_REQUEST + 7  # the bad ones refused, the rest counted
    assert saved[near.id].tokens == INT64_MAX  # saturated, not wrapped, not beyond int64
    assert max(numbers_in(path)) <= INT64_MAX and min(numbers_in(path)) >= 0
    health = store.health()
    assert (health["usage_refused"], health["counters_saturated"]) == (7, 1)
    refusals = [r for r in caplog.records if "refused a token count" in r.getMessage()]
    assert len(refusals) == 1, "logged once, then only counted"
    # More usage on a saturated total keeps it there; the other key goes on counting.
    store.record_usage_nowait(near.id, tokens=1)
    store.record_usage_nowait(info.id, tokens=1)
    await store.flush()
    saved = keyfile.read(path).keys
    assert (saved[near.id].tokens, saved[info.id].tokens) == (INT64_MAX, MAX_TOKENS_PER_REQUEST + 8)
    assert key not in path.read_text()


async def test_a_corrupt_counter_in_the_file_is_reported_and_repaired_not_fatal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.toml"
    store = await FileKeyStore.open(path)
    key, info = await store.create(10)
    other, good = await store.create(10)
    text = path.read_text()
    text = text.replace("requests = 0\ntokens = 0\n", "requests = -3\ntokens = 99999999999999999999999\n", 1)
    path.write_text(text)  # by hand, or an older version
    caplog.set_level(logging.WARNING, "sn1_gateway.keys")

    reopened = await FileKeyStore.open(path)  # not a KeyStoreError: the gateway starts
    first = next(i for i in await reopened.list_keys() if i.requests == 0 and i.tokens == INT64_MAX)
    assert reopened.health()["counters_repaired"] == 2
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"keys.{first.id}.requests: negative" in messages and f"keys.{first.id}.tokens: beyond" in messages
    assert isinstance(await reopened.check(key), Grant) and isinstance(await reopened.check(other), Grant)
    await reopened.flush()  # the next write repairs the file
    assert max(numbers_in(path)) <= INT64_MAX and min(numbers_in(path)) >= 0
    saved = keyfile.read(path)
    assert saved.problems == ()
    assert {saved.keys[info.id].requests, saved.keys[good.id].requests} == {1}


async def test_a_flush_that_fails_after_the_rename_is_not_added_twice(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.toml"
    store = await FileKeyStore.open(path)
    _, info = await store.create(10)
    store.record_usage_nowait(info.id, tokens=40)
    real_fsync_dir = wire.files.fsync_dir
    failures = []

    def failing_fsync_dir(folder: str | os.PathLike[str]) -> None:
        if not failures:
            failures.append(folder)
            raise OSError(5, "Input/output error")
        real_fsync_dir(folder)

    monkeypatch.setattr(wire.files, "fsync_dir", failing_fsync_dir)
    await store.flush()  # the file was replaced: the usage is in it, whatever fsync said after
    assert failures
    store.record_usage_nowait(info.id, tokens=2)
    await store.flush()
    assert keyfile.read(path).keys[info.id].tokens == 42


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_keys_file_its_lock_and_temporary_files_are_0600_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporaries: list[int] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        temporaries.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    monkeypatch.setattr(wire.files.os, "replace", replace)
    old_umask = os.umask(0)
    try:
        path = tmp_path / "state" / "keys" / "keys.toml"
        store = await FileKeyStore.open(path)
        await store.create(5)
        assert mode(path) == 0o600 and mode(keyfile.lock_path(path)) == 0o600
        assert mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
        # Files left wider by an older version or by hand are narrowed by the next write.
        existing = tmp_path / "old" / "keys.toml"
        existing.parent.mkdir()
        existing.write_text("version = 1\n")
        existing.chmod(0o644)
        keyfile.lock_path(existing).write_text("")
        keyfile.lock_path(existing).chmod(0o666)
        store = await FileKeyStore.open(existing)
        await store.create(5)
        assert mode(existing) == 0o600 and mode(keyfile.lock_path(existing)) == 0o600
        assert mode(existing.parent) == 0o777, "an existing folder is left as the operator made it"
    finally:
        os.umask(old_umask)
    assert temporaries and set(temporaries) == {0o600}


CHILD = textwrap.dedent(
    """
    import sys
    from dataclasses import replace
    from pathlib import Path

    from actors.keystore import keyfile
    from actors.keystore.records import KeyInfo

    path = Path(sys.argv[1])
    round = 0
    print("writing", flush=True)
    while True:
        round += 1

        def change(keys, round=round):
            # Every write sets every key to the same generation; a torn or mixed file would show.
            for key_id in list(keys):
                keys[key_id] = replace(keys[key_id], rate_limit=round, requests=round)
            if len(keys) < 400:
                key_id = f"{len(keys):064x}"
                keys[key_id] = KeyInfo(key_id, "sn1-test", round, 1.0e9, requests=round)

        keyfile.transact(path, change)
    """
)


def test_a_writer_killed_at_random_moments_always_leaves_a_loadable_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    rng = random.Random(1234)
    generations = []
    for _ in range(12):
        child = subprocess.Popen([sys.executable, str(script), str(path)], cwd=ROOT, stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"writing\n"
        trio_free_sleep = rng.uniform(0.02, 0.25)
        try:
            child.wait(timeout=trio_free_sleep)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        snapshot = keyfile.read(path)  # raises on a torn file
        values = {(info.rate_limit, info.requests) for info in snapshot.keys.values()}
        assert len(values) <= 1, "a file mixing two writes"
        if values:
            generations.append(values.pop()[0])
    assert len(generations) >= 10 and max(generations) > 1
    # The next writer cleans up the temporary files of writers killed mid-write.
    keyfile.transact(path, lambda keys: None)
    assert list(tmp_path.glob(".keys.toml.*.tmp")) == []


# -- the flush at exit stays within the stop's bound ----------------------------------------------------


async def test_a_slow_usage_flush_at_exit_ends_within_the_stops_bound(
        gateway_settings: Settings, nursery: trio.Nursery, stack_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from engine.gateway import run
    from engine.supervisor import EXIT_MARGIN_S

    flushing: list[float] = []

    async def slow_flush(self: FileKeyStore) -> None:  # a disk that takes 10 s to save the usage
        flushing.append(trio.current_time())
        await trio.sleep(10)

    settings = dataclasses.replace(gateway_settings,
                                   server=dataclasses.replace(gateway_settings.server, drain_timeout_s=1.0))
    with trio.fail_after(60):
        gateway = await nursery.start(run, settings)
        monkeypatch.setattr(FileKeyStore, "flush", slow_flush)
        asked = trio.current_time()
        gateway.shutdown()
        await gateway.wait_stopped()
    took = trio.current_time() - asked
    assert flushing, "the usage was never flushed at exit"
    assert took <= 1.0 + EXIT_MARGIN_S, took  # before: the flush had 5 s of its own past the margin
    assert "no time left before the stop's deadline" in caplog.text
