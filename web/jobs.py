"""Chat jobs: `POST /v1/chat/completions/jobs`, `GET` and `DELETE /v1/chat/completions/jobs/{job_id}`.

Any chat request (deep research included) may be a job: it is checked as `POST /v1/chat/completions`
checks it (a bad one is a 400 at once), then answered in the gateway (`actors.jobs`) while the client
polls. The answer is always made as a stream; a job's `result` is what the stream would have sent, in
order: each item's `chunk` is the JSON text (as upstream's, a string) of an array of
`chat.completion.chunk` objects, those that came together, exactly as the `data:` lines of the stream
(so a client parses both the same way, and the finish_reason, logprobs when asked, and the usage chunk,
always last, are kept). A failed job's `error` is an OpenAI error object (`message`, `type`, `param`,
`code`), as a failed request's body holds it.

A job belongs to the key that created it: any other key gets 404, as for an unknown id. `DELETE` stops
a pending or running job, which stays readable as `failed` with error code `cancelled`; a finished job
is deleted (then 404). Both answer 200 with the job as it then is (or was). Each call is a request
against the key's rate limit.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import trio
from quart import Blueprint, Response

from actors.fanout.events import Chunk
from actors.jobs import JobFailed, JobOutput, JobsActor, JobsBusy, JobStoreUnavailable, JobsUnavailable
from actors.jobs.runner import FLUSH_S
from web.asking import answered_model, resolve_model
from web.auth import Grant, authorize, rate_limit_headers_on_errors
from web.body import json_body
from web.chat import (
    KEEPALIVE_BATCH,
    Batch,
    FanoutAnswer,
    Fault,
    Finish,
    channel_batches,
    finish_chunks,
    is_research,
    open_fanout,
    produce_research,
    research_channel,
)
from web.chat_request import ChatRequest, parse_chat_request
from web.completion_format import ChatStream
from web.errors import ApiError, json_response
from web.services import Services
from wire import jsonio

MAX_JOB_ID_CHARS = 64


def not_found() -> ApiError:
    return ApiError(404, "No such job (it may have expired, or belong to another key).", code="job_not_found",
                    param="job_id")


@contextmanager
def job_errors() -> Iterator[None]:
    """The runner's refusals and the store's failures, as the client's answer."""
    try:
        yield
    except JobsBusy as exc:
        raise ApiError(exc.status, str(exc), code=exc.code,
                       headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except JobsUnavailable as exc:
        raise ApiError(503, "Jobs cannot start now; retry shortly.", code="jobs_unavailable",
                       headers={"Retry-After": "1"}) from exc
    except JobStoreUnavailable as exc:
        raise ApiError(503, "The job store is unavailable; try again shortly.", code="job_store_unavailable",
                       headers={"Retry-After": "1"}) from exc


def runner_of(services: Services) -> JobsActor:
    if services.jobs is None:
        raise ApiError(503, "Jobs are not available in this gateway.", code="jobs_unavailable")
    return services.jobs


async def into_job(request: ChatRequest, batches: AsyncGenerator[Batch], output: JobOutput) -> None:
    """A job's consumer of the answer's items: each batch becomes one result chunk."""
    out = ChatStream(answered_model(request), logprobs=request.logprobs, top_logprobs=request.top_logprobs)
    async for batch in batches:
        if batch is KEEPALIVE_BATCH:
            await output.tick()
            continue
        chunks: list[dict[str, Any]] = []
        fault: Fault | None = None
        for item in batch:
            if isinstance(item, Finish):
                chunks += finish_chunks(out, item, include_usage=True)
            elif isinstance(item, Fault):
                fault = item
            elif isinstance(item, Chunk):
                chunks.append(out.chunk(item.text, item.choice))
        if chunks:
            await output.append(jsonio.dumps(chunks).decode())
        if fault is not None:
            raise JobFailed(fault.error.body()["error"])


async def chat_job(services: Services, grant: Grant, request: ChatRequest, output: JobOutput) -> None:
    """An ordinary chat request (mixture included), answered as a stream into the job."""
    try:
        job = await open_fanout(services, request, stream=True)
    except ApiError as exc:
        raise JobFailed(exc.body()["error"]) from exc
    answer = FanoutAnswer(services, grant, request, job, keepalive_s=FLUSH_S)
    try:
        await into_job(request, answer.batches(), output)
    finally:
        job.release()
        answer.account_relayed()  # counted already when the answer was whole


async def research_job(services: Services, grant: Grant, request: ChatRequest, output: JobOutput) -> None:
    """Deep research into the job: the run and the job's writes side by side."""
    failure: JobFailed | None = None
    send, receive = research_channel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce_research, services, grant, request, send)
        try:
            await into_job(request, channel_batches(receive, FLUSH_S), output)
        except JobFailed as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("jobs", __name__)

    @bp.post("/v1/chat/completions/jobs")
    async def create_job() -> Response:
        grant = await authorize(services)
        with rate_limit_headers_on_errors(grant):
            request = parse_chat_request(await json_body(), default_model=services.settings.fanout.default_model)
            if is_research(request):
                work = partial(research_job, services, grant, request)
            else:
                work = partial(chat_job, services, grant, resolve_model(services, request))
            with job_errors():
                record = await runner_of(services).submit(grant.key_id, work)
            return json_response(record.summary(), 202, headers=grant.headers)

    @bp.get("/v1/chat/completions/jobs/<job_id>")
    async def get_job(job_id: str) -> Response:
        grant = await authorize(services)
        with rate_limit_headers_on_errors(grant):
            if len(job_id) > MAX_JOB_ID_CHARS:
                raise not_found()
            with job_errors():
                record = await runner_of(services).get(grant.key_id, job_id)
            if record is None:
                raise not_found()
            return json_response(record.public(), headers=grant.headers)

    @bp.delete("/v1/chat/completions/jobs/<job_id>")
    async def delete_job(job_id: str) -> Response:
        grant = await authorize(services)
        with rate_limit_headers_on_errors(grant):
            if len(job_id) > MAX_JOB_ID_CHARS:
                raise not_found()
            with job_errors():
                record = await runner_of(services).cancel(grant.key_id, job_id)
            if record is None:
                raise not_found()
            return json_response(record.public(), headers=grant.headers)

    return bp
