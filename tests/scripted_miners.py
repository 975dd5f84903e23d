"""Miners that follow scripts, behind an httpx.MockTransport (no sockets, autojump-friendly)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import trio

Script = list[tuple[float, str]]  # (delay before, SSE text)


def chunk(text: str | None, finish: str | None = None) -> str:
    delta = {} if text is None else {"content": text}
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


DONE = "data: [DONE]\n\n"


def answer(words: list[str], *, first_delay: float = 0.0, step: float = 0.01, finish: str = "stop") -> Script:
    script: Script = [(first_delay, chunk(words[0]))]
    script += [(step, chunk(w)) for w in words[1:]]
    return [*script, (0.0, chunk(None, finish)), (0.0, DONE)]


class Miners:
    """A MockTransport whose miners follow scripts, keyed by axon port."""

    def __init__(self) -> None:
        self.scripts: dict[int, Script | int] = {}  # port -> script, or an HTTP status to answer
        self.header_delay: dict[int, float] = {}
        self.received: list[httpx.Request] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.received.append(request)
        port = request.url.port or 80
        await trio.sleep(self.header_delay.get(port, 0.0))
        script = self.scripts[port]
        if isinstance(script, int):
            if script == 0:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(script, json={"detail": "boom"})

        async def body() -> AsyncIterator[bytes]:
            for delay, text in script:
                await trio.sleep(delay)
                if text == "BREAK":
                    raise httpx.ReadError("connection reset", request=request)
                yield text.encode()

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})
