"""A simulated miner: a real HTTP server on loopback that speaks the miner protocol, with fault modes.

`POST /v1/chat/completions` streams OpenAI chunks as vLLM writes them (one token per chunk, with
logprobs), or for `WebRetrievalTask` one chunk whose text is a JSON array of web results; `POST
/availability` answers what it serves. Every request must carry valid Epistula headers from a known
signer, and `sampling_parameters` must hold only numbers and booleans (else 422, as pydantic-based
miners answer). How a stream is shaped (a role-only first chunk, the finish in the last token's chunk,
a usage chunk, `[DONE]`) differs between deployed miners: each simulated miner has a `MinerStyle`,
by default derived from its uid (see `MinerStyle.for_uid`). The fault mode is read per request and can
be changed at run time (`set_fault`). The gateway's deep-research prompts get scripted answers, valid
for each step (`devnet/research.py`); every other prompt its ordinary answer.
"""

from __future__ import annotations

import enum
import json
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from bittensor_core import Keypair
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, request
from quart_trio import QuartTrio

from config.loading import ConfigError
from devnet import research, text
from devnet.listener import Listener
from devnet.receiving import Inbox, Received, error_response, json_response
from wire.metagraph import Neuron
from wire.sse import DONE_EVENT, encode_event

DEFAULT_TASKS = ("InferenceTask", "WebRetrievalTask")
DEFAULT_MODELS = ("mrfakename/mistral-small-3.1-24b-instruct-2503-hf",  # upstream v2.19's "Default"
                  "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4")
DEFAULT_RESULTS = 5
MAX_RESULTS = 50
MAX_BODY_BYTES = 4 * 1024 * 1024
ENDLESS_PIECE = b"a" * 65_536  # what `endless_line` adds to its line at each step
FLOOD_CONTENT = "flood " * 10_000  # 60,000 characters of content per `flood` event
DEEP_LEVELS = 100_000  # how deep the `deep_json` chunk nests
GZIP_BOMB_BYTES = 3 << 30  # what the `gzip_bomb` body inflates to (3 GiB; its gzip stream is about 3 MB)
BOMB_BLOCK = bytes(1 << 20)  # the zeros compressed per step: 1 MiB, about 1 KB compressed
BOMB_BLOCKS_PER_WRITE = 16
HUGE_TOKENS = 2**64 - 1  # the largest count an unsigned 64-bit parser still reads


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
    # Hostile miners, for the gateway's own defences. Each stops when the connection closes, and holds
    # no more than one event's worth of bytes however long it goes on.
    ENDLESS_LINE = "endless_line"  # 200, then one `data:` line that never ends: bytes forever, steadily
    FLOOD = "flood"  # valid content events of 60 KB each, forever
    TOOL_CALLS = "tool_calls"  # a normal answer whose chunks also carry `delta.tool_calls` and unknown
    #                            fields in `logprobs`, ending with finish_reason "tool_calls"
    HUGE_USAGE = "huge_usage"  # a normal answer, then a usage chunk claiming 2**64-1 completion tokens
    DEEP_JSON = "deep_json"  # its first chunk nests 100,000 deep, then a normal answer
    GZIP_BOMB = "gzip_bomb"  # answers `/availability` with `Content-Encoding: gzip`: about 3 MB that
    #                          inflate to 3 GiB of zeros (chat is answered normally)
    RESEARCH_BAD_JSON = "research_bad_json"  # answers each deep-research step that asks for JSON with
    #                                          a cut-short Python dict printout (other prompts normally)


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
    flood_interval_s: float = 0.01  # between the steps of `endless_line` and `flood` (about 6 MB/s)


@dataclass(frozen=True)
class MinerStyle:
    """How a miner shapes its stream. Deployed miners (vLLM behind the reference miner, and others)
    differ in exactly these ways, and a gateway must take every shape.

    `role_chunk`: a first chunk `{"delta": {"role": "assistant", "content": ""}}` without logprobs
    (else the role rides on the first content chunk). `finish_with_last_token`: the finish_reason comes
    in the chunk of the last token (else in a separate chunk with an empty delta). `usage_chunk`: a
    chunk with `"choices": []` and `usage` before the end. `done`: `data: [DONE]` ends the stream (else
    the body just ends).
    """

    role_chunk: bool = True
    finish_with_last_token: bool = False
    usage_chunk: bool = True
    done: bool = True

    @classmethod
    def for_uid(cls, uid: int) -> MinerStyle:
        """The default style of uid `uid`, repeating every 5 uids, so that any 5 consecutive miners have
        every pair of these choices in both values (a 5-miner devnet meets each combination of two):

        | uid % 5 | role_chunk | finish_with_last_token | usage_chunk | done |
        |---|---|---|---|---|
        | 0 | yes | no  | yes | yes |  (vLLM as the reference miner runs it)
        | 1 | yes | yes | no  | no  |
        | 2 | no  | yes | yes | yes |
        | 3 | no  | no  | yes | no  |
        | 4 | no  | no  | no  | yes |  (the plain shape of docs/protocol.md, "What a miner answers")
        """
        return _STYLES[uid % len(_STYLES)]


_STYLES = (
    MinerStyle(role_chunk=True, finish_with_last_token=False, usage_chunk=True, done=True),
    MinerStyle(role_chunk=True, finish_with_last_token=True, usage_chunk=False, done=False),
    MinerStyle(role_chunk=False, finish_with_last_token=True, usage_chunk=True, done=True),
    MinerStyle(role_chunk=False, finish_with_last_token=False, usage_chunk=True, done=False),
    MinerStyle(role_chunk=False, finish_with_last_token=False, usage_chunk=False, done=True),
)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a miner is about to stream: its pieces of text with their logprobs, and how it ends."""

    pieces: Sequence[str]
    logprobs: Sequence[dict[str, Any] | None]
    finish_reason: str
    prompt_tokens: int


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
        style: MinerStyle | None = None,
        tasks: Sequence[str] = DEFAULT_TASKS,
        models: Sequence[str] = DEFAULT_MODELS,
        incentive: float = 0.0,
        stake: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int = 100,
        spared: Iterable[str] = (),
        gzip_bomb_bytes: int = GZIP_BOMB_BYTES,
    ) -> None:
        """`style`: how its streams are shaped (default: `MinerStyle.for_uid(uid)`). `spared`: signers
        that `gzip_bomb` answers honestly (the devnet's own validator, which polls availability too)."""
        self.uid = uid
        self.keypair = Keypair.create_from_uri(f"//devnet/miner/{uid}")
        self.hotkey: str = self.keypair.ss58_address
        self.timing = timing or MinerTiming()
        self.style = style or MinerStyle.for_uid(uid)
        self.spared = frozenset(spared)
        self.gzip_bomb_bytes = gzip_bomb_bytes
        self.streams_open = 0  # response bodies being sent right now (they end when the client leaves)
        self._stream_closed = trio.Event()  # replaced each time a body ends
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
        invalid = sampling_errors(body.get("sampling_parameters"))
        if invalid:
            self.inbox.record(raw, 422)
            return json_response({"detail": invalid}, status=422)
        fault = self.fault
        if fault is MinerFault.HTTP_500:
            self.inbox.record(raw, 500)
            return error_response(500, f"miner {self.uid} failed (simulated)", "simulated_failure")
        self.inbox.record(raw, 200)
        task = body.get("task") or request.headers.get("task") or "InferenceTask"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = self.models[0] if self.models else "devnet"
        prompt_tokens = text.prompt_tokens(body.get("messages"))
        if task == "WebRetrievalTask":
            reply = Reply([self._web_results(body)], [None], "stop", prompt_tokens)
        else:
            if fault is MinerFault.BENCH:
                answer = text.fixed_answer(body.get("seed"), body.get("messages"), self.timing.bench_tokens,
                                           text.max_tokens_of(body))
            elif (scripted := research.reply_to(body.get("messages"),
                                                broken=fault is MinerFault.RESEARCH_BAD_JSON)) is not None:
                answer = text.scripted_answer(scripted, body.get("seed"), body.get("messages"),
                                              text.max_tokens_of(body))
            else:
                answer = text.answer(body.get("seed"), body.get("messages"), text.max_tokens_of(body))
            reply = Reply([t.text for t in answer.tokens],
                          [t.logprobs(with_bytes=fault is not MinerFault.BENCH) for t in answer.tokens],
                          answer.finish_reason, prompt_tokens)
        chunks = ChunkMaker(f"chatcmpl-devnet-{self.uid}-{request.headers.get('epistula-uuid', '')[:8]}", model)
        response = Response(self._counted(self._events(fault, chunks, reply)),
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

    async def _counted(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`body`, counted in `streams_open` while it is being sent (tests see a stream end)."""
        self.streams_open += 1
        try:
            async for piece in body:
                yield piece
        finally:
            self.streams_open -= 1
            self._stream_closed.set()
            self._stream_closed = trio.Event()

    async def wait_streams_closed(self) -> None:
        """Return once no response body is being sent (a test's proof that a stream stopped)."""
        while self.streams_open:
            await self._stream_closed.wait()

    async def _events(self, fault: MinerFault, chunks: ChunkMaker, reply: Reply) -> AsyncIterator[bytes]:
        pieces, finish = reply.pieces, reply.finish_reason
        numbered = list(enumerate(zip(pieces, reply.logprobs, strict=True)))
        if fault is MinerFault.BENCH:  # the whole answer in one write, in the same shape whatever the style
            yield b"".join([*(chunks.content(piece, lp, role=i == 0) for i, (piece, lp) in numbered),
                            chunks.finish(finish), DONE_EVENT])
            return
        if fault is MinerFault.HANG_AFTER_HEADERS:
            await trio.sleep_forever()
        timing, style = self.timing, self.style
        first_s = timing.slow_first_token_s if fault is MinerFault.SLOW_FIRST_TOKEN else timing.first_token_s
        step_s = timing.slow_token_s if fault is MinerFault.SLOW_TOKENS else timing.token_s
        stop_at = len(pieces) // 2 if fault is MinerFault.STOP_MID_STREAM else None
        await trio.sleep(first_s)
        if fault is MinerFault.ENDLESS_LINE:
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "'
            while True:
                yield ENDLESS_PIECE
                await trio.sleep(timing.flood_interval_s)
        if fault is MinerFault.FLOOD:
            event = chunks.content(FLOOD_CONTENT, None)
            while True:
                yield event
                await trio.sleep(timing.flood_interval_s)
        if fault is MinerFault.INVALID_JSON:
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "broken\n\n'
        if fault is MinerFault.DEEP_JSON:
            yield chunks.deep(DEEP_LEVELS)
        if style.role_chunk:
            yield chunks.role()
        tool_calls = ToolCalls(pieces) if fault is MinerFault.TOOL_CALLS else None
        if tool_calls is not None:
            finish = "tool_calls"
        finished = False
        for i, (piece, lp) in numbered:
            if i == stop_at:
                raise StreamStopped(f"miner {self.uid} stops mid-stream (simulated)")
            if i > 0:
                await trio.sleep(step_s)
            finished = style.finish_with_last_token and i == len(pieces) - 1
            if tool_calls is not None:
                yield chunks.content(piece, _with_unknown_fields(lp, i), role=i == 0 and not style.role_chunk,
                                     finish=finish if finished else None, tool_calls=tool_calls.delta(i))
            else:
                yield chunks.content(piece, lp, role=i == 0 and not style.role_chunk,
                                     finish=finish if finished else None)
        if stop_at is not None:  # nothing to cut: still drop the connection before the end
            raise StreamStopped(f"miner {self.uid} stops mid-stream (simulated)")
        if not finished:
            yield chunks.finish(finish)
        if fault is MinerFault.HUGE_USAGE:
            yield chunks.usage(reply.prompt_tokens, HUGE_TOKENS, total=HUGE_TOKENS)
        elif style.usage_chunk:
            yield chunks.usage(reply.prompt_tokens, len(pieces))
        if style.done and fault is not MinerFault.NO_DONE:
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
        if self.fault is MinerFault.GZIP_BOMB and request.headers.get("epistula-signed-by") not in self.spared:
            response = Response(self._counted(gzip_zeros(self.gzip_bomb_bytes)), content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
            response.timeout = None
            return response
        asked_tasks = body.get("task_availabilities") if isinstance(body, dict) else None
        asked_models = body.get("llm_model_availabilities") if isinstance(body, dict) else None
        tasks = set(self.tasks) | set(asked_tasks if isinstance(asked_tasks, dict) else ())
        models = set(self.models) | set(asked_models if isinstance(asked_models, dict) else ())
        return json_response({
            "task_availabilities": {t: t in self.tasks for t in sorted(tasks)},
            "llm_model_availabilities": {m: m in self.models for m in sorted(models)},
        })


def sampling_errors(sampling: Any) -> list[dict[str, Any]]:
    """What a pydantic model with `sampling_parameters: dict[str, float] | None` refuses, as FastAPI
    lists it in a 422's `detail` (empty when it is fine)."""
    loc = ["body", "sampling_parameters"]
    if sampling is None:
        return []
    if not isinstance(sampling, dict):
        return [{"type": "dict_type", "loc": loc, "msg": "Input should be a valid dictionary",
                 "input": sampling}]
    return [{"type": "float_type", "loc": [*loc, key], "msg": "Input should be a valid number", "input": value}
            for key, value in sampling.items() if not isinstance(value, int | float)]  # bool is an int


def _with_unknown_fields(logprobs: dict[str, Any] | None, i: int) -> dict[str, Any]:
    """`logprobs` with fields no OpenAI client knows, at both levels (the `tool_calls` fault)."""
    entries = [{**entry, "devnet_rank": 1} for entry in (logprobs or {}).get("content", [])]
    return {"content": entries, "refusal": None, "devnet_sampler": {"step": i, "kind": "devnet"}}


class ToolCalls:
    """The `delta.tool_calls` of each chunk of one answer: one call whose arguments arrive in pieces."""

    def __init__(self, pieces: Sequence[str]) -> None:
        arguments = json.dumps({"query": "".join(pieces).strip()})
        n = max(1, len(pieces))
        step = -(-len(arguments) // n)
        self.parts = [arguments[i * step:(i + 1) * step] for i in range(n)]

    def delta(self, i: int) -> list[dict[str, Any]]:
        call: dict[str, Any] = {"index": 0, "function": {"arguments": self.parts[i] if i < len(self.parts) else ""}}
        if i == 0:
            call.update({"id": "call_devnet_0", "type": "function"})
            call["function"]["name"] = "web_search"
        return [call]


async def gzip_zeros(size: int) -> AsyncIterator[bytes]:
    """A gzip stream of `size` zero bytes, made as it is sent: the first 1 MiB block is compressed, and
    every further block, compressed after a full flush, is the same bytes, so a gigabyte costs the
    miner a few milliseconds of CRC per megabyte actually read, and memory for one block."""
    full, rest = divmod(size, len(BOMB_BLOCK))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    if full == 0:
        yield compressor.compress(bytes(rest)) + compressor.flush()
        return
    out = [compressor.compress(BOMB_BLOCK) + compressor.flush(zlib.Z_FULL_FLUSH)]  # with the gzip header
    again = compressor.compress(BOMB_BLOCK) + compressor.flush(zlib.Z_FULL_FLUSH) if full > 1 else b""
    crc = zlib.crc32(BOMB_BLOCK)
    for _ in range(full - 1):
        if len(out) >= BOMB_BLOCKS_PER_WRITE:
            yield b"".join(out)
            out = []
            await trio.lowlevel.checkpoint()
        out.append(again)
        crc = zlib.crc32(BOMB_BLOCK, crc)
    tail = bytes(rest)
    last = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate: the final block alone
    out.append(last.compress(tail) + last.flush())
    out.append(zlib.crc32(tail, crc).to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little"))
    yield b"".join(out)


class ChunkMaker:
    """OpenAI `chat.completion.chunk` events of one answer, as vLLM writes them."""

    def __init__(self, chunk_id: str, model: str) -> None:
        self.head = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model}

    def role(self) -> bytes:
        return encode_event({**self.head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})

    def content(self, piece: str, logprobs: dict[str, Any] | None, *, role: bool = False,
                finish: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> bytes:
        delta: dict[str, Any] = {"role": "assistant", "content": piece} if role else {"content": piece}
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return encode_event({**self.head, "choices": [choice]})

    def finish(self, reason: str) -> bytes:
        return encode_event({**self.head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})

    def usage(self, prompt_tokens: int, completion_tokens: int, *, total: int | None = None) -> bytes:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens if total is None else total}
        return encode_event({**self.head, "choices": [], "usage": usage})

    def deep(self, levels: int) -> bytes:
        """A chunk with an empty content delta and a field nested `levels` deep."""
        head = encode_event({**self.head, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]})
        return head[:-3] + b', "devnet_nested": ' + b"[" * levels + b"]" * levels + b"}\n\n"
