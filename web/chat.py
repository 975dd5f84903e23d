"""`POST /v1/chat/completions`: a chat request fanned out to miners, the winner's answer to the client.

A chat request is fanned out to several miners. Streaming: the first miner to send content wins and
its text is passed on (one stable id, the requested model name, its finish_reason), then `[DONE]`; a
winner that breaks mid-stream with nobody to take over ends the stream with an error event and no
`[DONE]`. While a streaming client waits (for the first token, or a slow miner), an SSE comment goes out
every `fanout.sse_keepalive_s`, so clients and proxies do not time out. Non-streaming: the first
complete valid answer. Mixture of miners: a first round answered by several miners (never waiting past
its deadline), then one healthy, high-incentive miner combines them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio
from quart import Blueprint, Response

from actors.fanout.events import Broken, Chunk, Complete, End, Event, Failed
from actors.fanout.job import FanoutJob
from web.asgi import on_close
from web.asking import answered_model, resolve_model, start_job
from web.auth import Grant, authorize, rate_limit_headers_on_errors
from web.body import json_body
from web.chat_request import ChatRequest, parse_chat_request
from web.completion_format import ChatStream, completion_body, usage_of
from web.errors import ApiError, json_response
from web.mixture import mixture_job
from web.services import Services
from wire.sse import DONE_EVENT, encode_event

KEEPALIVE_COMMENT = b": keep-alive\n\n"


def failed_error(event: Failed) -> ApiError:
    reasons = {str(uid): error for uid, error in event.errors.items()}
    return ApiError(502, f"All {len(reasons)} miners failed before answering.", code="miners_failed",
                    details=reasons)


def first_token_timeout(services: Services, job: FanoutJob) -> ApiError:
    return ApiError(504, f"No miner produced a first token within {first_token_budget_s(services, job):g}s.",
                    code="miner_timeout")


def first_token_budget_s(services: Services, job: FanoutJob) -> float:
    """`fanout.first_token_timeout_s`, or (0, the default) the request's own time budget."""
    return services.settings.fanout.first_token_timeout_s or job.timeout_s


async def next_event(job: FanoutJob, timeout_s: float) -> Event | None:
    """The job's next event within `timeout_s`, else None."""
    with trio.move_on_after(timeout_s):
        try:
            return await job.receive.receive()
        except trio.EndOfChannel:
            return Broken("the miners' answers ended without a result")
    return None


def record_usage(services: Services, grant: Grant, usage: dict[str, int]) -> None:
    services.keys.record_usage_nowait(grant.key_id, tokens=usage["completion_tokens"])


async def stream_response(services: Services, grant: Grant, request: ChatRequest, job: FanoutJob) -> Response:
    """A streamed answer. The 200 is committed only once there is something to say or, with nothing yet,
    after one keep-alive period: a fast failure keeps its status (502, 504); later ones are error events."""
    keepalive_s = services.settings.fanout.sse_keepalive_s
    first_deadline = job.started + first_token_budget_s(services, job)
    first = await next_event(job, min(keepalive_s, first_deadline - trio.current_time()))
    if isinstance(first, Failed):
        raise failed_error(first)
    if first is None and trio.current_time() >= first_deadline:
        job.release()
        raise first_token_timeout(services, job)
    if isinstance(first, Broken):
        raise ApiError(502, "The miners' answers ended without a result.", code="miners_failed")
    out = ChatStream(answered_model(request), logprobs=request.logprobs, top_logprobs=request.top_logprobs)
    recorded = False

    def account(usage: dict[str, int]) -> None:
        nonlocal recorded
        if not recorded:
            recorded = True
            record_usage(services, grant, usage)

    def account_relayed() -> None:
        """The exchange ended before the answer did (the client left): what was relayed counts."""
        account(usage_of(job.winner_answer, request.messages, budget=request.max_new_tokens, relayed=out.relayed))

    on_close(account_relayed)

    def render(current: Event) -> tuple[bytes, bool]:
        """The client's bytes for one event, and whether the stream ends with it."""
        if isinstance(current, Chunk):
            return encode_event(out.chunk(current.text, current.choice)), False
        if isinstance(current, End):
            usage = usage_of(job.winner_answer, request.messages, budget=request.max_new_tokens)
            parts = [encode_event(out.finish(current.finish_reason))]
            if request.include_usage:
                parts.append(encode_event(out.usage_chunk(usage)))
            parts.append(DONE_EVENT)
            account(usage)
            return b"".join(parts), True
        if isinstance(current, Broken):
            error = ApiError(502, f"The miner's answer broke off: {current.error}", code="miner_stream_broken")
        elif isinstance(current, Failed):
            error = failed_error(current)
        else:
            error = ApiError(502, "The miners' answers ended without a result.", code="miners_failed")
        account_relayed()
        return encode_event(error.body()), True

    async def events() -> AsyncIterator[bytes]:
        """One write per wake-up: chunks that queued up meanwhile (a loaded gateway, a fast miner) go
        out together, as one send, instead of one send and one pass through the server each."""
        current: Event | None = first
        while True:
            if current is None:
                wait = keepalive_s
                if out.relayed == 0:
                    remaining = first_deadline - trio.current_time()
                    if remaining <= 0:
                        job.release()
                        account_relayed()
                        yield encode_event(first_token_timeout(services, job).body())
                        return
                    wait = min(wait, remaining)
                current = await next_event(job, wait)
                if current is None:
                    yield KEEPALIVE_COMMENT
                    continue
            data, done = render(current)
            parts = [data]
            while not done:
                try:
                    current = job.receive.receive_nowait()
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    current = Broken("the answer ended unexpectedly")
                data, done = render(current)
                parts.append(data)
            yield b"".join(parts) if len(parts) > 1 else parts[0]
            if done:
                return
            current = None

    headers = {**grant.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
               "X-Request-Id": job.request_id}
    response = Response(events(), content_type="text/event-stream", headers=headers)
    response.timeout = None  # streams may outlive Quart's default response timeout
    return response


async def complete_response(services: Services, grant: Grant, request: ChatRequest, job: FanoutJob) -> Response:
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
    return json_response(body, headers={**grant.headers, "X-Request-Id": job.request_id})


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("chat", __name__)

    @bp.post("/v1/chat/completions")
    @bp.post("/chat/completions")
    async def chat_completions() -> Response:
        grant = await authorize(services)
        with rate_limit_headers_on_errors(grant):
            request = parse_chat_request(await json_body(), default_model=services.settings.fanout.default_model)
            request = resolve_model(services, request)
            if request.mixture:
                job = await mixture_job(services, request)
            else:
                job = start_job(services, request, request.miner_body,
                                mode="stream" if request.stream else "complete")
            # However the exchange ends (answered, failed, the client gone, even before a streamed
            # body was started), the handler lets go of the job; the miners go on only for scoring.
            on_close(job.release)
            if request.stream:
                return await stream_response(services, grant, request, job)
            return await complete_response(services, grant, request, job)

    return bp
