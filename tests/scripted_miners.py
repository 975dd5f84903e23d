"""Miners that follow scripts: real HTTP servers on loopback, reached through the gateway's own
outbound pool (the production path), or the same scripts behind an httpx.MockTransport.

Scripts are keyed by a logical port (9001 for uid 1, ...); on loopback each logical port is served on a
free real one, and `neuron(uid)` gives the neuron pointing at it. The servers keep connections alive
between requests, as miners do, and a script's "BREAK" resets the connection mid-answer.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import trio
from bittensor_core import Keypair

from wire.metagraph import Neuron

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
    """Miners that follow scripts, keyed by logical axon port (9000 + uid)."""

    def __init__(self) -> None:
        self.scripts: dict[int, Script | int] = {}  # port -> script, or an HTTP status to answer (0: refuse)
        self.header_delay: dict[int, float] = {}
        self.received: list[httpx.Request] = []  # as they arrived, with the logical port in their URL
        self.ports: dict[int, int] = {}  # logical port -> the real one, once served on loopback

    # -- on loopback ---------------------------------------------------------------------------

    async def serve(self, nursery: trio.Nursery, uids: range | list[int]) -> None:
        """Serve the miners of `uids` on free loopback ports."""
        for uid in uids:
            logical = 9000 + uid
            listeners = await nursery.start(partial(trio.serve_tcp, partial(self._connection, logical=logical), 0,
                                                    host="127.0.0.1"))
            self.ports[logical] = listeners[0].socket.getsockname()[1]

    def axon(self, uid: int) -> str:
        port = self.ports.get(9000 + uid)
        return f"127.0.0.1:{port}" if port is not None else f"127.0.0.1:{9000 + uid}"

    def neuron(self, uid: int, incentive: float = 0.1) -> Neuron:
        return Neuron(uid=uid, hotkey=Keypair.create_from_uri(f"//miner{uid}").ss58_address, axon=self.axon(uid),
                      incentive=incentive)

    async def _connection(self, stream: trio.SocketStream, *, logical: int) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            buffer = b""
            while True:
                request, buffer = await _read_request(stream, buffer, logical)
                if request is None:
                    return
                self.received.append(request)
                await trio.sleep(self.header_delay.get(logical, 0.0))
                script = self.scripts[logical]
                if isinstance(script, int):
                    if script == 0:
                        _reset(stream)
                        return
                    body = json.dumps({"detail": "boom"}).encode()
                    await stream.send_all(b"HTTP/1.1 %d Scripted\r\nContent-Type: application/json\r\n"
                                          b"Content-Length: %d\r\n\r\n%s" % (script, len(body), body))
                    continue
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n")
                for delay, text in script:
                    await trio.sleep(delay)
                    if text == "BREAK":
                        _reset(stream)
                        return
                    data = text.encode()
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))
                await stream.send_all(b"0\r\n\r\n")

    # -- behind a MockTransport ----------------------------------------------------------------

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


async def _read_request(stream: trio.SocketStream, buffer: bytes, logical: int) -> tuple[httpx.Request | None, bytes]:
    """The next request on a kept connection (head and Content-Length body); None when it closed."""
    while b"\r\n\r\n" not in buffer:
        more = await stream.receive_some(65536)
        if not more:
            return None, b""
        buffer += more
    head, _, rest = buffer.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = [tuple(line.split(": ", 1)) for line in lines]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    while len(rest) < length:
        more = await stream.receive_some(65536)
        if not more:
            return None, b""
        rest += more
    request = httpx.Request(method, f"http://127.0.0.1:{logical}{target}", headers=headers, content=rest[:length])
    return request, rest[length:]


def _reset(stream: trio.SocketStream) -> None:
    """Drop the connection with a reset, as a miner that dies mid-answer does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


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
