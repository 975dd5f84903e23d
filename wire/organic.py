"""What one fan-out produced: every asked miner's answer, under its own uid, for scoring."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from wire import jsonio

SCORED_TASKS = frozenset({"InferenceTask", "WebRetrievalTask"})


@dataclass(slots=True)
class MinerAnswer:
    """One miner's answer to one request, filled in as its stream arrives.

    `chunks`, `timings` and `raw_chunks` are index-aligned, as the validator reads them: entry i of each
    is the text, the arrival time and the JSON (the exact bytes received) of the i-th chunk that carried
    text. Chunks without text (role-only, finish-only, usage) are in none of the three; a last token sent
    together with its finish_reason is in all three.
    """

    uid: int
    hotkey: str
    chunks: list[str] = field(default_factory=list)  # content deltas, in order, none empty
    timings: list[float] = field(default_factory=list)  # seconds from request start, one per chunk
    raw_chunks: list[bytes] = field(default_factory=list)  # the JSON of each chunk in `chunks`, as received
    finish_reason: str | None = None
    usage: dict[str, int] | None = None  # the miner's own token counts, when it sent valid ones
    error: str | None = None  # why this miner failed, if it did
    completed: bool = False  # the stream ended with [DONE]
    received_bytes: int = 0  # of its answer's body, counted against the answer's bounds
    events: int = 0
    scoring_only: bool = False  # asked only so that its answer is scored; never streamed to a client

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def whole(self) -> bool:
        """It answered text and ended as a stream should (a finish_reason, or [DONE]), without failing."""
        return bool(self.chunks) and self.error is None and (self.completed or self.finish_reason is not None)


def scored_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the validator may read it: its model declares `sampling_params: dict[str, float]`
    and answers 500 to anything else there (a `stop` list, a dict, null), so only numbers and booleans
    stay in `sampling_parameters`."""
    params = body.get("sampling_parameters")
    if not isinstance(params, dict):
        return body
    numbers = {k: v for k, v in params.items() if isinstance(v, int | float)}  # booleans are ints
    return body if len(numbers) == len(params) else {**body, "sampling_parameters": numbers}


@dataclass(frozen=True, slots=True)
class OrganicResult:
    """A finished fan-out, ready for the scoring forwarder.

    `body` is the request exactly as sent to the miners (with seed and task); `answers` follow the
    order in which the miners were asked, each keyed by its own uid.
    """

    request_id: str
    task: str
    body: dict[str, Any]
    answers: tuple[MinerAnswer, ...]
    created_at: float  # wall clock, seconds since the epoch

    @property
    def scored(self) -> bool:
        return self.task in SCORED_TASKS

    def encode(self) -> bytes:
        """The `/scoring` body (docs/protocol.md, "The scoring payload"), as the bytes that are signed,
        sent and spooled.

        Each raw chunk goes in as the bytes the miner sent (it was parsed strictly, so it is JSON), not
        decoded and encoded again."""
        answers = self.answers
        uids = [a.uid for a in answers]
        parts = [
            b'{"body":', jsonio.dumps(scored_body(self.body)),
            b',"uids":', jsonio.dumps(uids),
            b',"chunks":', jsonio.dumps({str(a.uid): a.chunks for a in answers}),
            b',"timings":', jsonio.dumps({str(a.uid): a.timings for a in answers}),
            b',"chunk_dicts_raw":{',
        ]
        for i, answer in enumerate(answers):
            parts += [b',"' if i else b'"', str(answer.uid).encode(), b'":[', b",".join(answer.raw_chunks), b"]"]
        parts.append(b"}}")
        return b"".join(parts)

    def trimmed(self, max_bytes: int) -> tuple[OrganicResult, bytes] | None:
        """This result encoded within `max_bytes`, the largest answers cut short (at a chunk, their lists
        still aligned) until it fits, so that a miner that sent much does not cost the others their
        scoring; None when even that cannot fit."""
        answers = [dataclasses.replace(a, chunks=list(a.chunks), timings=list(a.timings),
                                       raw_chunks=list(a.raw_chunks)) for a in self.answers]
        result = dataclasses.replace(self, answers=tuple(answers))
        while len(payload := result.encode()) > max_bytes:
            largest = max(answers, key=lambda a: sum(map(len, a.raw_chunks)))
            if not largest.raw_chunks:
                return None
            keep = len(largest.raw_chunks) // 2
            del largest.chunks[keep:], largest.timings[keep:], largest.raw_chunks[keep:]
        return result, payload

    def scoring_payload(self) -> dict[str, Any]:
        """The same payload as objects (for reading it, in tests and tools)."""
        payload: dict[str, Any] = jsonio.loads(self.encode())
        return payload
