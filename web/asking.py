"""Choosing the miners for a chat request and starting its fan-out.

A model that no miner advertises goes to miners for the task as the subnet's default model (as upstream
serves it), so that validators can score the answers (`fanout.strict_models` keeps it a 404); a request
naming its `uids` asks exactly those and moves no miner's breaker; otherwise `fanout.extra_scoring_miners`
more miners, drawn at random, answer for scoring only.
"""

from __future__ import annotations

from typing import Any

from actors.fanout.job import FanoutJob
from web.chat_request import DEFAULT_MODEL_ALIAS, ChatRequest
from web.errors import fanout_errors
from web.services import Services


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
