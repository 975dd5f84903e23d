"""`server.workers = N`: several serving processes on one port under one command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_server import RedisServer, free_port

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}
drain_timeout_s = 1
[auth]
store = "{store}"
redis_url = "{redis_url}"
admin_key = "admin-secret"
[wallet]
uri = "//Alice"
[subnet]
source = "static"
[availability]
source = "none"
[scoring]
spool_dir = "spool"
"""


def write_config(folder: Path, **values: object) -> Path:
    path = folder / "gw.toml"
    path.write_text(CONFIG.format(**values), encoding="utf-8")
    return path


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer /health within {timeout_s}s")


def workers_seen(url: str, tries: int = 40) -> set[int]:
    """Which workers answer, each request on a new connection (the kernel spreads connections)."""
    seen: set[int] = set()
    for _ in range(tries):
        seen.add(httpx.get(f"{url}/health/ready", timeout=5, headers={"Connection": "close"}).json()["worker"])
    return seen


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def start(serve: list[subprocess.Popen[str]], config: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--config", str(config)],
                               cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    serve.append(process)
    return process


def start_two_workers(serve: list[subprocess.Popen[str]], tmp_path: Path, redis_server: RedisServer
                      ) -> tuple[subprocess.Popen[str], int]:
    """`serve` with `server.workers = 2` on a free port, once it answers; the parent and the port."""
    port = free_port()
    config = write_config(tmp_path, port=port, workers=2, store="redis", redis_url=redis_server.url)
    process = start(serve, config)
    wait_ready(f"http://127.0.0.1:{port}")
    return process, port


def both_workers(process: subprocess.Popen[str]) -> list[int]:
    """The two workers' pids, once the parent has started both."""
    deadline = time.monotonic() + 30
    while len(children(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = children(process.pid)
    assert len(workers) == 2, workers
    return workers


def test_more_than_one_worker_needs_shared_keys(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=free_port(), workers=2, store="file", redis_url="redis://127.0.0.1:1/0")
    done = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "server.workers = 2 needs auth.store = \"redis\"" in line


def test_workers_share_one_port_each_with_its_own_spool_and_stop_cleanly(
        tmp_path: Path, redis_server: RedisServer, serve: list[subprocess.Popen[str]]) -> None:
    process, port = start_two_workers(serve, tmp_path, redis_server)
    url = f"http://127.0.0.1:{port}"
    assert workers_seen(url) == {0, 1}
    assert {p.name for p in (tmp_path / "spool").iterdir()} == {"worker-0", "worker-1"}
    # Whichever worker a client reaches, /metrics and /status show them all.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics", timeout=5, headers={"Connection": "close"}).text
        status = httpx.get(f"{url}/status/data", timeout=5,
                           headers={"Connection": "close", "admin-key": "admin-secret"}).json()
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        ready = {s.labels["worker"]: s.value for s in families["sn1_gateway_ready"].samples}
        workers = [(w["index"], w["ready"]) for w in status.get("workers", [])]
        if ready == {"0": 1.0, "1": 1.0} and workers == [(0, True), (1, True)]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the workers' reports were not merged: /metrics {ready}, /status {workers}")
    assert {a["worker"] for a in status["actors"]} == {0, 1}
    assert status["requests"]["total"] >= 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0


def test_a_worker_that_dies_is_started_again(
        tmp_path: Path, redis_server: RedisServer, serve: list[subprocess.Popen[str]]) -> None:
    process, port = start_two_workers(serve, tmp_path, redis_server)
    url = f"http://127.0.0.1:{port}"
    first = both_workers(process)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = children(process.pid)
        if len(now) == 2 and first[0] not in now and workers_seen(url, tries=20) == {0, 1}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the killed worker was not replaced")
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 0


def test_workers_whose_parent_is_killed_stop_and_free_the_port(
        tmp_path: Path, redis_server: RedisServer, serve: list[subprocess.Popen[str]]) -> None:
    """A parent killed with -9 cannot stop its workers: left alone they served on for good, holding
    the port, so that the next `serve` could not listen."""
    process, port = start_two_workers(serve, tmp_path, redis_server)
    workers = both_workers(process)
    process.kill()
    process.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "the workers outlived their parent"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections' TIME_WAIT, not a listener
        probe.bind(("127.0.0.1", port))
        probe.listen()  # the port is free again


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, reaped by nobody yet, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
