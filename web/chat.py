"""`POST /v1/chat/completions`, `GET /v1/models` and the miners' status page.

A chat request is fanned out to several miners. Streaming: the first miner to send content wins and
its chunks are passed on (one stable id, the requested model name, the miner's finish_reason), then
`[DONE]`; a winner that breaks mid-stream ends the stream with an error event and no `[DONE]`.
Non-streaming: the first complete valid answer. Mixture of miners: a first round answered by several
miners (never waiting past its deadline), then one healthy, high-incentive miner combines them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import trio
from quart import Blueprint, Response
from quart import request as quart_request

from actors.fanout import Broken, Chunk, Complete, End, Event, Failed, FanoutJob
from engine.gateway import CLOSE_CALLBACKS
from engine.organic import MinerAnswer
from engine.services import Services
from engine.sse import DONE_EVENT, encode_event
from web.auth import Grant, authorize, rate_limit_headers_on_errors
from web.body import json_body
from web.chat_request import ChatRequest, parse_chat_request
from web.errors import ApiError, fanout_errors, json_response

DEFAULT_MODEL_NAME = "sn1"
MIXTURE_PREAMBLE = "I have received the following answers from other assistants:"
MIXTURE_CLOSING = "I will now combine them into one concise reply."
MIXTURE_MIN_GRACE_S = 0.5


def mixture_message(answers: list[str]) -> dict[str, str]:
    numbered = "\n\n".join(f"{i}. {text.strip()}" for i, text in enumerate(answers, 1))
    return {"role": "assistant", "content": f"{MIXTURE_PREAMBLE}\n\n{numbered}\n\n{MIXTURE_CLOSING}"}


def start_job(services: Services, request: ChatRequest, body: dict[str, Any], *, mode: str,
              k: int | None = None, final: bool = False, exclude: tuple[int, ...] = ()) -> FanoutJob:
    """Choose the miners and start asking them; selection and overload become client errors."""
    with fanout_errors():
        if final:
            miners = [services.selector.best(request.task, request.model, exclude=exclude)]
        elif request.uids is not None:
            miners = services.selector.explicit(request.uids)
        else:
            miners = services.selector.pick(request.task, request.model, k or services.settings.fanout.miners)
        return services.fanout.start(body, miners, mode=mode, task=request.task)  # type: ignore[arg-type]


def failed_error(event: Failed) -> ApiError:
    reasons = {str(uid): error for uid, error in event.errors.items()}
    return ApiError(502, f"All {len(reasons)} miners failed before answering.", code="miners_failed",
                    details=reasons)


async def first_event(job: FanoutJob, budget_s: float, *, what: str) -> Event:
    """The job's first event within `budget_s`; 504 when none came (the job goes on for scoring)."""
    with trio.move_on_after(budget_s):
        try:
            return await job.receive.receive()
        except trio.EndOfChannel:
            raise ApiError(502, "The miners' answers ended without a result.", code="miners_failed") from None
    job.release()
    raise ApiError(504, f"No miner produced {what} within {budget_s:g}s.", code="miner_timeout")


class ChatStream:
    """Turns the winner's chunks into the client's OpenAI chunks."""

    def __init__(self, model: str | None) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.sent_role = False
        self.sent_finish = False

    def chunk(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        if self.model is None:
            self.model = raw.get("model") if isinstance(raw.get("model"), str) else DEFAULT_MODEL_NAME
        choices = raw.get("choices")
        choice = dict(choices[0]) if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = dict(choice.get("delta") or {}) if isinstance(choice.get("delta"), dict) else {}
        if not self.sent_role:
            delta.setdefault("role", "assistant")
            self.sent_role = True
        choice.update({"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason")})
        if choice["finish_reason"] is not None:
            self.sent_finish = True
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [choice]}

    def finish(self, reason: str | None) -> dict[str, Any]:
        self.sent_finish = True
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model or DEFAULT_MODEL_NAME,
                "choices": [{"index": 0, "delta": {}, "finish_reason": reason or "stop"}]}


def estimated_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """About one token per four characters of the messages' text, plus a few per message."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return -(-chars // 4) + 4 * len(messages)


def on_close(callback: Callable[[], object]) -> None:
    """Run `callback` when the current exchange ends, however it ends (see `shield_response_end`,
    which every served app runs inside)."""
    callbacks: list[Callable[[], object]] = quart_request.scope[CLOSE_CALLBACKS]  # type: ignore[literal-required]
    callbacks.append(callback)


def usage_of(answer: MinerAnswer | None, messages: list[dict[str, Any]]) -> dict[str, int] | None:
    """OpenAI `usage`, all three counts: the miner's own where it sent them; else one completion token
    per content chunk (Subnet 1 miners stream a token a chunk) and the prompt estimated by length."""
    if answer is None:
        return None
    reported: dict[str, Any] = {}
    for raw in reversed(answer.raw_chunks):
        if isinstance(raw.get("usage"), dict):
            reported = raw["usage"]
            break

    def count(name: str, fallback: int) -> int:
        value = reported.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else fallback

    completion = count("completion_tokens", len(answer.chunks))
    prompt = count("prompt_tokens", estimated_prompt_tokens(messages))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def record_usage(services: Services, grant: Grant, usage: dict[str, int] | None) -> None:
    services.keys.record_usage_nowait(grant.key_id, tokens=(usage or {}).get("completion_tokens", 0))


async def stream_response(services: Services, grant: Grant, request: ChatRequest, job: FanoutJob) -> Response:
    event = await first_event(job, services.settings.fanout.first_token_timeout_s, what="a first token")
    if isinstance(event, Failed):
        raise failed_error(event)
    out = ChatStream(request.model)

    def render(current: Event) -> tuple[bytes, bool]:
        """The client's bytes for one event, and whether the stream ends with it."""
        if isinstance(current, Chunk):
            return encode_event(out.chunk(current.data)), False
        usage = usage_of(job.winner_answer, request.messages)
        if isinstance(current, End):
            parts = [] if out.sent_finish else [encode_event(out.finish(current.finish_reason))]
            if request.include_usage and usage is not None:
                parts.append(encode_event({**out.finish(None), "choices": [], "usage": usage}))
            parts.append(DONE_EVENT)
        else:
            message = current.error if isinstance(current, Broken) else "every miner failed"
            parts = [encode_event(ApiError(502, f"The miner's answer broke off: {message}",
                                           code="miner_stream_broken").body())]
        record_usage(services, grant, usage)
        return b"".join(parts), True

    async def events() -> AsyncIterator[bytes]:
        """One write per wake-up: chunks that queued up meanwhile (a loaded gateway, a fast miner) go
        out together, as one send, instead of one send and one pass through the server each."""
        current: Event = event
        while True:
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
            try:
                current = await job.receive.receive()
            except trio.EndOfChannel:
                current = Broken("the answer ended unexpectedly")

    headers = {**grant.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
               "X-Request-Id": job.request_id}
    response = Response(events(), content_type="text/event-stream", headers=headers)
    response.timeout = None  # streams may outlive Quart's default response timeout
    return response


async def complete_response(services: Services, grant: Grant, request: ChatRequest, job: FanoutJob) -> Response:
    event = await first_event(job, job.timeout_s, what="a complete answer")
    job.release()
    if isinstance(event, Failed):
        raise failed_error(event)
    if not isinstance(event, Complete):
        raise ApiError(502, "The miners' answers ended without a result.", code="miners_failed")
    answer = event.answer
    out = ChatStream(request.model)
    if out.model is None:
        first = answer.raw_chunks[0] if answer.raw_chunks else {}
        out.model = first.get("model") if isinstance(first.get("model"), str) else DEFAULT_MODEL_NAME
    body: dict[str, Any] = {
        "id": out.id, "object": "chat.completion", "created": out.created, "model": out.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": answer.finish_reason or "stop", "logprobs": None}],
    }
    if (usage := usage_of(answer, request.messages)) is not None:
        body["usage"] = usage
    record_usage(services, grant, usage)
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
    answers = [a for a in first_round.answers
               if a.chunks and not a.error and (a.completed or a.finish_reason is not None)]
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
            request = parse_chat_request(await json_body())
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
                              "fanout": services.fanout.statistics()})

    return bp
