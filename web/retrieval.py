"""Web retrieval: miners return search results, the gateway merges them.

`GET /web_retrieval?search_query=...&n_miners=&n_results=&max_response_time=&uids=` (uids repeated
or comma-separated), and the predecessor's `POST /web_retrieval` with the same fields in a JSON body.
Miners are asked for `target_results = n_results` and each streams one JSON array of
`{url, content, relevant}` (some send that array double-encoded, as a JSON string). The gateway waits
`max_response_time` seconds (30 by default, as upstream does), then merges round-robin: the first usable
item of each miner in the order they were asked, then the second of each, and so on; the first mention
of a URL wins, up to `n_results`. Every miner's answer is forwarded for scoring.

Miners are hostile: an item counts only with an `http(s)` URL that names a host (at most
`MAX_URL_CHARS`) and non-empty `content`; `content` and `relevant` are cut to `MAX_CONTENT_CHARS` and
`MAX_RELEVANT_CHARS`. An answer that is not such JSON (invalid, nested deeper than
`wire.jsonio.MAX_DEPTH`, over `MAX_ANSWER_CHARS`) is that miner's failure, listed in the 502's
`details` when no miner returned anything usable; the other miners' results still count.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio
from quart import Blueprint, Response, request

from actors.fanout.job import FanoutJob
from actors.fanout.selection import MAX_EXPLICIT_UIDS
from web.auth import Grant, authorize, rate_limit_headers_on_errors
from web.body import int_arg, json_body
from web.errors import ApiError, fanout_errors, json_response
from web.services import Services
from wire import jsonio
from wire.organic import MinerAnswer

TASK = "WebRetrievalTask"
FINISH_GRACE_S = 0.5
MAX_QUERY_CHARS = 2000
DEFAULT_RESPONSE_TIME_S = 30  # upstream's wait for web retrieval miners
MAX_RESPONSE_TIME_S = 120
MAX_URL_CHARS = 2048  # what browsers and search engines handle; longer is not a result page
MAX_CONTENT_CHARS = 20_000  # a page's extract; with 100 results a response stays near 2 MB at most
MAX_RELEVANT_CHARS = 2_000  # a sentence or two on why the page answers the query
MAX_ANSWER_CHARS = 4_000_000  # one miner's whole answer: 100 results at the limits above, with room
URL_SCHEMES = frozenset({"http", "https"})


class UnusableAnswer(ValueError):
    """A miner's answer holds no usable results; the message says why (it goes to the 502's details)."""


@dataclass(slots=True)
class Merged:
    """The merged results, and why each miner that contributed nothing usable did not."""

    results: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)


def result_item(item: Any) -> dict[str, Any] | None:
    """The item as a result (`content` and `relevant` cut to their limits), or None when it is unusable."""
    if not isinstance(item, Mapping):
        return None
    url, content, relevant = item.get("url"), item.get("content"), item.get("relevant")
    if not isinstance(url, str) or not usable_url(url):
        return None
    if not isinstance(content, str) or not content.strip():
        return None
    return {"url": url, "content": content[:MAX_CONTENT_CHARS],
            "relevant": relevant[:MAX_RELEVANT_CHARS] if isinstance(relevant, str) else None}


def usable_url(url: str) -> bool:
    """An absolute http(s) URL with a host, at most MAX_URL_CHARS, without spaces, control characters or
    angle brackets (never valid unencoded, and they would break the `<url>` links deep research writes).
    Every URL a miner names, for retrieval or deep research, is checked here."""
    if not url or len(url) > MAX_URL_CHARS or any(c <= " " or c in "\x7f<>" for c in url):
        return False
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    return parts.scheme.lower() in URL_SCHEMES and bool(host)


def miner_results(answer: MinerAnswer) -> list[dict[str, Any]]:
    """The usable results of one miner's answer, in its order; UnusableAnswer when there are none."""
    size = sum(len(piece) for piece in answer.chunks)
    if size > MAX_ANSWER_CHARS:
        raise UnusableAnswer(f"answered {size} characters, over the {MAX_ANSWER_CHARS} allowed")
    parsed = _parse(answer.text)
    if isinstance(parsed, str):  # double-encoded: a JSON string whose text is the list
        parsed = _parse(parsed)
    if not isinstance(parsed, list):
        raise UnusableAnswer(f"answered a JSON {type(parsed).__name__}, not a list of results")
    results = [r for r in map(result_item, parsed) if r is not None]
    if not results:
        raise UnusableAnswer(f"answered {len(parsed)} items, none with an http(s) url and content")
    return results


def _parse(text: str) -> Any:
    try:
        return jsonio.loads_bounded(text)
    except ValueError as exc:
        # orjson stops at 1,024 levels before jsonio's own check can: that is the same failure
        too_deep = isinstance(exc, jsonio.TooDeep) or str(exc).startswith("depth limit exceeded")
        raise UnusableAnswer(f"answered JSON nested deeper than {jsonio.MAX_DEPTH} levels" if too_deep
                             else f"answered text that is not valid JSON ({str(exc)[:200]})") from None


def merge_results(answers: Sequence[MinerAnswer], n_results: int) -> Merged:
    """Round-robin over the miners in the order given, the first mention of a URL winning, up to
    `n_results`. Miners that sent no text are not listed in `failures` (the fan-out says why)."""
    merged = Merged()
    per_miner: list[list[dict[str, Any]]] = []
    for answer in answers:
        if not answer.chunks:
            continue
        try:
            per_miner.append(miner_results(answer))
        except UnusableAnswer as exc:
            merged.failures[answer.uid] = str(exc)
    seen: set[str] = set()
    rounds = max(map(len, per_miner), default=0)
    for i in range(rounds):
        for results in per_miner:
            if i < len(results) and results[i]["url"] not in seen:
                seen.add(results[i]["url"])
                merged.results.append(results[i])
                if len(merged.results) >= n_results:
                    return merged
    return merged


def parse_uids(values: list[Any]) -> list[int] | None:
    """The uids a client named (repeated or comma-separated), at most MAX_EXPLICIT_UIDS."""
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
            if len(uids) > MAX_EXPLICIT_UIDS:
                raise ApiError(400, f"'uids' may name at most {MAX_EXPLICIT_UIDS} miners.", param="uids",
                               code="too_many_uids")
    return uids or None


def _field(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{name}' must be a number.", param=name, code="invalid_parameter")
    return str(value)


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
    max_time = int_arg("max_response_time", _field(params, "max_response_time"),
                       default=DEFAULT_RESPONSE_TIME_S, low=1, high=MAX_RESPONSE_TIME_S)
    uids = parse_uids(uid_values)
    merged, job = await search(services, query, n_miners=n_miners, n_results=n_results, max_time=max_time,
                               uids=uids)
    if not merged.results:
        # A miner the fan-out saw fail is listed with that cause (its partial text cannot parse anyway).
        reasons = {**merged.failures, **job.errors()}
        raise ApiError(502, "No miner returned usable search results.", code="miners_failed",
                       details={str(a.uid): reasons[a.uid] for a in job.answers if a.uid in reasons} or None)
    return json_response({"results": merged.results}, headers=grant.headers)


async def search(services: Services, query: str, *, n_miners: int, n_results: int, max_time: int,
                 uids: list[int] | None = None) -> tuple[Merged, FanoutJob]:
    """One web retrieval fan-out (also deep research's web_search): `n_miners` miners (or `uids`) asked for
    `n_results` each, heard for `max_time` seconds, their answers merged. Selection and overload are
    ApiErrors (400, 503)."""
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
        job = services.fanout.start(body, miners, mode="all", task=TASK, timeout_s=float(max_time),
                                    moves_breakers=uids is None)
    try:
        # Each miner is cut at `max_time` by the fan-out itself, which then says why: a moment more.
        with trio.move_on_after(max_time + FINISH_GRACE_S):
            await job.finished.wait()
    finally:
        job.release()
    return merge_results(job.answers, n_results), job


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("retrieval", __name__)

    @bp.get("/web_retrieval")
    async def web_retrieval_get() -> Response:
        grant = await authorize(services)
        with rate_limit_headers_on_errors(grant):
            return await retrieve_for(services, grant, request.args, request.args.getlist("uids"))

    @bp.post("/web_retrieval")
    async def web_retrieval_post() -> Response:
        grant = await authorize(services)  # before the body: an unauthorised client's body is never read
        with rate_limit_headers_on_errors(grant):
            data = await json_body()
            if not isinstance(data, dict):
                raise ApiError(400, "The request body must be a JSON object.", code="invalid_request")
            uids = data.get("uids")
            if uids is not None and not isinstance(uids, list):
                raise ApiError(400, "'uids' must be an array of integers.", param="uids",
                               code="invalid_parameter")
            return await retrieve_for(services, grant, data, uids or [])

    return bp
