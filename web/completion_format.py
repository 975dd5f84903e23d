"""The client's side of a chat answer, in OpenAI's shapes, rebuilt from an allowlist.

Nothing a miner sends reaches a client as it was sent: a delta is the role (once) and the text; logprobs
are rebuilt in OpenAI's shape, only when the request asked for them; a finish_reason is one of the
values a plain completion can have. A miner's `tool_calls`, `function_call`, extra fields or its own
`finish_reason: "tool_calls"` never reach the client (an agent framework would run the tool).

Usage counts what was relayed: a miner's own counts are kept only within the request's token budget
(prompt tokens within what the prompt's length allows), else one completion token per content chunk
(Subnet 1 miners stream a token a chunk) and the prompt estimated at a token per four characters.
"""

from __future__ import annotations

import math
import time
from typing import Any

from wire import jsonio
from wire.chunks import content_of
from wire.ids import uuid4_hex
from wire.organic import MinerAnswer

FINISH_REASONS = frozenset({"stop", "length", "content_filter"})
MAX_TOKEN_CHARS = 256  # one logprob entry's token text
MAX_TOKEN_BYTES = 256
MAX_ENTRIES_PER_CHUNK = 64


def finish_reason(value: str | None) -> str:
    return value if value in FINISH_REASONS else "stop"


def _token_bytes(value: Any) -> list[int] | None:
    if (isinstance(value, list) and len(value) <= MAX_TOKEN_BYTES
            and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value)):
        return value
    return None


def _entry(entry: Any, top: int) -> dict[str, Any] | None:
    """One token's logprob in OpenAI's shape, or None when the miner's entry is not one."""
    if not isinstance(entry, dict):
        return None
    token, logprob = entry.get("token"), entry.get("logprob")
    if (not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or isinstance(logprob, bool)
            or not isinstance(logprob, int | float) or not math.isfinite(logprob)):
        return None
    out: dict[str, Any] = {"token": token, "logprob": float(logprob), "bytes": _token_bytes(entry.get("bytes"))}
    if top >= 0:
        alternatives = entry.get("top_logprobs")
        tops = []
        if isinstance(alternatives, list):
            for alternative in alternatives[:top]:
                found = _entry(alternative, -1)
                if found is not None:
                    tops.append(found)
        out["top_logprobs"] = tops
    return out


def logprobs_of(choice: dict[str, Any] | None, top: int) -> list[dict[str, Any]]:
    """The `logprobs.content` entries of one miner chunk's choice, rebuilt (empty when it has none)."""
    logprobs = choice.get("logprobs") if choice is not None else None
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return []
    entries = (_entry(e, top) for e in content[:MAX_ENTRIES_PER_CHUNK])
    return [e for e in entries if e is not None]


def answer_logprobs(answer: MinerAnswer, top: int) -> list[dict[str, Any]]:
    """Every content chunk's logprobs, in order (for a whole answer sent at once)."""
    entries: list[dict[str, Any]] = []
    for raw in answer.raw_chunks:
        _, _, choice = content_of(jsonio.loads(raw))
        entries += logprobs_of(choice, top)
    return entries


class ChatStream:
    """Turns the winner's text into the client's OpenAI chunks (one id, one model name)."""

    def __init__(self, model: str, *, logprobs: bool = False, top_logprobs: int | None = None) -> None:
        self.id = f"chatcmpl-{uuid4_hex()}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self.top = top_logprobs or 0
        self.sent_role = False
        self.relayed = 0  # content chunks sent to the client

    def _wrap(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def chunk(self, text: str, choice: dict[str, Any] | None) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text}
        if not self.sent_role:
            delta = {"role": "assistant", "content": text}
            self.sent_role = True
        out: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if self.logprobs:
            out["logprobs"] = {"content": logprobs_of(choice, self.top)}
        self.relayed += 1
        return self._wrap(out)

    def finish(self, reason: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {} if self.sent_role else {"role": "assistant", "content": ""}
        self.sent_role = True
        return self._wrap({"index": 0, "delta": delta, "finish_reason": finish_reason(reason)})

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}


def completion_body(answer: MinerAnswer, model: str, usage: dict[str, int], *, logprobs: bool,
                    top_logprobs: int | None) -> dict[str, Any]:
    """A whole answer as one `chat.completion`."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                              "finish_reason": finish_reason(answer.finish_reason), "logprobs": None}
    if logprobs:
        choice["logprobs"] = {"content": answer_logprobs(answer, top_logprobs or 0)}
    return {"id": f"chatcmpl-{uuid4_hex()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))


def estimated_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """About one token per four characters of the messages' text, plus a few per message."""
    return -(-prompt_chars(messages) // 4) + 4 * len(messages)


def usage_of(answer: MinerAnswer | None, messages: list[dict[str, Any]], *, budget: int,
             relayed: int | None = None) -> dict[str, int]:
    """OpenAI `usage`, all three counts. `relayed`: the content chunks the client received of an answer
    that did not reach its end (the client left, or it broke off); only those count then."""
    reported = (answer.usage if answer is not None else None) or {}
    if relayed is not None or answer is None:
        completion = relayed or 0
    else:
        count = reported.get("completion_tokens")
        # A token is a byte of text or more: a miner cannot bill more tokens than it wrote bytes.
        completion = (min(count, budget, len(answer.text.encode())) if count is not None
                      else min(len(answer.chunks), budget))
    prompt = reported.get("prompt_tokens")
    if prompt is None or prompt > prompt_chars(messages) + 4 * len(messages) + 16:  # a token is a character or more
        prompt = estimated_prompt_tokens(messages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
