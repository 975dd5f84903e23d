"""Web retrieval: miners return search results, the gateway merges them.

`GET /web_retrieval?search_query=...&n_miners=&n_results=&max_response_time=&uids=` (uids repeated
or comma-separated), and the predecessor's `POST /web_retrieval` with the same fields in a JSON body.
Each miner streams one JSON array of `{url, content, relevant}`; the gateway joins each miner's chunks,
skips what does not parse, keeps objects with a URL, de-duplicates by URL (first wins) and returns at
most `n_results`. Every miner's answer is forwarded for scoring.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import trio
from quart import Blueprint, Response, request

from engine.organic import MinerAnswer
from engine.services import Services
from web.auth import Grant, authorize, rate_limit_headers_on_errors
from web.body import int_arg, json_body
from web.errors import ApiError, fanout_errors, json_response

TASK = "WebRetrievalTask"
MAX_QUERY_CHARS = 2000


def merge_results(answers: list[MinerAnswer], n_results: int) -> list[dict[str, Any]]:
    seen: set[str] = set()
    merged: list[dict[str, Any]] = []
    for answer in answers:
        try:
            parsed = json.loads(answer.text)
        except ValueError:
            continue
        items = parsed if isinstance(parsed, list) else [parsed]
        flat: list[Any] = []
        for item in items:
            flat.extend(item if isinstance(item, list) else [item])
        for item in flat:
            if not isinstance(item, Mapping) or not isinstance(item.get("url"), str) or not item["url"]:
                continue
            if item["url"] in seen:
                continue
            seen.add(item["url"])
            merged.append({
                "url": item["url"],
                "content": item.get("content") if isinstance(item.get("content"), str) else None,
                "relevant": item.get("relevant") if isinstance(item.get("relevant"), str) else None,
            })
            if len(merged) >= n_results:
                return merged
    return merged


def parse_uids(values: list[Any]) -> list[int] | None:
    uids: list[int] = []
    for value in values:
        parts = value.split(",") if isinstance(value, str) else [value]
        for part in parts:
            if isinstance(part, str):
                part = part.strip()
                if not part:
                    continue
            try:
                if isinstance(part, bool | float):
                    raise ValueError
                uid = int(part)
            except (TypeError, ValueError):
                raise ApiError(400, f"'uids' must be integers, not {part!r}.", param="uids",
                               code="invalid_parameter") from None
            if uid < 0:
                raise ApiError(400, "'uids' must be non-negative.", param="uids", code="invalid_parameter")
            uids.append(uid)
    return uids or None


def _field(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{name}' must be a number.", param=name, code="invalid_parameter")
    return str(value)


async def retrieve(services: Services, params: Mapping[str, Any], uid_values: list[Any]) -> Response:
    grant = await authorize(services)
    with rate_limit_headers_on_errors(grant):
        return await retrieve_for(services, grant, params, uid_values)


async def retrieve_for(services: Services, grant: Grant, params: Mapping[str, Any], uid_values: list[Any]
                       ) -> Response:
    query = params.get("search_query")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, "'search_query' is required and must be a non-empty string.",
                       param="search_query", code="missing_parameter")
    if len(query) > MAX_QUERY_CHARS:
        raise ApiError(400, f"'search_query' is longer than {MAX_QUERY_CHARS} characters.",
                       param="search_query", code="invalid_parameter")
    n_miners = int_arg("n_miners", _field(params, "n_miners"), default=10, low=1, high=64)
    n_results = int_arg("n_results", _field(params, "n_results"), default=5, low=1, high=100)
    max_time = int_arg("max_response_time", _field(params, "max_response_time"), default=10, low=1, high=120)
    uids = parse_uids(uid_values)
    body = {
        "seed": random.randint(0, 2**32 - 1),
        "sampling_parameters": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 256, "do_sample": True},
        "task": TASK,
        "target_results": n_results,
        "timeout": max_time,
        "messages": [{"role": "user", "content": query}],
    }
    with fanout_errors():
        miners = (services.selector.explicit(uids) if uids is not None
                  else services.selector.pick(TASK, None, n_miners))
        job = services.fanout.start(body, miners, mode="all", task=TASK, timeout_s=float(max_time))
    try:
        with trio.move_on_after(max_time):
            await job.finished.wait()
    finally:
        job.release()
    answered = [a for a in job.answers if a.chunks]
    results = merge_results(answered, n_results)
    if not results:
        raise ApiError(502, "No miner returned usable search results.", code="miners_failed",
                       details={str(uid): e for uid, e in job.errors().items()} or None)
    return json_response({"results": results}, headers={**grant.headers, "X-Request-Id": job.request_id})


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("retrieval", __name__)

    @bp.get("/web_retrieval")
    async def web_retrieval_get() -> Response:
        return await retrieve(services, request.args, request.args.getlist("uids"))

    @bp.post("/web_retrieval")
    async def web_retrieval_post() -> Response:
        data = await json_body()
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_request")
        uids = data.get("uids")
        if uids is not None and not isinstance(uids, list):
            raise ApiError(400, "'uids' must be an array of integers.", param="uids", code="invalid_parameter")
        return await retrieve(services, data, uids or [])

    return bp
