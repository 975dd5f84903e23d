"""A simulated miner: a real HTTP server on loopback that speaks the miner protocol, with fault modes.

`POST /v1/chat/completions` streams OpenAI chunks (one token per chunk, with logprobs), or for
`WebRetrievalTask` one chunk whose text is a JSON array of web results; `POST /availability` answers
what it serves. Every request must carry valid Epistula headers from a known signer. The fault mode is
read per request and can be changed at run time (`set_fault`).
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from bittensor_core import Keypair
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, request
from quart_trio import QuartTrio

from config.loading import ConfigError
from devnet import text
from devnet.listener import Listener
from devnet.receiving import Inbox, Received, error_response, json_response
from engine.sse import DONE_EVENT, encode_event
from engine.subnet import Neuron

DEFAULT_TASKS = ("InferenceTask", "WebRetrievalTask")
DEFAULT_MODELS = ("hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",)
DEFAULT_RESULTS = 5
MAX_RESULTS = 50
MAX_BODY_BYTES = 4 * 1024 * 1024


class MinerFault(enum.StrEnum):
    """How a miner misbehaves. The values are what `devnet.faults` and `--faults` accept."""

    HEALTHY = ""
    SLOW_FIRST_TOKEN = "slow_first_token"  # waits `slow_first_token_s` before the first chunk
    SLOW_TOKENS = "slow_tokens"  # waits `slow_token_s` between chunks
    HTTP_500 = "http_500"  # answers 500 with a JSON error
    REFUSE = "refuse"  # nobody listens on its axon: connections are refused
    HANG_AFTER_HEADERS = "hang_after_headers"  # sends 200 and headers, then never a body byte
    STOP_MID_STREAM = "stop_mid_stream"  # drops the connection after half the chunks
    INVALID_JSON = "invalid_json"  # its first event is not JSON
    NO_DONE = "no_done"  # ends the stream cleanly without `data: [DONE]`
    BENCH = "bench"  # a fixed-length answer at once, no delays (for benchmarks)


def parse_faults(values: Iterable[str], *, key: str = "devnet.faults") -> tuple[MinerFault, ...]:
    """Fault names from the config file or the command line; an unknown name is a ConfigError."""
    faults = []
    for i, value in enumerate(values):
        try:
            faults.append(MinerFault(value.strip()))
        except ValueError:
            choices = ", ".join(repr(f.value) for f in MinerFault)
            raise ConfigError(f"{key}[{i}]: expected one of {choices}, found {value!r}") from None
    return tuple(faults)


@dataclass(frozen=True)
class MinerTiming:
    """The delays of a miner's answer; slow modes replace the normal delay by the slow one."""

    first_token_s: float = 0.02
    token_s: float = 0.002
    slow_first_token_s: float = 5.0
    slow_token_s: float = 0.5
    bench_tokens: int = 16


class StreamStopped(Exception):
    """Raised inside a response body to drop the connection mid-stream (the `stop_mid_stream` fault)."""


class _DropOnStop:
    """ASGI wrapper: a body that raises StreamStopped ends as a dropped connection, without an error log."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        try:
            await self.app(scope, receive, send)
        except* StreamStopped:
            pass


class Miner:
    def __init__(
        self,
        uid: int,
        *,
        signers: Iterable[str],
        fault: MinerFault | str = MinerFault.HEALTHY,
        timing: MinerTiming | None = None,
        tasks: Sequence[str] = DEFAULT_TASKS,
        models: Sequence[str] = DEFAULT_MODELS,
        incentive: float = 0.0,
        stake: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int = 100,
    ) -> None:
        self.uid = uid
        self.keypair = Keypair.create_from_uri(f"//devnet/miner/{uid}")
        self.hotkey: str = self.keypair.ss58_address
        self.timing = timing or MinerTiming()
        self.tasks = tuple(tasks)
        self.models = tuple(models)
        self.incentive = incentive
        self.stake = stake
        self.fault = MinerFault(fault)
        self.inbox = Inbox(self.hotkey, signers, keep=keep)
        self.listener = Listener(self._app(), host=host, port=port, name=f"miner {uid}")
        if self.fault is MinerFault.REFUSE:
            self.listener.go_down_nowait()

    @property
    def address(self) -> str:
        return self.listener.address

    @property
    def received(self) -> Sequence[Received]:
        """The last requests it received (oldest first), rejected ones included."""
        return self.inbox.received

    def neuron(self) -> Neuron:
        return Neuron(uid=self.uid, hotkey=self.hotkey, axon=self.address, incentive=self.incentive,
                      stake=self.stake)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await self.listener.run(task_status=task_status)

    def set_fault_nowait(self, fault: MinerFault | str) -> None:
        """Change the fault mode; the next request sees it ("refuse" stops listening on the next checkpoint)."""
        self.fault = MinerFault(fault)
        if self.fault is MinerFault.REFUSE:
            self.listener.go_down_nowait()
        else:
            self.listener.come_up_nowait()

    async def set_fault(self, fault: MinerFault | str) -> None:
        """Change the fault mode and wait until the listener is down (for "refuse") or up (otherwise)."""
        self.set_fault_nowait(fault)
        await self.listener.wait_listening(self.fault is not MinerFault.REFUSE)

    # -- HTTP ----------------------------------------------------------------------------------------

    def _app(self) -> QuartTrio:
        app = QuartTrio(f"devnet_miner_{self.uid}")
        app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
        app.add_url_rule("/v1/chat/completions", "chat", self._chat, methods=["POST"])
        app.add_url_rule("/availability", "availability", self._availability, methods=["POST"])
        app.asgi_app = _DropOnStop(app.asgi_app)  # type: ignore[method-assign]
        return app

    async def _chat(self) -> Response:
        raw, rejection = await self.inbox.take()
        if rejection is not None:
            return rejection
        body, rejection = self.inbox.parse(raw)
        if rejection is not None:
            return rejection
        if not isinstance(body, dict):
            self.inbox.record(raw, 400)
            return error_response(400, "the body must be a JSON object", "invalid_body")
        fault = self.fault
        if fault is MinerFault.HTTP_500:
            self.inbox.record(raw, 500)
            return error_response(500, f"miner {self.uid} failed (simulated)", "simulated_failure")
        self.inbox.record(raw, 200)
        task = body.get("task") or request.headers.get("task") or "InferenceTask"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = self.models[0] if self.models else "devnet"
        if task == "WebRetrievalTask":
            pieces = [self._web_results(body)]
            logprobs: list[dict[str, Any] | None] = [None]
            finish = "stop"
        else:
            if fault is MinerFault.BENCH:
                answer = text.fixed_answer(body.get("seed"), body.get("messages"), self.timing.bench_tokens,
                                           text.max_tokens_of(body))
            else:
                answer = text.answer(body.get("seed"), body.get("messages"), text.max_tokens_of(body))
            pieces = [t.text for t in answer.tokens]
            logprobs = [t.logprobs() for t in answer.tokens]
            finish = answer.finish_reason
        chunks = ChunkMaker(f"chatcmpl-devnet-{self.uid}-{request.headers.get('epistula-uuid', '')[:8]}", model)
        response = Response(self._events(fault, chunks, pieces, logprobs, finish),
                            content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response.timeout = None  # hang and slow modes outlive Quart's default response timeout
        return response

    def _web_results(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        query = ""
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    query = str(message.get("content") or "")
                    break
        wanted = body.get("target_results", request.headers.get("target_results"))
        try:
            count = int(wanted) if wanted is not None else DEFAULT_RESULTS
        except (TypeError, ValueError):
            count = DEFAULT_RESULTS
        return json.dumps(text.search_results(query, self.uid, max(0, min(count, MAX_RESULTS))))

    async def _events(self, fault: MinerFault, chunks: ChunkMaker, pieces: Sequence[str],
                      logprobs: Sequence[dict[str, Any] | None], finish: str) -> AsyncIterator[bytes]:
        numbered = list(enumerate(zip(pieces, logprobs, strict=True)))
        if fault is MinerFault.BENCH:  # the whole answer in one write
            yield b"".join([*(chunks.content(piece, lp, i == 0) for i, (piece, lp) in numbered),
                            chunks.finish(finish), DONE_EVENT])
            return
        if fault is MinerFault.HANG_AFTER_HEADERS:
            await trio.sleep_forever()
        timing = self.timing
        first_s = timing.slow_first_token_s if fault is MinerFault.SLOW_FIRST_TOKEN else timing.first_token_s
        step_s = timing.slow_token_s if fault is MinerFault.SLOW_TOKENS else timing.token_s
        stop_at = len(pieces) // 2 if fault is MinerFault.STOP_MID_STREAM else None
        await trio.sleep(first_s)
        if fault is MinerFault.INVALID_JSON:
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "broken\n\n'
        for i, (piece, lp) in numbered:
            if i == stop_at:
                raise StreamStopped(f"miner {self.uid} stops mid-stream (simulated)")
            if i > 0:
                await trio.sleep(step_s)
            yield chunks.content(piece, lp, i == 0)
        if stop_at is not None:  # nothing to cut: still drop the connection before the end
            raise StreamStopped(f"miner {self.uid} stops mid-stream (simulated)")
        yield chunks.finish(finish)
        if fault is not MinerFault.NO_DONE:
            yield DONE_EVENT

    async def _availability(self) -> Response:
        raw, rejection = await self.inbox.take()
        if rejection is not None:
            return rejection
        body, rejection = self.inbox.parse(raw)
        if rejection is not None:
            return rejection
        if self.fault is MinerFault.HTTP_500:
            self.inbox.record(raw, 500)
            return error_response(500, f"miner {self.uid} failed (simulated)", "simulated_failure")
        self.inbox.record(raw, 200)
        asked_tasks = body.get("task_availabilities") if isinstance(body, dict) else None
        asked_models = body.get("llm_model_availabilities") if isinstance(body, dict) else None
        tasks = set(self.tasks) | set(asked_tasks if isinstance(asked_tasks, dict) else ())
        models = set(self.models) | set(asked_models if isinstance(asked_models, dict) else ())
        return json_response({
            "task_availabilities": {t: t in self.tasks for t in sorted(tasks)},
            "llm_model_availabilities": {m: m in self.models for m in sorted(models)},
        })


class ChunkMaker:
    """OpenAI `chat.completion.chunk` events of one answer."""

    def __init__(self, chunk_id: str, model: str) -> None:
        self.head = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model}

    def content(self, piece: str, logprobs: dict[str, Any] | None, first: bool) -> bytes:
        delta = {"role": "assistant", "content": piece} if first else {"content": piece}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return encode_event({**self.head, "choices": [choice]})

    def finish(self, reason: str) -> bytes:
        return encode_event({**self.head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
