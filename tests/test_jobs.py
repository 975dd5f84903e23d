"""Chat jobs: the stores (SQLite and Redis) against one contract, and `/v1/chat/completions/jobs` on real
gateways on loopback: a chat job and a deep-research job polled to completion, ownership, expiry,
restart (a job left running is failed), two gateways sharing one Redis, the limits, DELETE."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.jobs import CANCELLED, INTERRUPTED, JobRecord, JobStatus, JobStore, JobStoreError
from actors.jobs.redisstore import RedisJobStore
from actors.jobs.sqlitestore import SqliteJobStore
from config.settings import AuthSettings, JobsSettings, Settings
from engine.gateway import Gateway, run
from engine.supervisor import StartupError
from tests.chat_stack import Stack, settings_for
from tests.research_support import HEADINGS, heading_lines, open_net
from tests.scripted_miners import Miners, answer

JOBS = "/v1/chat/completions/jobs"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HELLO = {"messages": [{"role": "user", "content": "hello"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


# -- the stores -------------------------------------------------------------------------------------------


@pytest.fixture(params=["file", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    if request.param == "file":
        opened = await SqliteJobStore.open(tmp_path / "state" / "jobs.sqlite")
        try:
            yield opened
        finally:
            await opened.close()
    else:
        url = request.getfixturevalue("redis_url")
        async with RedisJobStore.connect(url) as redis_store:
            yield redis_store


def record(owner: str = "k" * 64, *, runner: str = "me", ttl_s: float = 60.0) -> JobRecord:
    now = time.time()
    return JobRecord(str(uuid.uuid4()), owner, JobStatus.PENDING, now, now, now + ttl_s, runner=runner)


async def test_a_job_goes_pending_running_finished_and_its_last_word_is_final(store: JobStore) -> None:
    job = record()
    await store.create(job)
    got = await store.get(job.id)
    assert got is not None and got.status is JobStatus.PENDING and got.result == () and got.owner == job.owner
    assert await store.count_owned(job.owner, time.time()) == 1
    assert await store.append(job.id, ["early"], first_seq=0, now=time.time()) is False, "not running yet"
    assert await store.start(job.id, runner="me", now=time.time())
    assert not await store.start(job.id, runner="me", now=time.time())
    assert await store.append(job.id, ["a", "b"], first_seq=0, now=time.time())
    # a write tried again after its first try went through (it had timed out) adds nothing twice
    assert await store.append(job.id, ["a", "b"], first_seq=0, now=time.time())
    assert await store.append(job.id, ["b", "c"], first_seq=1, now=time.time())
    got = await store.get(job.id)
    assert got is not None and got.result == ("a", "b", "c")
    assert await store.finish(job, JobStatus.COMPLETED, error=None, chunks=["c", "d"], first_seq=2, now=time.time(),
                              ttl_s=60)
    got = await store.get(job.id)
    assert got is not None and got.status is JobStatus.COMPLETED and got.result == ("a", "b", "c", "d")
    assert got.error is None
    # a cancellation (or anything else) after the end changes nothing
    assert not await store.finish(job, JobStatus.FAILED, error=CANCELLED, chunks=["x"], first_seq=4, now=time.time(),
                                  ttl_s=60)
    assert not await store.append(job.id, ["y"], first_seq=4, now=time.time())
    assert (await store.get(job.id)) == got
    assert await store.finished_among([job.id, "no-such-job"]) == {job.id, "no-such-job"}
    assert await store.delete(job) and await store.get(job.id) is None
    assert await store.count_owned(job.owner, time.time()) == 0


async def test_a_cancellation_wins_over_the_runners_last_word(store: JobStore) -> None:
    job = record()
    await store.create(job)
    await store.start(job.id, runner="me", now=time.time())
    assert await store.finished_among([job.id]) == set()
    assert await store.finish(job, JobStatus.FAILED, error=CANCELLED, chunks=(), first_seq=0, now=time.time(), ttl_s=60)
    assert not await store.append(job.id, ["late"], first_seq=0, now=time.time()), "the runner learns it is cancelled"
    assert not await store.finish(job, JobStatus.COMPLETED, error=None, chunks=["late"], first_seq=0, now=time.time(),
                                  ttl_s=60)
    got = await store.get(job.id)
    assert got is not None and got.status is JobStatus.FAILED and got.error == CANCELLED and got.result == ()


async def test_abandoned_jobs_are_failed_and_running_ones_kept(store: JobStore) -> None:
    mine_running, mine_lost, dead, alive = (record(runner="me"), record(runner="me"), record(runner="dead"),
                                            record(runner="alive"))
    for job in (mine_running, mine_lost, dead, alive):
        await store.create(job)
        await store.start(job.id, runner=job.runner, now=time.time())
    await store.heartbeat("me", 30)
    await store.heartbeat("alive", 30)
    failed = await store.fail_abandoned(runner="me", running={mine_running.id}, now=time.time(), ttl_s=60,
                                        error=INTERRUPTED)
    statuses = {}
    for job in (mine_running, mine_lost, dead, alive):
        got = await store.get(job.id)
        assert got is not None
        statuses[job.id] = got.status
    assert statuses[mine_running.id] is JobStatus.RUNNING and statuses[mine_lost.id] is JobStatus.FAILED
    assert statuses[dead.id] is JobStatus.FAILED
    if store.backend == "redis":  # shared: another gateway that still beats runs its own
        assert statuses[alive.id] is JobStatus.RUNNING and failed == 2
        await store.retire("alive")
        assert await store.fail_abandoned(runner="me", running={mine_running.id}, now=time.time(), ttl_s=60,
                                          error=INTERRUPTED) == 1
    else:  # one process owns the file: whatever is not running here was left by an earlier run
        assert statuses[alive.id] is JobStatus.FAILED and failed == 3
    got = await store.get(dead.id)
    assert got is not None and got.error == INTERRUPTED


async def test_the_sqlite_store_forgets_expired_jobs(tmp_path: Path) -> None:
    clock = Clock()
    store = await SqliteJobStore.open(tmp_path / "jobs.sqlite", wall_clock=clock)
    job = dataclasses.replace(record(), created_at=clock.now, updated_at=clock.now, expires_at=clock.now + 10)
    await store.create(job)
    await store.start(job.id, runner="me", now=clock.now)
    await store.append(job.id, ["a"], first_seq=0, now=clock.now)
    assert await store.get(job.id) is not None
    clock.now += 10
    assert await store.get(job.id) is None, "expired: gone at once, before any sweep"
    assert await store.count_owned(job.owner, clock.now) == 0
    assert await store.sweep(clock.now) == 1
    await store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)


async def test_the_redis_store_lets_redis_forget_expired_jobs(redis_url: str) -> None:
    async with RedisJobStore.connect(redis_url) as store:
        job = record(ttl_s=0.3)
        await store.create(job)
        await store.start(job.id, runner="me", now=time.time())
        await store.finish(job, JobStatus.COMPLETED, error=None, chunks=["a"], first_seq=0, now=time.time(), ttl_s=0.3)
        assert await store.get(job.id) is not None
        await trio.sleep(0.5)
        assert await store.get(job.id) is None
        assert await store.count_owned(job.owner, time.time()) == 0


async def test_the_jobs_file_is_private_and_a_corrupt_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "jobs.sqlite"
    store = await SqliteJobStore.open(path)
    await store.create(record())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    written = [p for p in path.parent.iterdir() if p.name.startswith("jobs.sqlite")]
    assert len(written) >= 2, written  # the file and its write-ahead log
    for file in written:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    await store.close()
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database, and it is long enough to look like one" * 100)
    with pytest.raises(JobStoreError, match=r"jobs\.file: cannot use .*bad\.sqlite"):
        await SqliteJobStore.open(bad)


# -- gateways ---------------------------------------------------------------------------------------------


class JobsStack(Stack):
    """A gateway on loopback (tests/chat_stack.py) with the chat jobs routes at hand."""

    @property
    def runner(self) -> Any:
        return self.gateway.services.jobs

    async def create(self, body: dict[str, Any] | None = None, *, key: str | None = None) -> httpx.Response:
        headers = {"api-key": key} if key else {}
        return await self.client.post(JOBS, json=body or HELLO, headers=headers)

    async def poll(self, job_id: str, *, until: Callable[[dict[str, Any]], bool] | None = None,
                   timeout_s: float = 10) -> dict[str, Any]:
        """The job once `until` holds (default: once it ended); a job that ended before is returned as it is."""
        with trio.fail_after(timeout_s):
            while True:
                got = await self.client.get(f"{JOBS}/{job_id}")
                assert got.status_code == 200, got.text
                job = dict(got.json())
                if job["status"] in ("completed", "failed") or (until is not None and until(job)):
                    return job
                await trio.sleep(0.02)


def gateway_settings(tmp_path: Path, *, jobs: JobsSettings | None = None, redis: str | None = None,
                     **fanout: Any) -> Settings:
    settings = settings_for(tmp_path, **fanout)
    settings = dataclasses.replace(settings, jobs=jobs or JobsSettings(), auth=dataclasses.replace(
        settings.auth, failed_auth_per_minute=0), server=dataclasses.replace(settings.server, drain_timeout_s=0.5))
    if redis is not None:
        settings = dataclasses.replace(settings, auth=AuthSettings(store="redis", redis_url=redis))
    return settings


async def started(nursery: trio.Nursery, settings: Settings, miners: Miners) -> Gateway:
    gateway: Gateway = await nursery.start(lambda task_status: run(settings, transport=miners.transport(),
                                                                     task_status=task_status))
    with trio.fail_after(5):
        while not gateway.services.jobs or not gateway.services.jobs._beating:  # noqa: ASYNC110 - first beat
            await trio.sleep(0.01)
    return gateway


@asynccontextmanager
async def open_stack(nursery: trio.Nursery, tmp_path: Path, *, miners: Miners | None = None, key: str | None = None,
                     **options: Any) -> AsyncIterator[JobsStack]:
    miners = miners or Miners()
    gateway = await started(nursery, gateway_settings(tmp_path, **options), miners)
    if key is None:
        key, _ = await gateway.services.keys.create(100_000)
    async with httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=10) as client:
        try:
            yield JobsStack(gateway, miners, key, client)
        finally:
            gateway.shutdown()
            with trio.fail_after(10):
                await gateway.wait_stopped()


def all_answer(miners: Miners, words: list[str], **kw: Any) -> None:
    for port in (9001, 9002, 9003):
        miners.scripts[port] = answer(words, **kw)


def result_chunks(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every chat.completion.chunk of a job's result, in order."""
    assert [item["seq_id"] for item in job["result"]] == list(range(len(job["result"])))
    chunks = []
    for item in job["result"]:
        assert isinstance(item["chunk"], str)
        batch = json.loads(item["chunk"])
        assert isinstance(batch, list) and batch
        chunks += batch
    return chunks


def result_text(job: dict[str, Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in result_chunks(job) if c["choices"])


async def test_a_chat_job_is_created_and_polled_to_completion(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with open_stack(nursery, tmp_path) as stack:
        all_answer(stack.miners, ["An", " answer", " in", " parts"], step=0.05)
        created = await stack.create({**HELLO, "stream": False, "logprobs": False})
        assert created.status_code == 202, created.text
        body = created.json()
        assert set(body) == {"job_id", "status", "created_at", "updated_at"} and body["status"] == "pending"
        assert uuid.UUID(body["job_id"]).version == 4 and ISO.match(body["created_at"]) and ISO.match(body["updated_at"])
        assert "X-RateLimit-Limit" in created.headers
        running = await stack.poll(body["job_id"], until=lambda job: job["status"] != "pending")
        assert running["status"] in ("running", "completed")
        job = await stack.poll(body["job_id"])
        assert job["status"] == "completed" and job["error"] is None, job
        assert set(job) == {"job_id", "status", "created_at", "updated_at", "result", "error"}
        assert job["created_at"] == body["created_at"] and job["updated_at"] >= body["updated_at"]
        assert result_text(job) == "An answer in parts"
        chunks = result_chunks(job)
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 4
        assert (await stack.client.get(f"{JOBS}/{uuid.uuid4()}")).status_code == 404
        assert (await stack.client.get(f"{JOBS}/{'x' * 500}")).json()["error"]["code"] == "job_not_found"


async def test_a_deep_research_job_is_polled_to_completion(nursery: trio.Nursery, tmp_path: Path) -> None:
    net = await open_net(nursery, tmp_path)
    async with net.client:
        created = await net.client.post(JOBS, json=net.research())
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        with trio.fail_after(20):
            while (job := (await net.client.get(f"{JOBS}/{job_id}")).json())["status"] not in (  # noqa: ASYNC110
                    "completed", "failed"):
                await trio.sleep(0.05)
        assert job["status"] == "completed", job["error"]
        text = result_text(job)
        assert heading_lines(text) == HEADINGS
        assert len(re.findall(r"<https://", text.split("## Final Answer", 1)[1])) == 4
        assert result_chunks(job)[-1]["usage"]["completion_tokens"] > 100
    net.gateway.shutdown()


async def test_a_job_belongs_to_the_key_that_made_it(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with open_stack(nursery, tmp_path) as stack:
        all_answer(stack.miners, ["mine"])
        job_id = (await stack.create()).json()["job_id"]
        await stack.poll(job_id)
        other, _ = await stack.gateway.services.keys.create(100)
        for method in ("GET", "DELETE"):
            response = await stack.client.request(method, f"{JOBS}/{job_id}", headers={"api-key": other})
            assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
        assert (await stack.poll(job_id))["status"] == "completed", "still there for its owner"
        assert (await stack.client.get(f"{JOBS}/{job_id}", headers={"api-key": "sn1-wrong"})).status_code == 401
        path = tmp_path / "jobs.sqlite"
        with sqlite3.connect(path) as conn:
            (owner,) = conn.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert re.fullmatch(r"[0-9a-f]{64}", owner) and stack.key not in path.read_bytes().decode("latin-1")


async def test_a_bad_request_is_refused_at_once_and_a_failing_one_fails(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with open_stack(nursery, tmp_path) as stack:
        bad = await stack.create({"messages": [], "stream": True})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        assert stack.runner.created == 0
        for port in (9001, 9002, 9003):
            stack.miners.scripts[port] = 500
        job = await stack.poll((await stack.create()).json()["job_id"])
        assert job["status"] == "failed" and job["error"]["code"] == "miners_failed"
        assert set(job["error"]["details"]) == {"1", "2", "3"}
        assert set(job["error"]) >= {"message", "type", "param", "code"}


async def test_a_job_whose_answer_goes_over_its_bound_fails_saying_so(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with open_stack(nursery, tmp_path, jobs=JobsSettings(max_result_bytes=4096)) as stack:
        all_answer(stack.miners, [f"w{i} " for i in range(100)], step=0.001)
        job = await stack.poll((await stack.create()).json()["job_id"])
        assert job["status"] == "failed" and job["error"]["code"] == "job_result_too_large"
        assert sum(len(item["chunk"].encode()) for item in job["result"]) <= 4096


async def test_delete_cancels_a_running_job_and_removes_a_finished_one(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with open_stack(nursery, tmp_path) as stack:
        all_answer(stack.miners, [f"w{i} " for i in range(200)], step=0.02)  # 4 s
        job_id = (await stack.create()).json()["job_id"]
        await stack.poll(job_id, until=lambda job: bool(job["result"]))
        started_at = trio.current_time()
        deleted = await stack.client.delete(f"{JOBS}/{job_id}")
        assert trio.current_time() - started_at < 1
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["status"] == "failed" and deleted.json()["error"]["code"] == "cancelled"
        assert stack.runner.health()["running"] == 0, "the run stopped"
        kept = await stack.poll(job_id)
        assert kept["status"] == "failed" and kept["error"] == deleted.json()["error"]
        assert 0 < len(result_text(kept)) < len("w0 ") * 200
        again = await stack.client.delete(f"{JOBS}/{job_id}")
        assert again.status_code == 200 and again.json()["status"] == "failed"
        assert (await stack.client.get(f"{JOBS}/{job_id}")).status_code == 404
        assert (await stack.client.delete(f"{JOBS}/{job_id}")).status_code == 404


async def test_running_jobs_are_bounded_per_key_and_in_all(nursery: trio.Nursery, tmp_path: Path) -> None:
    jobs = JobsSettings(max_running=2, max_running_per_key=1)
    async with open_stack(nursery, tmp_path, jobs=jobs) as stack:
        all_answer(stack.miners, ["slow"], first_delay=3.0)  # still running while the others are asked
        assert (await stack.create()).status_code == 202
        refused = await stack.create()
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_running_jobs"
        assert int(refused.headers["Retry-After"]) > 0 and "X-RateLimit-Limit" in refused.headers
        second, _ = await stack.gateway.services.keys.create(100)
        third, _ = await stack.gateway.services.keys.create(100)
        assert (await stack.create(key=second)).status_code == 202
        busy = await stack.create(key=third)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "jobs_busy" and busy.headers["Retry-After"]
        with trio.fail_after(15):
            while stack.runner.health()["running"]:  # noqa: ASYNC110 - the slow answers end
                await trio.sleep(0.05)
        assert (await stack.create(key=third)).status_code == 202
        assert stack.runner.health()["refused"] == {"running": 1, "running_per_key": 1, "stored_per_key": 0}


async def test_a_key_keeps_a_bounded_number_of_jobs(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with open_stack(nursery, tmp_path, jobs=JobsSettings(max_stored_per_key=1)) as stack:
        all_answer(stack.miners, ["ok"])
        job_id = (await stack.create()).json()["job_id"]
        await stack.poll(job_id)
        refused = await stack.create()
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
        assert (await stack.client.delete(f"{JOBS}/{job_id}")).status_code == 200
        assert (await stack.create()).status_code == 202


async def test_jobs_expire(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with open_stack(nursery, tmp_path, jobs=JobsSettings(ttl_s=1.0, sweep_interval_s=0.1)) as stack:
        all_answer(stack.miners, ["soon", " gone"])
        job_id = (await stack.create()).json()["job_id"]
        await stack.poll(job_id)
        await trio.sleep(1.3)
        assert (await stack.client.get(f"{JOBS}/{job_id}")).status_code == 404
        with sqlite3.connect(tmp_path / "jobs.sqlite") as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,), "swept from the file"
        assert stack.runner.health()["expired"] == 1


@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_a_job_running_when_the_gateway_stops_is_failed_after_restart(
        nursery: trio.Nursery, tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    redis = request.getfixturevalue("redis_url") if backend == "redis" else None
    miners = Miners()
    all_answer(miners, ["never", " finished"], first_delay=30.0)
    # Miners that would keep it waiting for longer than the test runs: the job is running when the gateway stops.
    async with open_stack(nursery, tmp_path, miners=miners, redis=redis, first_token_timeout_s=60.0) as first:
        key = first.key
        job_id = (await first.create()).json()["job_id"]
        running = await first.poll(job_id, until=lambda job: job["status"] == "running")
        assert running["status"] == "running", running
    async with open_stack(nursery, tmp_path, miners=miners, redis=redis, key=key) as second:
        job = await second.poll(job_id)
        assert job["status"] == "failed" and job["error"]["code"] == "job_interrupted"
        assert "stopped while this job ran" in job["error"]["message"]


@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_a_job_left_running_by_a_killed_gateway_is_failed_at_the_next_start(
        nursery: trio.Nursery, tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """What a gateway killed with -9 leaves: a job still `running`, its runner silent."""
    redis = request.getfixturevalue("redis_url") if backend == "redis" else None
    settings = gateway_settings(tmp_path, redis=redis)
    job = record(owner="o" * 64, runner="killed")
    if redis is None:
        store: Any = await SqliteJobStore.open(Path(settings.resolve(settings.jobs.file)))
        await store.create(job)
        await store.start(job.id, runner="killed", now=time.time())
        await store.close()
    else:
        async with RedisJobStore.connect(redis) as store:
            await store.create(job)
            await store.start(job.id, runner="killed", now=time.time())
    async with open_stack(nursery, tmp_path, redis=redis) as stack:
        with trio.fail_after(5):
            while (found := await stack.runner.store.get(job.id)).status is JobStatus.RUNNING:  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert found.status is JobStatus.FAILED and found.error == INTERRUPTED


async def test_two_gateways_on_one_redis_share_their_jobs(nursery: trio.Nursery, tmp_path: Path,
                                                          redis_url: str) -> None:
    one, two = Miners(), Miners()
    all_answer(one, [f"w{i} " for i in range(10)], step=0.02)
    async with (
        open_stack(nursery, tmp_path / "one", miners=one, redis=redis_url) as first,
        open_stack(nursery, tmp_path / "two", miners=two, redis=redis_url, key=first.key) as second,
    ):
        job_id = (await first.create()).json()["job_id"]
        job = await second.poll(job_id)  # created and run by the first, served by the second
        assert job["status"] == "completed" and result_text(job) == "".join(f"w{i} " for i in range(10))
        assert two.received == [], "the second gateway asked no miner"
        other, _ = await second.gateway.services.keys.create(100)
        assert (await second.client.get(f"{JOBS}/{job_id}", headers={"api-key": other})).status_code == 404
        # a running job cancelled through the other gateway stops where it runs
        all_answer(one, [f"w{i} " for i in range(200)], step=0.02)
        job_id = (await first.create()).json()["job_id"]
        await second.poll(job_id, until=lambda job: bool(job["result"]))
        deleted = await second.client.delete(f"{JOBS}/{job_id}")
        assert deleted.status_code == 200 and deleted.json()["error"]["code"] == "cancelled"
        with trio.fail_after(3):
            while first.runner.health()["running"]:  # noqa: ASYNC110 - it learns at its next write
                await trio.sleep(0.02)
        final = await first.poll(job_id)
        assert final["status"] == "failed" and final["error"]["code"] == "cancelled"
        assert len(result_text(final)) < len("w0 ") * 200


async def test_an_unusable_jobs_file_stops_the_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite").write_bytes(b"garbage, not SQLite" * 200)
    with pytest.raises(StartupError, match=r"jobs\.file: cannot use"):
        await nursery.start(lambda task_status: run(gateway_settings(tmp_path), transport=Miners().transport(),
                                                    task_status=task_status))
