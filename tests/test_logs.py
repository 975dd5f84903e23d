"""Logs an operator can use: `[log]` level and format, a request id in every response and in every log
record of that request (the fan-out's tasks included), one access line per request, and never a key,
a prompt or an answer."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.keystore.records import display_prefix
from config.loading import ConfigError, load_settings
from config.settings import LogSettings
from devnet.miner import MinerTiming
from engine import logs
from tests.observe_support import ADMIN_KEY, start

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
HEX_ID = re.compile(r"[0-9a-f]{32}")


class Captured:
    """What the configured handler wrote, as lines."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["logger"] == "sn1_gateway.access"]

    async def wait_access(self, count: int) -> list[dict[str, Any]]:
        """The access lines once there are `count`: a request's line is written once its response has
        gone out, so the client can have it a moment before."""
        with trio.fail_after(5):
            while len(self.access()) < count:  # noqa: ASYNC110 - a log stream has nothing to wait on
                await trio.sleep(0.01)
        await trio.sleep(0.1)  # and no more come
        return self.access()


@pytest.fixture
def captured() -> Iterator[Captured]:
    """The gateway's own logging set-up, at debug, in JSON, into a buffer; taken out afterwards."""
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", *logs.NOISY)}
    stream = io.StringIO()
    handler = logs.configure(LogSettings(level="debug", format="json"), stream=stream, force=True)
    assert handler is not None
    try:
        yield Captured(stream)
    finally:
        logs.remove(handler)
        for name, level in levels.items():
            (logging.getLogger(name) if name else root).setLevel(level)


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "seed": 7, **extra}


async def read_stream(client: httpx.AsyncClient, body: dict[str, Any],
                      headers: dict[str, str] | None = None) -> tuple[httpx.Response, str]:
    """A streamed chat; the response and the text it carried."""
    text = []
    async with client.stream("POST", CHAT, json={**body, "stream": True}, headers=headers) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    text.append(choice.get("delta", {}).get("content") or "")
    return response, "".join(text)


async def test_every_response_carries_one_request_id_the_clients_when_it_is_a_short_token(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        net = await start(nursery, tmp_path)
        given = await net.client.post(CHAT, json=chat_body("hi"), headers={"X-Request-ID": "client-trace-42"})
        assert given.status_code == 200
        # The chat route names its own id: the response still carries exactly one, the request's.
        assert given.headers.get_list("x-request-id") == ["client-trace-42"]
        streamed, _ = await read_stream(net.client, chat_body("hi"), headers={"X-Request-ID": "trace:stream/1"})
        assert streamed.headers.get_list("x-request-id") == ["trace:stream/1"]
        for bad in ("has space", "x" * 65, "semi;colon", "<script>"):
            response = await net.client.get("/health", headers={"X-Request-ID": bad})
            (new,) = response.headers.get_list("x-request-id")
            assert HEX_ID.fullmatch(new), (bad, new)
        ids = set()
        for path in ("/health", "/no/such/path", "/metrics"):
            response = await net.client.get(path)
            (new,) = response.headers.get_list("x-request-id")
            assert HEX_ID.fullmatch(new)
            ids.add(new)
        assert len(ids) == 3
        error = await net.client.post(CHAT, content=b"{not json", headers={"X-Request-ID": "bad-json-1"})
        assert error.status_code == 400 and error.headers["x-request-id"] == "bad-json-1"


async def test_log_records_of_a_request_carry_its_id_also_those_of_the_fanouts_tasks(
        nursery: trio.Nursery, tmp_path: Path, captured: Captured) -> None:
    # uid 0 answers first and drops its connection halfway; uid 1 starts later with the same text and
    # takes over. The takeover is logged in the fan-out's own task, not in the handler.
    timing = MinerTiming(first_token_s=0.02, token_s=0.002, slow_first_token_s=0.3)
    with trio.fail_after(60):
        net = await start(nursery, tmp_path, faults=("stop_mid_stream", "slow_first_token"), timing=timing)
        response, text = await read_stream(net.client, chat_body("count for me", uids=[0, 1]),
                                           headers={"X-Request-ID": "takeover-1"})
        assert response.status_code == 200 and text
        other = await net.client.get("/health")
        await net.gateway.services.fanout.wait_idle()
        await captured.wait_access(2)
    records = captured.records()
    takeover = [r for r in records if "takes over" in r["message"]]
    assert len(takeover) == 1, [r["message"] for r in records]
    assert takeover[0]["logger"] == "sn1_gateway.fanout" and takeover[0]["request_id"] == "takeover-1"
    # The fan-out itself has the request's id, so its own lines name the id the client holds.
    assert takeover[0]["message"].startswith("request takeover-1: uid 1 takes over the stream from uid 0")
    (line,) = [r for r in captured.access() if r["request_id"] == "takeover-1"]
    assert (line["method"], line["path"], line["status"]) == ("POST", CHAT, 200)
    assert line["miners"] == [0, 1] and line["winner"] == 1  # the miner that finished the answer
    assert line["ttft_ms"] >= 20  # the first token came from uid 0, 20 ms after it was asked
    (health,) = [r for r in captured.access() if r["request_id"] == other.headers["x-request-id"]]
    assert health["path"] == "/health" and health["miners"] == [] and health["winner"] is None


async def test_one_access_line_per_request_in_json_and_in_text(
        nursery: trio.Nursery, tmp_path: Path, captured: Captured) -> None:
    with trio.fail_after(60):
        net = await start(nursery, tmp_path)
        prefix = display_prefix(net.key)
        answered = await net.client.post(CHAT, json=chat_body("hello"))
        assert answered.status_code == 200
        streamed, _ = await read_stream(net.client, chat_body("hello again"))
        assert streamed.status_code == 200
        refused = await net.client.get("/v1/models", headers={"api-key": "sn1-unknownunknownunknownunknown00"})
        missing = await net.client.get("/web_retrieval", params={"search_query": "x", "uids": "99"})
        admin = await net.client.get("/api_management/keys", headers={"admin-key": ADMIN_KEY, "api-key": ""})
        await net.gateway.services.fanout.wait_idle()
        lines = {r["request_id"]: r for r in await captured.wait_access(5)}
        assert len(captured.access()) == len(lines) == 5

        text_stream = io.StringIO()
        handler = logs.configure(LogSettings(level="info", format="text"), stream=text_stream, force=True)
        assert handler is not None
        in_text = await net.client.post(CHAT, json=chat_body("hello"), headers={"X-Request-ID": "as-text"})
        with trio.fail_after(5):
            while "[as-text]" not in text_stream.getvalue():  # noqa: ASYNC110 - as above
                await trio.sleep(0.01)
    one = lines[answered.headers["x-request-id"]]
    assert one["level"] == "info" and one["time"].endswith("Z")
    assert {k: one[k] for k in ("method", "path", "status", "key")} == {
        "method": "POST", "path": CHAT, "status": 200, "key": prefix}
    assert sorted(one["miners"]) == [0, 1]  # in the order they were picked
    assert one["winner"] in (0, 1) and 20 <= one["ttft_ms"] <= one["duration_ms"]
    stream_line = lines[streamed.headers["x-request-id"]]
    assert stream_line["status"] == 200 and stream_line["winner"] in (0, 1) and stream_line["ttft_ms"] >= 20
    bad = lines[refused.headers["x-request-id"]]
    assert (bad["path"], bad["status"], bad["key"], bad["miners"], bad["ttft_ms"]) == (
        "/v1/models", 401, "sn1-unkn", [], None)
    assert lines[missing.headers["x-request-id"]]["status"] == 400
    assert (lines[admin.headers["x-request-id"]]["path"], lines[admin.headers["x-request-id"]]["key"]) == (
        "/api_management/keys", None)
    assert in_text.status_code == 200
    (text_line,) = [line for line in text_stream.getvalue().splitlines() if "sn1_gateway.access" in line]
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO sn1_gateway\.access \[as-text\]: POST {CHAT} 200 "
        rf"[\d.]+ms key={re.escape(prefix)} miners=(0,1|1,0) winner=[01] ttft=[\d.]+ms", text_line), text_line


async def test_no_key_prompt_or_answer_is_ever_logged(
        nursery: trio.Nursery, tmp_path: Path, captured: Captured) -> None:
    prompt = "zebra-quartz-prompt-5561 tell me a secret"
    query = "violet-harbor-query-9034"
    with trio.fail_after(60):
        net = await start(nursery, tmp_path)
        other_key, _ = await net.gateway.services.keys.create(10)
        secrets = [net.key, other_key, ADMIN_KEY, prompt, query]
        _, streamed = await read_stream(net.client, chat_body(prompt))
        whole = await net.client.post(CHAT, json=chat_body(prompt + " again"), headers={
            "api-key": "", "Authorization": f"Bearer {net.key}"})
        assert whole.status_code == 200
        secrets += [streamed, whole.json()["choices"][0]["message"]["content"]]
        await net.client.post(CHAT, json=chat_body(prompt, mixture=True))
        await net.client.get("/web_retrieval", params={"search_query": query, "n_results": 2})
        await net.client.post("/web_retrieval", json={"search_query": query})
        admin = {"admin-key": ADMIN_KEY}
        for prefix in ("/api_management", ""):
            await net.client.put(f"{prefix}/modify-api-key/{other_key}", params={"rate_limit": 9}, headers=admin)
            await net.client.get(f"{prefix}/modify-api-key/{other_key}", headers=admin)  # 405: unmatched
            await net.client.delete(f"{prefix}/delete-api-key/{other_key}", headers={"admin-key": "wrong"})
        await net.client.get(f"/{net.key}")  # a key where a path should be: 404
        await net.client.get("/status/data", headers=admin)
        await net.gateway.services.fanout.wait_idle()
        assert len(await captured.wait_access(13)) == 13
    assert all(len(s) > 8 for s in secrets)
    assert display_prefix(net.key) in captured.stream.getvalue()  # the prefix names the key instead
    for line in captured.lines:
        for secret in secrets:
            assert secret not in line, (secret, line)


async def test_the_level_leaves_out_what_is_below_it() -> None:
    stream = io.StringIO()
    root_level = logging.getLogger().level
    handler = logs.configure(LogSettings(level="warning", format="json"), stream=stream, force=True)
    assert handler is not None
    try:
        logging.getLogger("sn1_gateway.access").info("not written")
        logging.getLogger("sn1_gateway").warning("written")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("sn1_gateway").exception("with a traceback")
    finally:
        logs.remove(handler)
        logging.getLogger().setLevel(root_level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["message"] for r in records] == ["written", "with a traceback"]
    assert records[1]["level"] == "error" and "ValueError: boom" in records[1]["exception"]
    assert records[0]["request_id"] is None


def test_log_settings_are_checked_like_every_other(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[log]\nlevel = "warning"\nformat = "json"\n', encoding="utf-8")
    assert load_settings(path).log == LogSettings(level="warning", format="json")
    path.write_text('[log]\nformat = "yaml"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"log\.format.*\"text\", \"json\".*yaml"):
        load_settings(path)


def test_serve_logs_in_the_configured_format_from_its_start(tmp_path: Path) -> None:
    """`sn1-gateway serve` as an operator runs it, with `[log] format = "json"`: every line on standard
    error is one JSON object, the access line of a request among them."""
    config = tmp_path / "gw.toml"
    config.write_text(
        '[server]\nport = 0\n[wallet]\nuri = "//Alice"\n[subnet]\nsource = "static"\n'
        '[availability]\nsource = "none"\n[scoring]\nenabled = false\n[log]\nformat = "json"\n',
        encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--config", str(config)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        url = re.search(r"listening on (http://\S+)", banner)
        assert url, banner
        response = httpx.get(f"{url.group(1)}/health", headers={"X-Request-ID": "from-the-cli"}, timeout=10)
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]  # every line parses
    (access,) = [r for r in records if r["logger"] == "sn1_gateway.access"]
    assert (access["request_id"], access["path"], access["status"]) == ("from-the-cli", "/health", 200)
