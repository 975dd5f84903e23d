"""One request's fan-out: the miners asked, their answers as they arrive, and the channel of events
towards the handler waiting on it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from actors.fanout.bounds import AnswerBounds
from actors.fanout.events import FINAL_EVENTS, Event
from actors.fanout.race import StreamRace
from wire.metagraph import Neuron
from wire.organic import MinerAnswer, OrganicResult

Mode = Literal["stream", "complete", "all"]


@dataclass
class FanoutJob:
    """A fan-out's state. Two separate ends: `answered` (the handler has had its last event: the answer
    is whole, broken or failed) and `handler_left` (nobody reads any more: the client left, or the
    handler released the job); either stops events, neither stops the miners, who are heard out for
    scoring until they finish or the job is cut short."""

    request_id: str
    task: str
    body: dict[str, Any]
    miners: list[Neuron]
    mode: Mode
    timeout_s: float
    bounds: AnswerBounds
    max_bytes_held: int = 1 << 62  # what its miners' answers may hold together
    started: float = field(default_factory=trio.current_time)
    answers: list[MinerAnswer] = field(default_factory=list)
    winner: int | None = None
    stall_s: float = 1.5
    moves_breakers: bool = True  # False for requests that name their miners
    scoring_only: int = 0  # how many of `miners`, at the end, are asked only for scoring
    finished: trio.Event = field(default_factory=trio.Event)
    first_done: trio.Event = field(default_factory=trio.Event)  # a miner finished well, or the job ended
    answered: bool = False
    handler_left: bool = False
    released: bool = False  # the handler is done with the job; what remains is collection for scoring
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cut_reason: str | None = None  # why the job was cut short, when it was
    trials: dict[int, int] = field(default_factory=dict)  # miner index -> number of the half-open trial it holds
    race: StreamRace | None = field(init=False, default=None)  # mode "stream": the winner, stalls and takeovers
    settled: list[bool] = field(default_factory=list)  # per miner: its answer is over
    pending: int = 0  # primary miners (not scoring-only) still answering
    bytes_held: int = 0  # what the miners have sent, together (`AnswerBounds.request_bytes` bounds it)
    over_budget: set[int] = field(default_factory=set)  # miners cut because the request held too much
    _on_release: Callable[[], None] | None = None
    _send: trio.MemorySendChannel[Event] = field(init=False)
    receive: trio.MemoryReceiveChannel[Event] = field(init=False)

    def __post_init__(self) -> None:
        # Events towards the handler are never waited on: a client reading slowly never holds up the
        # reading of the miners (whose timings are scored) nor makes the winner look stalled, and no
        # event costs a trip through the scheduler. What the buffer holds is bounded by the answers'
        # own bounds: a chunk event's text is the text its answer holds already, and a fan-out's
        # events are at most its winners' events and one rest and one end per takeover.
        self._send, self.receive = trio.open_memory_channel[Event](math.inf)
        primaries = len(self.miners) - self.scoring_only
        self.answers = [MinerAnswer(uid=n.uid, hotkey=n.hotkey, scoring_only=i >= primaries)
                        for i, n in enumerate(self.miners)]
        self.pending = primaries
        self.settled = [False] * len(self.miners)
        if self.mode == "stream":
            self.race = StreamRace(self)

    @property
    def out_of_time(self) -> bool:
        """Whether the job ends for its time budget: not cut short (`cut_reason`), and the deadline of
        `cancel_scope` (set when the job runs) has passed. Either may come first and the other be seen
        by the time the job's tasks are unwound: a cut always wins."""
        return self.cut_reason is None and trio.current_time() >= self.cancel_scope.deadline

    @property
    def streaming(self) -> bool:
        """Whether events still go to the handler."""
        return not (self.answered or self.handler_left)

    def release(self) -> None:
        """The handler is done: no more events for it; the miners go on only for scoring."""
        self.receive.close()
        self.handler_left = True
        if not self.released:
            self.released = True
            if self._on_release is not None:
                self._on_release()

    @property
    def winner_answer(self) -> MinerAnswer | None:
        return None if self.winner is None else self.answers[self.winner]

    def errors(self) -> dict[int, str]:
        return {a.uid: a.error or "no answer" for a in self.answers
                if not a.scoring_only and (a.error or not a.chunks)}

    def emit(self, event: Event) -> None:
        if not self.streaming:
            return
        if isinstance(event, FINAL_EVENTS):
            self.answered = True
        try:
            self._send.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.handler_left = True  # the handler left (client disconnect, timeout): keep collecting

    def result(self) -> OrganicResult:
        return OrganicResult(
            request_id=self.request_id, task=self.task, body=self.body, answers=tuple(self.answers),
            created_at=time.time(),
        )
