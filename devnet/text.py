"""What simulated miners say: deterministic from the request, so tests can predict every byte.

Answers are words from a fixed list drawn by a PRNG seeded with sha256(seed + messages); web results
are derived from the query, and some of their URLs from the query alone, so that several miners return
overlapping results (the gateway de-duplicates them).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 32
MAX_TOKENS_CAP = 4096
MIN_NATURAL_TOKENS = 12
MAX_NATURAL_TOKENS = 48

WORDS = (
    "the", "subnet", "miner", "answers", "quickly", "with", "a", "clear", "and", "honest", "reply",
    "about", "models", "tokens", "streams", "of", "text", "validator", "scores", "every", "organic",
    "request", "gateway", "signs", "bytes", "on", "the", "wire", "latency", "matters", "more", "than",
    "words", "network", "stake", "incentive", "weights", "epoch", "block", "chain", "query", "result",
    "search", "page", "source", "useful", "simple", "small", "fast", "steady", "bright", "calm",
)


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    logprob: float
    alternative: str
    alternative_logprob: float

    def logprobs(self, *, with_bytes: bool = True) -> dict[str, Any]:
        """The `logprobs` object of a chunk that carries only this token, as vLLM writes it: each entry
        with the token's UTF-8 `bytes` (`with_bytes=False`: without them, the benchmark's lean shape)."""
        def entry(token: str, logprob: float) -> dict[str, Any]:
            found: dict[str, Any] = {"token": token, "logprob": logprob}
            if with_bytes:
                found["bytes"] = list(token.encode())
            return found

        return {"content": [{
            **entry(self.text, self.logprob),
            "top_logprobs": [entry(self.text, self.logprob), entry(self.alternative, self.alternative_logprob)],
        }]}


@dataclass(frozen=True, slots=True)
class Answer:
    tokens: tuple[Token, ...]
    finish_reason: str  # "stop", or "length" when the token limit cut it

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


def request_digest(seed: Any, messages: Any) -> bytes:
    """sha256 over the seed and the messages (canonical JSON): the key of everything a miner says."""
    material = json.dumps([seed, messages], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(material.encode()).digest()


def max_tokens_of(body: dict[str, Any]) -> int:
    """`sampling_parameters.max_new_tokens`, else `max_tokens` / `max_completion_tokens`, else the default."""
    sampling = body.get("sampling_parameters")
    candidates = [sampling.get("max_new_tokens") if isinstance(sampling, dict) else None,
                  body.get("max_tokens"), body.get("max_completion_tokens")]
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return min(value, MAX_TOKENS_CAP)
    return DEFAULT_MAX_TOKENS


def prompt_tokens(messages: Any) -> int:
    """A stand-in for the prompt's token count (words of the messages' text, plus 4 per message), for
    the usage chunk: deterministic, so tests can predict it."""
    if not isinstance(messages, list):
        return 0
    words = sum(len(m["content"].split()) for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), str))
    return words + 4 * len(messages)


def answer(seed: Any, messages: Any, max_tokens: int) -> Answer:
    """The answer to (seed, messages), at most `max_tokens` tokens of "word ", each with a logprob."""
    rng = random.Random(request_digest(seed, messages))
    natural = rng.randint(MIN_NATURAL_TOKENS, MAX_NATURAL_TOKENS)
    count = min(natural, max_tokens)
    tokens = []
    for _ in range(count):
        word, other = rng.choice(WORDS), rng.choice(WORDS)
        logprob = -round(rng.random() * 1.5, 4)
        tokens.append(Token(word + " ", logprob, other + " ", round(logprob - 0.5 - rng.random(), 4)))
    return Answer(tuple(tokens), "length" if natural > max_tokens else "stop")


def scripted_answer(content: str, seed: Any, messages: Any, max_tokens: int) -> Answer:
    """`content` as an answer: a token per word (with the spaces after it), logprobs drawn as `answer`
    draws them, cut at `max_tokens` (for prompts whose answer is scripted, such as research steps)."""
    rng = random.Random(request_digest(seed, messages))
    pieces = re.findall(r"\s*\S+\s*", content) or [content]
    tokens = []
    for piece in pieces[:max_tokens]:
        logprob = -round(rng.random() * 1.5, 4)
        tokens.append(Token(piece, logprob, rng.choice(WORDS) + " ", round(logprob - 0.5 - rng.random(), 4)))
    return Answer(tuple(tokens), "length" if len(pieces) > max_tokens else "stop")


def fixed_answer(seed: Any, messages: Any, length: int, max_tokens: int) -> Answer:
    """An answer of exactly `length` tokens (fewer if the limit is lower): for benchmarks."""
    rng = random.Random(request_digest(seed, messages))
    count = min(length, max_tokens)
    tokens = tuple(Token(rng.choice(WORDS) + " ", -0.1, "a ", -2.0) for _ in range(count))
    return Answer(tokens, "length" if length > max_tokens else "stop")


def search_results(query: str, miner_uid: int, count: int) -> list[dict[str, str | None]]:
    """`count` web results for `query`: even-numbered ones share their URL across miners, odd ones do not."""
    slug = hashlib.sha256(query.encode()).hexdigest()[:10]
    rng = random.Random(f"{query}\x00{miner_uid}")
    results: list[dict[str, str | None]] = []
    for i in range(count):
        shared = i % 2 == 0
        url = (f"https://docs.example.org/{slug}/{i}" if shared
               else f"https://miner-{miner_uid}.example.net/{slug}/{i}")
        words = " ".join(rng.choice(WORDS) for _ in range(12))
        results.append({
            "url": url,
            "content": f"{query}: {words}.",
            "relevant": f"This page is about {query}." if shared else None,
        })
    return results
