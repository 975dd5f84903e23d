"""The chat route answered as plain ASGI, in front of the Quart app (`web.chat.chat_entry`): what Quart did
for it, it still does — the body's bounds in size and time, the client leaving, and the headers of an
answer in the order Quart sent them. Driven over ASGI (no socket), inside the server's wrapper."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from actors.keystore.records import Grant
from tests.chat_stack import open_stack
from tests.scripted_miners import answer
from web.chat import Finish, stream_response
from web.chat_request import parse_chat_request
from web.errors import encode_headers, json_response

CHAT = "/v1/chat/completions"
BODY = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()


def scope_for(key: str, *, length: int, path: str = CHAT) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2), "extensions": {},
            "headers": [(b"host", b"x"), (b"content-type", b"application/json"), (b"api-key", key.encode()),
                        (b"content-length", str(length).encode())]}


class Exchange:
    """One request: its body sent in `parts` (then nothing more until `leave`), what the app sent back."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = list(parts)
        self.gone = trio.Event()
        self.messages: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.parts:
            part = self.parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": part != BODY}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.gone.set()

    @property
    def start(self) -> dict[str, Any]:
        (start,) = [m for m in self.messages if m["type"] == "http.response.start"]
        return start

    @property
    def body(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"))


async def test_a_body_that_stops_coming_is_a_408_after_quarts_body_timeout(
        tmp_path: Path, nursery: trio.Nursery, stack_clock: trio.abc.Clock) -> None:
    async with open_stack(tmp_path, nursery) as opened:
        exchange = Exchange([BODY[:10]])  # and then nothing
        started = trio.current_time()
        with trio.fail_after(120):
            await opened.gateway_app(scope_for(opened.key, length=len(BODY)), exchange.receive, exchange.send)
        assert 60 <= trio.current_time() - started < 61
        assert exchange.start["status"] == 408 and exchange.body["error"]["code"] == "http_error"
        assert (b"connection", b"close") in exchange.start["headers"]  # the rest of the body never came
        assert not [name for name, _ in exchange.start["headers"] if name.startswith(b"x-ratelimit-")]  # as Quart


async def test_a_body_declared_over_the_limit_is_a_413_before_it_is_read(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    async with open_stack(tmp_path, nursery) as opened:
        limit = opened.gateway.services.settings.server.max_body_bytes
        exchange = Exchange([])  # the body never comes: the answer does not wait for it
        with trio.fail_after(5):
            await opened.gateway_app(scope_for(opened.key, length=limit + 1), exchange.receive, exchange.send)
        assert exchange.start["status"] == 413
        assert exchange.body["error"] == {"message": f"The request body is larger than {limit} bytes.",
                                          "type": "invalid_request_error", "param": None,
                                          "code": "request_too_large"}
        assert (b"connection", b"close") in exchange.start["headers"]


async def test_a_client_leaving_while_its_body_comes_gets_nothing_and_holds_nothing(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    async with open_stack(tmp_path, nursery) as opened:
        exchange = Exchange([BODY[:10]])
        exchange.gone.set()  # the connection closes after the first part
        with trio.fail_after(5):
            await opened.gateway_app(scope_for(opened.key, length=len(BODY)), exchange.receive, exchange.send)
        assert exchange.messages == []
        assert opened.gateway.services.fanout.jobs_serving == 0


async def test_an_answer_carries_the_headers_quart_sent_in_their_order(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    async with open_stack(tmp_path, nursery) as opened:
        for port in (9001, 9002, 9003):
            opened.miners.scripts[port] = answer(["An", " answer"])
        for path in ("/v1/chat/completions", "/chat/completions"):
            exchange = Exchange([BODY])
            with trio.fail_after(10):
                await opened.gateway_app(scope_for(opened.key, length=len(BODY), path=path), exchange.receive,
                                         exchange.send)
            assert exchange.start["status"] == 200, exchange.body
            headers = exchange.start["headers"]
            limits = {name.decode(): value.decode() for name, value in headers if name.startswith(b"x-ratelimit-")}
            body = b"".join(m.get("body", b"") for m in exchange.messages if m["type"] == "http.response.body")
            quart = json_response(exchange.body, headers={name.title(): value for name, value in limits.items()})
            assert await quart.get_data() == body
            assert headers == encode_headers(quart.headers)  # type: ignore[arg-type]


async def test_an_absolute_form_target_is_answered_as_its_path(tmp_path: Path, nursery: trio.Nursery) -> None:
    """`POST http://host/v1/chat/completions` (how a forward proxy asks) reached Quart's placeholder
    rule, a 500 with a traceback in the log for every such request."""
    async with open_stack(tmp_path, nursery) as opened:
        for port in (9001, 9002, 9003):
            opened.miners.scripts[port] = answer(["hi", " there"])
        exchange = Exchange([BODY])
        with trio.fail_after(10):
            await opened.gateway_app(scope_for(opened.key, length=len(BODY), path=f"http://x{CHAT}"),
                                     exchange.receive, exchange.send)
        assert exchange.start["status"] == 200
        assert exchange.body["choices"][0]["message"]["content"] == "hi there"


async def test_an_api_error_in_a_nursery_keeps_its_status() -> None:
    """As Quart-Trio's error handler unwraps a nursery's group, so does the plain ASGI boundary."""
    from web.errors import ApiError, errors_answered

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def refuse() -> None:
        raise ApiError(429, "Slow down.", code="rate_limited")

    async with errors_answered(send), trio.open_nursery() as inner:
        inner.start_soon(refuse)
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 429
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert body["error"]["code"] == "rate_limited"


async def test_a_streamed_answer_closes_its_batches_when_it_ends() -> None:
    """The body stops reading the batches at the answer's end; the stream closes them there (left to
    the collector, an unfinished async generator's finalizer costs a task of trio's)."""
    closed: list[bool] = []

    async def batches() -> Any:
        try:
            yield (Finish("stop", {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}),)
            yield ()  # never asked for
        finally:
            closed.append(True)

    request = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "stream": True},
                                 default_model="m")
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await stream_response(send, Grant("k", "p", 10, 9, 60), request, batches())
    assert closed == [True]
    assert sent[0]["status"] == 200 and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert b"[DONE]" in b"".join(m.get("body", b"") for m in sent)
