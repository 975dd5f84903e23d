"""The HTTP shell: error bodies for every framework status, health and readiness, graceful shutdown,
and the signals of the real process.

Routes that fail or block on purpose are added through `run(app_hook=...)`, the extension point for
tests and embedders; everything else is the gateway as `serve` runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from quart import Response
from quart_trio import QuartTrio

from config.settings import ServerSettings, Settings
from engine.gateway import Gateway, run
from engine.supervisor import Supervisor
from tests.cli_process import GOOD_CONFIG, SLOW_GATEWAY, Process, start_process
from web.app import create_app
from web.body import json_body
from web.errors import ApiError, json_response

MAX_BODY = 2048


@dataclass
class SteeredRoutes:
    """Routes a test can steer: one that echoes JSON, some that fail, one that waits to be released."""

    slow_entered: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)

    def install(self, app: QuartTrio) -> None:
        @app.post("/test/echo")
        async def echo() -> Response:
            return json_response({"echo": await json_body()})

        @app.get("/test/boom")
        async def boom() -> Response:
            raise RuntimeError(f"secret detail in {__file__}")

        @app.get("/test/boom-in-nursery")
        async def boom_in_nursery() -> Response:
            async def fail() -> None:
                raise KeyError("/etc/secret")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail)
            return json_response({})

        @app.get("/test/teapot-in-nursery")
        async def api_error_in_nursery() -> Response:
            async def fail() -> None:
                raise ApiError(409, "Already there.", code="conflict")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail)
            return json_response({})

        @app.get("/test/slow")
        async def slow() -> Response:
            self.slow_entered.set()
            await self.release.wait()
            return json_response({"finished": True})


@dataclass
class Flaky:
    """A test actor: serves, crashes when told to, and may be held before serving again."""

    crash: trio.Event = field(default_factory=trio.Event)
    may_serve: trio.Event = field(default_factory=trio.Event)
    restarting: trio.Event = field(default_factory=trio.Event)
    serving_again: trio.Event = field(default_factory=trio.Event)
    runs: int = 0
    name: str = "flaky"

    def health(self) -> dict[str, Any]:
        return {"runs": self.runs}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        if self.runs > 1:
            self.restarting.set()  # the supervisor has it as "restarting" until it serves
            await self.may_serve.wait()
        task_status.started()
        if self.runs > 1:
            self.serving_again.set()
        await self.crash.wait()
        self.crash = trio.Event()
        raise RuntimeError("lost the connection to the thing")


@dataclass
class Shell:
    gateway: Gateway
    client: httpx.AsyncClient
    routes: SteeredRoutes
    supervisor: Supervisor


def shell_settings(settings: Settings, **server: Any) -> Settings:
    return dataclasses.replace(
        settings, server=ServerSettings(**{"port": 0, "max_body_bytes": MAX_BODY, "drain_timeout_s": 5.0, **server})
    )


@pytest.fixture
async def shell(gateway_settings: Settings, nursery: trio.Nursery) -> AsyncIterator[Shell]:
    routes = SteeredRoutes()
    supervisor = Supervisor(base_backoff_s=0.05)

    async def start(task_status: trio.TaskStatus[Gateway]) -> None:
        await run(shell_settings(gateway_settings), supervisor=supervisor, app_hook=routes.install,
                  task_status=task_status)

    with trio.fail_after(30):
        gateway: Gateway = await nursery.start(start)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield Shell(gateway, client, routes, supervisor)
    routes.release.set()
    gateway.shutdown()
    with trio.fail_after(10):
        await gateway.wait_stopped()


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert (error["type"], error["code"]) == (type_, code)
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


# --- health -----------------------------------------------------------------------------------


async def test_health_answers_ok(shell: Shell) -> None:
    response = await shell.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_lists_each_actor_running(shell: Shell) -> None:
    response = await shell.client.get("/health/ready")
    assert response.status_code == 200
    report = response.json()
    assert report["ready"] is True and report["draining"] is False
    assert {"keys", "subnet", "availability", "fanout"} <= set(report["actors"])
    for name, actor in report["actors"].items():
        assert actor["status"] == "running", name
        assert actor["restarts"] == 0 and actor["last_error"] is None
    assert report["subnet"]["source"] == "static" and report["subnet"]["stale"] is False


async def test_readiness_while_an_actor_restarts(shell: Shell, nursery: trio.Nursery) -> None:
    flaky = Flaky()
    await shell.supervisor.start(nursery, flaky)
    assert (await shell.client.get("/health/ready")).status_code == 200

    flaky.crash.set()  # it crashes; its restart waits until `may_serve`
    with trio.fail_after(10):
        await flaky.restarting.wait()
    response = await shell.client.get("/health/ready")
    assert response.status_code == 503
    report = response.json()
    assert report["ready"] is False
    assert report["actors"]["flaky"]["status"] == "restarting"
    assert report["actors"]["flaky"]["restarts"] == 1
    assert report["actors"]["flaky"]["last_error"] == "RuntimeError: lost the connection to the thing"
    assert report["actors"]["subnet"]["status"] == "running"
    assert (await shell.client.get("/health")).status_code == 200  # alive, only not ready

    flaky.may_serve.set()
    with trio.fail_after(10):
        await flaky.serving_again.wait()
        await trio.testing.wait_all_tasks_blocked()  # the supervisor has seen it start
    response = await shell.client.get("/health/ready")
    assert response.status_code == 200
    flaky_report = response.json()["actors"]["flaky"]
    assert (flaky_report["status"], flaky_report["restarts"]) == ("running", 1)


# --- error bodies -----------------------------------------------------------------------------


async def test_unknown_path_is_404(shell: Shell) -> None:
    error = assert_error(await shell.client.get("/v2/nothing"), 404, "not_found_error", "not_found")
    assert error["message"] == "Unknown path /v2/nothing."


async def test_no_file_of_the_working_folder_is_served(shell: Shell, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "secret.txt").write_text("not for clients")
    monkeypatch.chdir(tmp_path)  # the app is made where the gateway was started
    client = create_app(shell.gateway.services).test_client()
    response = await client.get("/static/secret.txt")
    assert response.status_code == 404 and "not for clients" not in (await response.get_data(as_text=True))


async def test_wrong_method_is_405_with_allow(shell: Shell) -> None:
    response = await shell.client.post("/health", json={})
    error = assert_error(response, 405, "invalid_request_error", "method_not_allowed")
    assert error["message"] == "Method POST is not allowed on /health."
    assert "GET" in response.headers["allow"]


async def test_invalid_json_is_400(shell: Shell) -> None:
    response = await shell.client.post("/test/echo", content=b'{"messages": [', headers={"content-type": "application/json"})
    error = assert_error(response, 400, "invalid_request_error", "invalid_json")
    assert error["message"].startswith("The request body is not valid JSON")


@pytest.mark.parametrize(("number", "message"), [
    ("NaN", "NaN is not a JSON value"), ("Infinity", "Infinity is not a JSON value"),
    ("-Infinity", "-Infinity is not a JSON value"), ("1e999", "1e999 is too large for a 64-bit float"),
])
async def test_numbers_without_a_finite_float_are_400(shell: Shell, number: str, message: str) -> None:
    response = await shell.client.post("/test/echo", content=b'{"temperature": %s}' % number.encode())
    error = assert_error(response, 400, "invalid_request_error", "invalid_json")
    assert message in error["message"]


async def test_empty_body_is_400(shell: Shell) -> None:
    assert_error(await shell.client.post("/test/echo", content=b""), 400, "invalid_request_error", "invalid_json")


async def test_a_body_at_the_limit_is_accepted(shell: Shell) -> None:
    padding = "x" * (MAX_BODY - len(json.dumps({"p": ""})))
    body = json.dumps({"p": padding}).encode()
    assert len(body) == MAX_BODY
    response = await shell.client.post("/test/echo", content=body)
    assert response.status_code == 200 and response.json() == {"echo": {"p": padding}}


async def test_a_body_over_the_limit_is_413(shell: Shell) -> None:
    body = json.dumps({"p": "x" * MAX_BODY}).encode()
    error = assert_error(await shell.client.post("/test/echo", content=body), 413,
                         "invalid_request_error", "request_too_large")
    assert error["message"] == f"The request body is larger than {MAX_BODY} bytes."


async def test_a_chunked_body_over_the_limit_is_413(shell: Shell) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"p": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}'

    response = await shell.client.post("/test/echo", content=chunks())
    assert_error(response, 413, "invalid_request_error", "request_too_large")


@pytest.mark.parametrize("path", ["/test/boom", "/test/boom-in-nursery"])
async def test_an_unexpected_error_is_500_without_a_traceback(
    shell: Shell, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = await shell.client.get(path)
    error = assert_error(response, 500, "server_error", "internal_error")
    assert error["message"] == "The gateway failed to handle this request."
    for leak in ("Traceback", "secret", ".py", "/etc", "RuntimeError", "KeyError"):
        assert leak not in response.text
    assert any(r.exc_info for r in caplog.records if r.name == "sn1_gateway.web")  # the log keeps it


async def test_an_api_error_raised_in_a_nursery_keeps_its_status(shell: Shell) -> None:
    error = assert_error(await shell.client.get("/test/teapot-in-nursery"), 409, "conflict_error", "conflict")
    assert error["message"] == "Already there."


# --- graceful shutdown --------------------------------------------------------------------------


async def test_shutdown_lets_the_request_in_flight_finish_and_refuses_new_ones(shell: Shell) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            answers: list[httpx.Response] = []

            async def in_flight() -> None:
                answers.append(await shell.client.get("/test/slow"))

            nursery.start_soon(in_flight)
            await shell.routes.slow_entered.wait()
            shell.gateway.shutdown()
            assert shell.gateway.services.readiness()["ready"] is False  # what /health/ready now reports
            with trio.move_on_after(0.2) as still_draining:
                await shell.gateway.wait_stopped()
            assert still_draining.cancelled_caught and answers == []
            with pytest.raises(httpx.TransportError):
                async with httpx.AsyncClient(timeout=2) as fresh:
                    await fresh.get(f"{shell.gateway.url}/health")
            shell.routes.release.set()
        (answer,) = answers
        assert answer.status_code == 200 and answer.json() == {"finished": True}
        await shell.gateway.wait_stopped()


async def test_an_idle_keep_alive_connection_does_not_hold_shutdown(gateway_settings: Settings) -> None:
    settings = shell_settings(gateway_settings, drain_timeout_s=30.0)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
            gateway: Gateway = await nursery.start(lambda task_status: run(settings, task_status=task_status))
            assert (await client.get(f"{gateway.url}/health")).status_code == 200  # the connection stays open
            started = trio.current_time()
            gateway.shutdown()
            await gateway.wait_stopped()
            assert trio.current_time() - started < 2.0  # not the 30 s drain deadline


async def test_the_drain_deadline_cuts_off_a_request_that_does_not_finish(gateway_settings: Settings) -> None:
    routes = SteeredRoutes()
    settings = shell_settings(gateway_settings, drain_timeout_s=0.5)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            gateway: Gateway = await nursery.start(
                lambda task_status: run(settings, app_hook=routes.install, task_status=task_status))
            failures: list[Exception] = []

            async def stuck() -> None:
                async with httpx.AsyncClient(timeout=10) as client:
                    try:
                        await client.get(f"{gateway.url}/test/slow")
                    except httpx.TransportError as exc:
                        failures.append(exc)

            nursery.start_soon(stuck)
            await routes.slow_entered.wait()
            started = trio.current_time()
            gateway.shutdown()
            await gateway.wait_stopped()
            assert 0.4 <= trio.current_time() - started < 3.0
        assert len(failures) == 1  # the client saw the connection end, not a made-up answer


# --- the real process: signals ------------------------------------------------------------------

@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(GOOD_CONFIG, encoding="utf-8")
    return path


@pytest.fixture
def serve_process(config_file: Path, tmp_path: Path) -> Iterator[Process]:
    script = Path(sys.executable).with_name("sn1-gateway")
    yield from start_process([str(script), "serve", "--config", str(config_file)], tmp_path)


@pytest.fixture
def slow_process(config_file: Path, tmp_path: Path) -> Iterator[Process]:
    args = [sys.executable, "-c", SLOW_GATEWAY, str(config_file), str(tmp_path / "release")]
    yield from start_process(args, Path(__file__).resolve().parent.parent)


def test_the_real_server_answers_health_and_exits_0_on_sigint_within_2s(serve_process: Process) -> None:
    response = httpx.get(f"{serve_process.url}/health", timeout=10)
    assert response.json() == {"status": "ok"}
    with httpx.Client(timeout=10) as client:  # a keep-alive connection left open does not delay the exit
        assert client.get(f"{serve_process.url}/health/ready").json()["ready"] is True
        started = time.monotonic()
        serve_process.popen.send_signal(signal.SIGINT)
        assert serve_process.popen.wait(10) == 0
    assert time.monotonic() - started < 2.0
    assert serve_process.popen.stderr is not None
    assert "Traceback" not in serve_process.popen.stderr.read()


def test_sigterm_drains_the_request_in_flight_then_exits_0(slow_process: Process, tmp_path: Path) -> None:
    with httpx.Client(timeout=20) as client:
        outcome: list[httpx.Response] = []

        def request() -> None:
            outcome.append(client.get(f"{slow_process.url}/test/slow"))

        worker = threading.Thread(target=request)
        worker.start()
        assert slow_process.read_line() == "slow request entered\n"
        slow_process.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert slow_process.popen.poll() is None  # still draining
        (tmp_path / "release").touch()
        worker.join(20)
    assert outcome[0].status_code == 200 and outcome[0].json() == {"finished": True}
    assert slow_process.popen.wait(10) == 0


def test_a_second_signal_exits_at_once(slow_process: Process) -> None:
    def request() -> None:
        with contextlib.suppress(httpx.TransportError):  # the process is gone: that is the point
            httpx.get(f"{slow_process.url}/test/slow", timeout=30)

    worker = threading.Thread(target=request, daemon=True)
    worker.start()
    assert slow_process.read_line() == "slow request entered\n"
    slow_process.popen.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert slow_process.popen.poll() is None  # draining, with up to 20 s to go
    started = time.monotonic()
    slow_process.popen.send_signal(signal.SIGINT)
    code = slow_process.popen.wait(10)
    assert time.monotonic() - started < 1.0
    assert code == 130
    worker.join(10)


# A gateway whose metagraph read never returns: it stays in start-up until a signal arrives.
STUCK_GATEWAY = textwrap.dedent("""
    import sys, time, trio
    from actors.subnet.actor import StaticSource
    from config.loading import load_settings
    from engine.gateway import serve_until_signalled

    class Stuck(StaticSource):
        def fetch(self):
            print("starting", flush=True)
            time.sleep(60)

    settings = load_settings(sys.argv[1])
    trio.run(lambda: serve_until_signalled(settings, source=Stuck(settings)))
    print("exited", flush=True)
""")


def test_a_signal_during_start_up_stops_it_at_once(config_file: Path) -> None:
    popen = subprocess.Popen([sys.executable, "-c", STUCK_GATEWAY, str(config_file)],
                             cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert popen.stdout is not None and popen.stdout.readline() == "starting\n"
        started = time.monotonic()
        popen.send_signal(signal.SIGINT)
        assert popen.wait(10) == 0
        assert time.monotonic() - started < 2.0
        assert popen.stdout.read() == "exited\n"
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.communicate(timeout=10)


async def test_an_answer_sent_before_the_body_was_read_says_the_connection_closes(shell: Shell) -> None:
    port = int(shell.gateway.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}'
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body))  # no key; the body not sent yet
    answer = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some()
    await stream.aclose()
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 401") and b"\r\nconnection: close" in head
    ok = await shell.client.get("/health")  # a request whose whole body was read keeps its connection
    assert ok.status_code == 200 and ok.headers.get("connection", "").lower() != "close"
