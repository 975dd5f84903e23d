"""How long a miner may take and how much it may send, from the request's own token budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 1024  # upstream's default
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 60.0, 300.0
RETRIEVAL_TASK = "WebRetrievalTask"
RETRIEVAL_MAX_BYTES = 8 * 1024 * 1024


def token_budget(body: dict[str, Any]) -> int:
    """The request's `max_new_tokens` (OpenAI's `max_tokens` counts too), else upstream's default."""
    params = body.get("sampling_parameters")
    limit = params.get("max_new_tokens") if isinstance(params, dict) else None
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        limit = DEFAULT_MAX_NEW_TOKENS
    return limit


def request_timeout_s(body: dict[str, Any]) -> float:
    """Upstream v2.19's budget for one miner's answer (also the wait for its first chunk):
    clamp(max(30, 10 * floor(log2(max_new_tokens / 256)) + 30), 60, 300) seconds, or the client's
    `timeout` field clamped the same way."""
    given = body.get("timeout")
    if isinstance(given, int | float) and not isinstance(given, bool) and 0 < given <= MAX_TIMEOUT_S * 1000:
        seconds = float(given)  # (NaN fails the comparison; an integer too large for a float never gets here)
    else:
        seconds = float(max(30, 10 * math.floor(math.log2(token_budget(body) / 256)) + 30))
    return min(max(seconds, MIN_TIMEOUT_S), MAX_TIMEOUT_S)


BASE_BYTES = 64 * 1024
TYPICAL_BYTES_PER_TOKEN = 600  # a token's chunk with its logprobs, as vLLM streams it
MAX_BYTES_PER_TOKEN = 2048  # what one miner may send, with room for long top_logprobs lists
MAX_ANSWER_BYTES = 16 * 1024 * 1024
RETRIEVAL_TYPICAL_BYTES = 512 * 1024
REQUEST_MAX_BYTES = 16 * 1024 * 1024  # one request's answers together, at least (scoring.max_payload_bytes' default)


@dataclass(frozen=True, slots=True)
class AnswerBounds:
    """What one miner's answer may hold, derived from the token budget with a generous margin (a
    Subnet 1 miner streams a token per chunk, a few hundred bytes with its logprobs), and what one
    request's answers may hold together: each miner a typical answer's worth, and two of them their
    whole bound, but never more than REQUEST_MAX_BYTES or two whole answers, whichever is more (a
    request naming many miners at a large token budget would otherwise be allowed gigabytes). Bytes
    count as received, chunk framing included."""

    max_bytes: int
    max_events: int
    max_event_bytes: int = 64 * 1024
    max_chunk_chars: int | None = 8192  # one chunk's text: a token, or a few; never passed on beyond it
    typical_bytes: int = BASE_BYTES

    @classmethod
    def for_request(cls, task: str, body: dict[str, Any]) -> AnswerBounds:
        if task == RETRIEVAL_TASK:  # one chunk holding every result's page text as a JSON list
            return cls(max_bytes=RETRIEVAL_MAX_BYTES, max_events=256, max_event_bytes=RETRIEVAL_MAX_BYTES,
                       max_chunk_chars=None, typical_bytes=RETRIEVAL_TYPICAL_BYTES)
        tokens = token_budget(body)
        return cls(max_bytes=min(BASE_BYTES + MAX_BYTES_PER_TOKEN * tokens, MAX_ANSWER_BYTES),
                   max_events=2 * tokens + 64,
                   typical_bytes=min(BASE_BYTES + TYPICAL_BYTES_PER_TOKEN * tokens, MAX_ANSWER_BYTES))

    def request_bytes(self, miners: int) -> int:
        """What the answers of one request's `miners` may hold together."""
        wanted = miners * self.typical_bytes + 2 * max(0, self.max_bytes - self.typical_bytes)
        return min(wanted, max(REQUEST_MAX_BYTES, 2 * self.max_bytes))
