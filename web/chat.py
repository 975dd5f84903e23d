"""`POST /v1/chat/completions`: a chat request fanned out to miners, the winner's answer to the client.

A chat request is fanned out to several miners. Streaming: the first miner to send content wins and
its text is passed on (one stable id, the requested model name, its finish_reason), then `[DONE]`; a
winner that breaks mid-stream with nobody to take over ends the stream with an error event and no
`[DONE]`. While a streaming client waits (for the first token, or a slow miner), an SSE comment goes out
every `fanout.sse_keepalive_s`, so clients and proxies do not time out. Non-streaming: the first
complete valid answer. Mixture of miners: a first round answered by several miners (never waiting past
its deadline), then one healthy, high-incentive miner combines them. Deep research
(`inference_mode: "Chain-of-Thought"` or `test_time_inference: true`): a run of model calls and web
searches (`web.research`) whose Markdown progress and final answer are the streamed text.

One pipeline serves streams and jobs: a producer yields the client's items in batches, one batch per
wake-up (`Chunk` text with the miner's choice for logprobs, `Finish` with finish_reason and usage,
`Fault`, or the keep-alive tick), and a consumer renders them: `stream_response` as SSE (one write per
batch), `web.jobs` as a job's result chunks. Producers: `FanoutAnswer` (a fan-out's events, passed on
as they come, with no task of its own) and `channel_batches` over a deep-research run's channel.

The route is answered as plain ASGI, in front of the Quart app (`chat_entry`, installed by
`web.app.create_app`): the hottest route skips Quart's request and response objects. Its rules stay in
Quart's URL map, so the served routes, OPTIONS and a wrong method's 405 are Quart's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from quart import Blueprint, Response

from actors.fanout.events import Broken, Chunk, Complete, End, Event, Failed
from actors.fanout.job import FanoutJob
from actors.jobs import JobsUnavailable
from web.asgi import request_headers
from web.asking import answered_model, resolve_model, start_job
from web.auth import Grant, api_key_of, check_key, client_address, rate_limit_headers_on_errors
from web.body import AsgiBody, parse_json
from web.chat_request import ChatRequest, parse_chat_request
from web.completion_format import ChatStream, completion_body, usage_of
from web.errors import ApiError, encode_headers, errors_answered, send_json
from web.mixture import mixture_job
from web.research import ResearchFailure, ResearchOutcome, run_research
from web.research.running import ResearchSlot
from web.research.tools import FanoutTools, research_limits
from web.services import Services
from web.telemetry import current_request
from wire.sse import DONE_EVENT, encode_event

T = TypeVar("T")

KEEPALIVE_COMMENT = b": keep-alive\n\n"
RESEARCH_MODE = "Chain-of-Thought"
RESEARCH_BATCHES = 16  # a run's batches waiting for its client; beyond that the run waits


@dataclass(frozen=True, slots=True)
class Finish:
    """The answer is whole: its finish_reason and usage."""

    reason: str | None
    usage: dict[str, int]


@dataclass(frozen=True, slots=True)
class Fault:
    """The answer ends with this error (a stream's last event; before anything was sent, its status)."""

    error: ApiError


class KeepAlive:
    """Nothing to say yet: the consumer keeps its client (or its store) warm."""


KEEPALIVE = KeepAlive()
Item = Chunk | Finish | Fault | KeepAlive
Batch = Sequence[Item]
KEEPALIVE_BATCH: Batch = (KEEPALIVE,)
_ENDED = object()


def failed_error(event: Failed) -> ApiError:
    reasons = {str(uid): error for uid, error in event.errors.items()}
    if reasons and all(error.startswith("gateway error") for error in reasons.values()):
        # Not one miner was reached, for the gateway's own reasons (out of open files, say).
        return ApiError(503, "The gateway could not reach any miner just now (its own resources ran out); "
                        "retry shortly.", code="gateway_overloaded", headers={"Retry-After": "1"}, details=reasons)
    return ApiError(502, f"All {len(reasons)} miners failed before answering.", code="miners_failed",
                    details=reasons)


def first_token_timeout(services: Services, job: FanoutJob) -> ApiError:
    return ApiError(504, f"No miner produced a first token within {first_token_budget_s(services, job):g}s.",
                    code="miner_timeout")


def first_token_budget_s(services: Services, job: FanoutJob) -> float:
    """`fanout.first_token_timeout_s`, or (0, the default) the request's own time budget."""
    return services.settings.fanout.first_token_timeout_s or job.timeout_s


async def receive_within(receive: trio.MemoryReceiveChannel[T], timeout_s: float, ended: Any) -> T | Any:
    """The channel's next message within `timeout_s`; None when none came (time for a keep-alive),
    `ended` when the channel is closed."""
    with trio.move_on_after(timeout_s):
        try:
            return await receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return ended
    return None


async def next_event(job: FanoutJob, timeout_s: float) -> Event | None:
    """The job's next event within `timeout_s`, else None."""
    event: Event | None = await receive_within(job.receive, timeout_s,
                                               Broken("the miners' answers ended without a result"))
    return event


def record_usage(services: Services, grant: Grant, usage: dict[str, int]) -> None:
    services.keys.record_usage_nowait(grant.key_id, tokens=usage["completion_tokens"])


# -- producers -------------------------------------------------------------------------------------------


class FanoutAnswer:
    """The client's items of one fan-out (mode "stream"), and the accounting of what was relayed.

    Events are passed on as they come: a batch holds every event that had queued up by the time the
    consumer woke (a loaded gateway, a fast miner), so it goes out as one write. Until the first text,
    the wait is bounded by the first-token budget; after it, by `keepalive_s` per tick."""

    def __init__(self, services: Services, grant: Grant, request: ChatRequest, job: FanoutJob, *,
                 keepalive_s: float) -> None:
        self.services = services
        self.grant = grant
        self.request = request
        self.job = job
        self.keepalive_s = keepalive_s
        self.first_deadline = job.started + first_token_budget_s(services, job)
        self.relayed = 0  # content chunks handed to the consumer
        self.recorded = False

    def _account(self, usage: dict[str, int]) -> None:
        if not self.recorded:
            self.recorded = True
            record_usage(self.services, self.grant, usage)

    def account_relayed(self) -> None:
        """The exchange ended before the answer did (the client left, an error): what was relayed counts."""
        request = self.request
        self._account(usage_of(self.job.winner_answer, request.messages, budget=request.max_new_tokens,
                               relayed=self.relayed))

    def _item(self, event: Event) -> tuple[Item, bool]:
        """The client's item for one event, and whether the answer ends with it."""
        if isinstance(event, Chunk):
            self.relayed += 1
            return event, False
        if isinstance(event, End):
            request = self.request
            usage = usage_of(self.job.winner_answer, request.messages, budget=request.max_new_tokens)
            self._account(usage)
            return Finish(event.finish_reason, usage), True
        if isinstance(event, Broken) and self.relayed:
            error = ApiError(502, f"The miner's answer broke off: {event.error}", code="miner_stream_broken")
        elif isinstance(event, Failed):
            error = failed_error(event)
        else:
            error = ApiError(502, "The miners' answers ended without a result.", code="miners_failed")
        self.account_relayed()
        return Fault(error), True

    async def batches(self) -> AsyncGenerator[Batch]:
        job = self.job
        while True:
            wait = self.keepalive_s
            if self.relayed == 0:
                remaining = self.first_deadline - trio.current_time()
                if remaining <= 0:
                    job.release()
                    self.account_relayed()
                    yield (Fault(first_token_timeout(self.services, job)),)
                    return
                wait = min(wait, remaining)
            event = await next_event(job, wait)
            if event is None:
                if self.relayed == 0 and trio.current_time() >= self.first_deadline:
                    continue  # out of time for the first token: ended above
                yield KEEPALIVE_BATCH
                continue
            item, done = self._item(event)
            batch = [item]
            while not done:
                try:
                    event = job.receive.receive_nowait()
                except trio.WouldBlock:
                    break
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    event = Broken("the answer ended unexpectedly")
                item, done = self._item(event)
                batch.append(item)
            yield batch
            if done:
                return


async def channel_batches(receive: trio.MemoryReceiveChannel[Batch], keepalive_s: float) -> AsyncGenerator[Batch]:
    """The batches a producer running elsewhere sends (a deep-research run), joined per wake-up, with a
    keep-alive tick after every `keepalive_s` of silence; ends after its Finish or Fault."""
    while True:
        got = await receive_within(receive, keepalive_s, _ENDED)
        if got is None:
            yield KEEPALIVE_BATCH
            continue
        if got is _ENDED:
            yield (Fault(ApiError(502, "The answer ended unexpectedly.", code="internal_error")),)
            return
        batch = list(got)
        while not isinstance(batch[-1], Finish | Fault):
            try:
                batch.extend(receive.receive_nowait())
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                batch.append(Fault(ApiError(502, "The answer ended unexpectedly.", code="internal_error")))
        yield batch
        if isinstance(batch[-1], Finish | Fault):
            return


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def research_error(outcome: ResearchOutcome) -> ApiError:
    message = f"Deep research failed: {outcome.message}."
    if outcome.failure is ResearchFailure.DEADLINE:
        return ApiError(504, message, code="research_deadline")
    if outcome.failure is ResearchFailure.UNUSABLE_ANSWER:
        return ApiError(502, message, code="research_unusable_answer")
    return ApiError(502, message, code="research_call_failed")


def admit_research(services: Services, grant: Grant) -> ResearchSlot:
    """A place for one more run of the key (`research.max_running_per_key`, `research.max_running`), or
    the ApiError (429, 503) saying which limit it is over."""
    if services.research is None:
        raise ApiError(503, "Deep research is not available in this gateway.", code="research_unavailable")
    return services.research.admit(grant.key_id, services.settings.research)


async def produce_research(services: Services, grant: Grant, request: ChatRequest,
                           send: trio.MemorySendChannel[Batch], slot: ResearchSlot | None = None) -> None:
    """Run deep research on the request's messages, sending its Markdown as it comes, then its Finish
    (usage: every call's) or its Fault. The run is one request against the key; its calls' completion
    tokens are added to the key's usage however the run ends (see `web.research.tools`). It holds `slot`
    (taken here when none is given: a job's run) until it ends, however it ends."""
    try:
        async with send:
            if slot is None:
                try:
                    slot = admit_research(services, grant)
                except ApiError as exc:
                    await send.send((Fault(exc),))
                    return
            await _research_into(services, grant, request, send)
    finally:
        if slot is not None:
            slot.release()


async def _research_into(services: Services, grant: Grant, request: ChatRequest,
                         send: trio.MemorySendChannel[Batch]) -> None:
    """The run itself, into `send`."""
    tools = FanoutTools(services)

    async def emit(piece: str) -> None:
        await send.send((Chunk(piece),))

    try:
        outcome = await run_research(request.messages, tools, emit, research_limits(services.settings.research),
                                     today=today())
    finally:
        record_usage(services, grant, tools.usage)
    await send.send((Finish("stop", dict(tools.usage)),) if outcome.completed else (Fault(research_error(outcome)),))


def is_research(request: ChatRequest) -> bool:
    body = request.miner_body
    return body.get("inference_mode") == RESEARCH_MODE or body.get("test_time_inference") is True


async def open_fanout(services: Services, request: ChatRequest, *, stream: bool) -> FanoutJob:
    """The fan-out answering an ordinary chat request (mixture included), in mode "stream" or "complete"."""
    if request.mixture:
        return await mixture_job(services, request, stream=stream)
    return start_job(services, request, request.miner_body, mode="stream" if stream else "complete")


# -- consumers -------------------------------------------------------------------------------------------


def finish_chunks(out: ChatStream, item: Finish, *, include_usage: bool) -> list[dict[str, Any]]:
    chunks = [out.finish(item.reason)]
    if include_usage:
        chunks.append(out.usage_chunk(item.usage))
    return chunks


def render(out: ChatStream, item: Item, include_usage: bool) -> bytes:
    """The client's bytes for one item."""
    if isinstance(item, Chunk):
        return encode_event(out.chunk(item.text, item.choice))
    if isinstance(item, Finish):
        return b"".join([*map(encode_event, finish_chunks(out, item, include_usage=include_usage)), DONE_EVENT])
    if isinstance(item, Fault):
        return encode_event(item.error.body())
    return KEEPALIVE_COMMENT


async def sse_body(out: ChatStream, first: Batch, rest: AsyncGenerator[Batch], include_usage: bool
                   ) -> AsyncGenerator[bytes]:
    """One write per batch."""
    batch = first
    while True:
        if len(batch) == 1:
            yield render(out, batch[0], include_usage)
        else:
            yield b"".join([render(out, item, include_usage) for item in batch])
        if isinstance(batch[-1], Finish | Fault):
            return
        try:
            batch = await rest.__anext__()
        except StopAsyncIteration:
            return


async def stream_response(send: ASGISendCallable, grant: Grant, request: ChatRequest,
                          batches: AsyncGenerator[Batch]) -> None:
    """A streamed answer. The 200 is committed only once there is something to say or, with nothing yet,
    after one keep-alive period: a fast failure keeps its status (502, 504); later ones are error events.
    `batches` is closed here, however the answer ends (the body stops reading it at the end of the
    answer: left to the collector, its finalizer would cost a task)."""
    async with aclosing(batches):
        first = await batches.__anext__()
        if len(first) == 1 and isinstance(first[0], Fault):
            raise first[0].error
        out = ChatStream(answered_model(request), logprobs=request.logprobs, top_logprobs=request.top_logprobs)
        headers = {**grant.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*encode_headers(headers), (b"content-type", b"text/event-stream")]})
        async with aclosing(sse_body(out, first, batches, request.include_usage)) as body:
            async for data in body:
                await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def complete_response(services: Services, send: ASGISendCallable, grant: Grant, request: ChatRequest,
                            job: FanoutJob) -> None:
    event = await next_event(job, job.timeout_s)
    job.release()
    if event is None:
        raise ApiError(504, f"No miner produced a complete answer within {job.timeout_s:g}s.", code="miner_timeout")
    if isinstance(event, Failed):
        raise failed_error(event)
    if not isinstance(event, Complete):
        raise ApiError(502, "The miners' answers ended without a result.", code="miners_failed")
    usage = usage_of(event.answer, request.messages, budget=request.max_new_tokens)
    record_usage(services, grant, usage)
    body = completion_body(event.answer, answered_model(request), usage, logprobs=request.logprobs,
                           top_logprobs=request.top_logprobs)
    await send_json(send, body, headers=grant.headers)


def research_channel() -> tuple[trio.MemorySendChannel[Batch], trio.MemoryReceiveChannel[Batch]]:
    return trio.open_memory_channel[Batch](RESEARCH_BATCHES)


async def research_stream(services: Services, send: ASGISendCallable, grant: Grant, request: ChatRequest) -> None:
    """Deep research, streamed. The run works in the job runner's nursery (it outlives this handler's
    call); the client leaving cancels it, and with it the call it was making (no further miner call)."""
    channel, receive = research_channel()
    if services.jobs is None:
        raise ApiError(503, "Deep research is not available in this gateway.", code="research_unavailable")
    slot = admit_research(services, grant)
    try:
        run = services.jobs.start_run(partial(produce_research, services, grant, request, channel, slot))
    except JobsUnavailable as exc:
        slot.release()
        raise ApiError(503, "Deep research cannot start now; retry shortly.", code="research_unavailable",
                       headers={"Retry-After": "1"}) from exc
    try:
        await stream_response(send, grant, request, channel_batches(receive, services.settings.fanout.sse_keepalive_s))
    finally:
        run.cancel()


async def research_complete(services: Services, send: ASGISendCallable, grant: Grant, request: ChatRequest) -> None:
    """Deep research, answered at once when it is done: the final answer as one `chat.completion`."""
    tools = FanoutTools(services)

    async def emit(piece: str) -> None:
        """Progress is for streams."""

    with admit_research(services, grant):
        try:
            outcome = await run_research(request.messages, tools, emit,
                                         research_limits(services.settings.research), today=today())
        finally:
            record_usage(services, grant, tools.usage)
    if not outcome.completed:
        raise research_error(outcome)
    body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": answered_model(request),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.answer},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": dict(tools.usage)}
    await send_json(send, body, headers=grant.headers)


# -- the route -------------------------------------------------------------------------------------------

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


def route_path(scope: HTTPScope) -> str:
    """The path a request is routed by, as Quart routes it: an absolute-form target
    (`POST http://host/v1/chat/completions`, as forward proxies send it) by its path, without the
    app's `root_path`."""
    path = scope["path"]
    if not path.startswith("/"):
        path = urlsplit(path).path
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def chat_entry(services: Services, app: ASGIFramework, *, body_timeout_s: float | None) -> ASGIFramework:
    """`app`, with every POST to the chat route answered here, as plain ASGI; all else goes to `app`.

    Quart's request and response objects, its routing and its hooks cost a fifth of a completion's CPU
    in the gateway (`sn1-gateway bench`). The body is bounded as Quart bounds one
    (`server.max_body_bytes`; `body_timeout_s`, Quart's BODY_TIMEOUT), errors answered as its error
    handlers answer them (`web.errors.errors_answered`)."""
    max_bytes = services.settings.server.max_body_bytes

    async def entry(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and route_path(scope) in CHAT_PATHS:
            await chat_completions(services, scope, receive, send, max_bytes=max_bytes, body_timeout_s=body_timeout_s)
        else:
            await app(scope, receive, send)

    return entry


async def chat_completions(services: Services, scope: HTTPScope, receive: ASGIReceiveCallable,
                           send: ASGISendCallable, *, max_bytes: int, body_timeout_s: float | None) -> None:
    """`POST /v1/chat/completions`: the key, the body, the fan-out (or a research run), the answer. As in
    Quart, the body is taken as it comes, and the client leaving ends the exchange: a stream stops, the
    fan-out is let go (its miners go on only for scoring), a research run is cancelled."""
    record = current_request()
    if record is not None:
        record.route = scope["path"]  # the path is the rule
    headers = request_headers(scope)
    body = AsgiBody(headers, receive, max_bytes=max_bytes)
    async with trio.open_nursery() as exchange:
        exchange.start_soon(body.receive_all, exchange.cancel_scope)
        async with errors_answered(send) as send_answer:
            grant = await check_key(services, api_key_of(headers), client_address(scope))
            raw = await body.read(body_timeout_s)  # its 413 and 408 without the key's figures, as in Quart
            with rate_limit_headers_on_errors(grant):
                request = parse_chat_request(parse_json(raw), default_model=services.settings.fanout.default_model)
                await answer(services, send_answer, grant, request)
        exchange.cancel_scope.cancel()


async def answer(services: Services, send: ASGISendCallable, grant: Grant, request: ChatRequest) -> None:
    if is_research(request):
        if request.stream:
            await research_stream(services, send, grant, request)
        else:
            await research_complete(services, send, grant, request)
        return
    request = resolve_model(services, request)
    job = await open_fanout(services, request, stream=request.stream)
    streamed: FanoutAnswer | None = None
    try:
        if request.stream:
            streamed = FanoutAnswer(services, grant, request, job,
                                    keepalive_s=services.settings.fanout.sse_keepalive_s)
            await stream_response(send, grant, request, streamed.batches())
        else:
            await complete_response(services, send, grant, request, job)
    finally:
        # However the exchange ends (answered, failed, the client gone), the handler lets go of the job;
        # the miners go on only for scoring.
        job.release()
        if streamed is not None:
            streamed.account_relayed()


def blueprint(services: Services) -> Blueprint:
    """The chat route's rules, for Quart's URL map: the served routes (the API document, docs/protocol.md),
    OPTIONS, and a wrong method's 405. Every POST to them is answered by `chat_entry`, in front of the app,
    before Quart sees it."""
    bp = Blueprint("chat", __name__)

    @bp.post("/v1/chat/completions")
    @bp.post("/chat/completions")
    async def chat_completions_rule() -> Response:
        raise RuntimeError("POST /v1/chat/completions is answered by web.chat.chat_entry, in front of the app")

    return bp
