"""A miner's OpenAI chat chunk: its text, finish_reason and choice, and the usage counts it reports."""

from __future__ import annotations

from typing import Any

MAX_USAGE_TOKENS = 2**31 - 1


def content_of(chunk: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None]:
    """The text delta, finish_reason and choice of an OpenAI chat chunk (empty text when there is none)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None, None
    choice = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        delta = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = delta.get("content") if isinstance(delta, dict) else None
    finish = choice.get("finish_reason")
    return (text if isinstance(text, str) else ""), (finish if isinstance(finish, str) else None), choice


def usage_counts(value: Any) -> dict[str, int] | None:
    """A miner's `usage`, kept only when each count is a plausible non-negative integer."""
    if not isinstance(value, dict):
        return None
    counts = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        count = value.get(name)
        if count is None:
            continue
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_USAGE_TOKENS:
            return None
        counts[name] = count
    return counts or None
