"""Miners that follow scripts, behind an httpx.MockTransport (no sockets, autojump-friendly)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

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


def vllm_chunk(text: str | None = None, *, role: bool = False, finish: str | None = None,
               logprob: float = -0.25, **extra: Any) -> str:
    """A chunk as vLLM streams it: content chunks carry `logprobs.content`, a role-only chunk none."""
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    if text is not None:
        delta["content"] = text
        choice["logprobs"] = {"content": [{
            "token": text, "logprob": logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": text, "logprob": logprob, "bytes": list(text.encode())},
                             {"token": "x", "logprob": -3.0, "bytes": [120]},
                             {"token": "y", "logprob": -4.0, "bytes": [121]}]}]}
    body = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 1, "model": "served-model",
            "choices": [choice], **extra}
    return "data: " + json.dumps(body) + "\n\n"


def vllm_answer(words: list[str], *, role_chunk: bool = True, finish_with_last: bool = True,
                usage: bool = True, done: bool = True, first_delay: float = 0.0, step: float = 0.01,
                finish: str = "stop") -> Script:
    """A whole answer in vLLM's shape: an optional role-only chunk, content chunks with logprobs (the
    last one carrying the finish_reason, or a separate finish chunk), an optional usage chunk with no
    choices, and an optional [DONE]."""
    script: Script = [(first_delay, vllm_chunk(role=True))] if role_chunk else []
    for i, word in enumerate(words):
        last = i == len(words) - 1
        delay = (0.0 if role_chunk else first_delay) if i == 0 else step
        script.append((delay, vllm_chunk(word, finish=finish if last and finish_with_last else None)))
    if not finish_with_last:
        script.append((0.0, vllm_chunk(finish=finish)))
    if usage:
        counts = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        script.append((0.0, "data: " + json.dumps({"id": "chatcmpl-vllm", "choices": [], "usage": counts}) + "\n\n"))
    if done:
        script.append((0.0, DONE))
    return script
