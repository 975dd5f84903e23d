"""`POST /v1/chat/completions`, `GET /v1/models` and the miners' status page.

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
from typing import Any

import trio
from quart import Blueprint, Response

from actors.fanout.events import Broken, Chunk, Complete, End, Event, Failed
from actors.fanout.job import FanoutJob
from web.asgi import on_close
from web.auth import Grant, authorize, rate_limit_headers_on_errors
from web.body import json_body
from web.chat_request import DEFAULT_MODEL_ALIAS, ChatRequest, parse_chat_request
from web.completion_format import ChatStream, completion_body, usage_of
from web.errors import ApiError, fanout_errors, json_response
from web.services import Services
from wire.sse import DONE_EVENT, encode_event

MIXTURE_PREAMBLE = "I have received the following answers from other assistants:"
MIXTURE_CLOSING = "I will now combine them into one concise reply."
MIXTURE_MIN_GRACE_S = 0.5
KEEPALIVE_COMMENT = b": keep-alive\n\n"


def mixture_message(answers: list[str]) -> dict[str, str]:
    numbered = "\n\n".join(f"{i}. {text.strip()}" for i, text in enumerate(answers, 1))
    return {"role": "assistant", "content": f"{MIXTURE_PREAMBLE}\n\n{numbered}\n\n{MIXTURE_CLOSING}"}


def answered_model(request: ChatRequest) -> str:
    """The model name the client's answer carries: the one it asked for, or the one "Default" means."""
    requested = request.requested_model
    return request.model if requested is None or requested == DEFAULT_MODEL_ALIAS else requested


def resolve_model(services: Services, request: ChatRequest) -> ChatRequest:
    """A model that no miner advertises goes to miners for the task as the subnet's default model (as
    upstream serves it), so that validators can score the answers; `fanout.strict_models` keeps it a 404."""
    fanout = services.settings.fanout
    if fanout.strict_models or request.model == fanout.default_model:
        return request
    if services.selector.index().serves_model(request.model):
        return request
    return request.with_model(fanout.default_model)


def start_job(services: Services, request: ChatRequest, body: dict[str, Any], *, mode: str,
              final: bool = False, exclude: tuple[int, ...] = ()) -> FanoutJob:
    """Choose the miners and start asking them; selection and overload become client errors.

    A request naming its `uids` asks exactly those and moves no miner's breaker; otherwise
    `fanout.extra_scoring_miners` more miners, drawn at random, answer for scoring only."""
    settings = services.settings.fanout
    selector = services.selector
    scoring_only: list[Any] = []
    with fanout_errors():
        if final:
            miners = [selector.best(request.task, request.model, exclude=exclude)]
        elif request.uids is not None:
            miners = selector.explicit(request.uids)
        else:
            miners = selector.pick(request.task, request.model, settings.miners, fallback=not settings.strict_models)
            if settings.extra_scoring_miners and mode != "all":
                scoring_only = selector.extra(settings.extra_scoring_miners, exclude=[n.uid for n in miners])
        return services.fanout.start(body, miners, mode=mode, task=request.task,  # type: ignore[arg-type]
                                     scoring_only=scoring_only, moves_breakers=request.uids is None)


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


async def wait_first_round(job: FanoutJob, deadline_s: float) -> None:
    """Until every miner is done, but never for the slowest: once the fastest has answered, the others
    get as long again as it took (at least `MIXTURE_MIN_GRACE_S`), all within `deadline_s`."""
    with trio.move_on_after(deadline_s):
        await job.first_done.wait()
        grace = max(trio.current_time() - job.started, MIXTURE_MIN_GRACE_S)
        with trio.move_on_after(grace):
            await job.finished.wait()


async def mixture_job(services: Services, request: ChatRequest) -> FanoutJob:
    """First round to several miners (see `wait_first_round`), then one miner combines the answers."""
    first_round = start_job(services, request, request.miner_body, mode="all")
    on_close(first_round.release)  # also when the client leaves during the first round
    await wait_first_round(first_round, services.settings.fanout.mixture_deadline_s)
    first_round.release()
    answers = [a for a in first_round.answers if a.whole]
    if not answers:  # none whole in time: take what has arrived
        answers = [a for a in first_round.answers if a.chunks]
    if not answers:
        raise ApiError(502, "No miner answered the mixture's first round.", code="miners_failed",
                       details={str(uid): e for uid, e in first_round.errors().items()})
    final_body = dict(request.miner_body)
    final_body["messages"] = [*request.messages, mixture_message([a.text for a in answers])]
    asked = tuple(a.uid for a in first_round.answers)
    return start_job(services, request, final_body, mode="stream" if request.stream else "complete",
                     final=True, exclude=asked)


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

    @bp.get("/v1/models")
    async def models() -> Response:
        grant = await authorize(services)
        names = services.availability.get().models()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "sn1"} for name in names]
        return json_response({"object": "list", "data": data}, headers=grant.headers)

    @bp.get("/status/miners")
    async def miners_status() -> Response:
        return json_response({"miners": services.miner_health.report(),
                              "fanout": services.fanout.health()})

    return bp
