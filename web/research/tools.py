"""`ResearchTools` over the gateway's own fan-out: what a deep-research run asks of the subnet.

Each model call is an ordinary streamed chat fan-out (`web.asking.start_job`) with upstream's
parameters for these calls: the subnet's default model, temperature 0.15, `max_new_tokens` 6144 and a
120 s budget; its answer is the winner's text, joined. Each web search is an ordinary web retrieval
(`web.retrieval.search`). Both go through the fan-out pool like any client request, so every miner's
answer is forwarded to a validator for scoring as an ordinary organic.

Charging: the run is one request against the client's key (checked and counted when the request
arrives), so a key's rate limit counts what its client sends, and a run is never refused half-way for
its own calls. Its token usage is every call's: `usage` sums each call's prompt and completion tokens,
and the completion tokens are added to the key's usage when the run ends, however it ends.
"""

from __future__ import annotations

import random
from typing import Any

import trio

from actors.fanout.events import Broken, Chunk, End, Failed
from actors.fanout.job import FanoutJob
from config.settings import ResearchSettings
from web import retrieval
from web.asking import start_job
from web.chat_request import MAX_SEED, parse_chat_request
from web.completion_format import usage_of
from web.errors import ApiError
from web.research.orchestrator import ResearchCallFailed, ResearchLimits
from web.research.steps import clip
from web.services import Services

TEMPERATURE = 0.15  # upstream's, for every call of a run
MAX_NEW_TOKENS = 6144
CALL_TIMEOUT_S = 120


def research_limits(settings: ResearchSettings) -> ResearchLimits:
    return ResearchLimits(max_steps=settings.max_steps, deadline_s=settings.deadline_s,
                          json_retries=settings.json_retries,
                          max_tool_calls_per_step=settings.max_tool_calls_per_step,
                          search_results=settings.search_results)


class FanoutTools:
    """ResearchTools for one run; `usage` sums the tokens of its model calls, billed to the run's key."""

    def __init__(self, services: Services, *, rng: random.Random | None = None) -> None:
        self.services = services
        self.rng = rng or random.Random()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    async def complete(self, messages: list[dict[str, str]], *, step: str) -> str:
        default_model = self.services.settings.fanout.default_model
        request = parse_chat_request(
            {"messages": messages, "model": default_model, "stream": True, "temperature": TEMPERATURE,
             "max_tokens": MAX_NEW_TOKENS, "timeout": CALL_TIMEOUT_S, "seed": self.rng.randint(0, MAX_SEED)},
            default_model=default_model)
        try:
            job = start_job(self.services, request, request.miner_body, mode="stream")
        except ApiError as exc:
            raise ResearchCallFailed(exc.message) from exc
        try:
            text = await self._joined(job)
        finally:
            job.release()  # whatever happens (the run cancelled, say), the miners go on only for scoring
            used = usage_of(job.winner_answer, request.messages, budget=request.max_new_tokens)
            for name, count in used.items():
                self.usage[name] += count
        return text

    @staticmethod
    async def _joined(job: FanoutJob) -> str:
        """The winner's text, once its answer is whole."""
        pieces: list[str] = []
        with trio.move_on_after(job.timeout_s):
            async for event in job.receive:
                if isinstance(event, Chunk):
                    pieces.append(event.text)
                elif isinstance(event, End):
                    return "".join(pieces)
                elif isinstance(event, Failed):
                    reasons = "; ".join(f"uid {uid}: {error}" for uid, error in sorted(event.errors.items()))
                    raise ResearchCallFailed(clip(f"every miner failed ({reasons})", 300))
                elif isinstance(event, Broken):
                    raise ResearchCallFailed(f"the answer broke off ({event.error})")
            raise ResearchCallFailed("the miners' answers ended without a result")
        raise ResearchCallFailed(f"no whole answer within {job.timeout_s:g} s")

    async def search(self, query: str, *, n_results: int) -> list[dict[str, Any]]:
        settings = self.services.settings.research
        try:
            merged, _ = await retrieval.search(self.services, query, n_miners=settings.search_miners,
                                               n_results=n_results, max_time=settings.search_timeout_s)
        except ApiError as exc:
            raise ResearchCallFailed(exc.message) from exc
        return merged.results
