"""The stream race of one fan-out: who the winner is, when it stalls or breaks, and who takes over.

The winner is the first miner to send text; its chunks are passed on as they arrive. Subnet 1 miners
answer a seeded request with the same text, so when the winner breaks or stalls (no chunk for
`stall_s`), another miner whose answer so far begins with exactly what the client has received takes
over from that point. Without such a miner the stream ends in an error: at once when no miner still
answering can catch up, else `stall_s` after the break. Miners asked only for scoring never win.

Checking who can take over is incremental (`covers`): each chunk of each miner is compared once with
what the client received, so a stalled winner costs no more than the text that arrives meanwhile.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from actors.fanout.events import Broken, Chunk, End

if TYPE_CHECKING:
    from actors.fanout.job import FanoutJob

log = logging.getLogger("sn1_gateway.fanout")


class StreamRace:
    def __init__(self, job: FanoutJob) -> None:
        self.job = job
        self.winner_broken = False
        self.broken_at: float | None = None  # when the winner broke with no successor ready
        self.takeovers = 0
        self.winner_seen_at = 0.0  # when the winner last sent a chunk
        self._sent: list[str] = []  # the text the client has received, in pieces
        self._sent_len = 0
        self._sent_text = ""  # "".join(_sent), joined again only when _sent has grown
        self._sent_joined = 0  # pieces in _sent_text
        count = len(job.miners)
        self._checked = [(0, 0)] * count  # per answer: chunks and characters agreeing with what was sent
        self._diverged = [False] * count

    # -- what the client has received, and who agrees with it ----------------------------------

    def sent_text(self) -> str:
        if self._sent_joined != len(self._sent):
            self._sent_text, self._sent_joined = "".join(self._sent), len(self._sent)
        return self._sent_text

    def send_text(self, text: str) -> None:
        self._sent.append(text)
        self._sent_len += len(text)

    def covers(self, j: int) -> bool:
        """Whether answer j so far begins with everything the client has received. Incremental: each
        of its chunks is compared once (a chunk reaching past the received text again until it is
        passed)."""
        if self._diverged[j]:
            return False
        chunks = self.job.answers[j].chunks
        sent = self.sent_text()
        n, pos = self._checked[j]
        while n < len(chunks) and pos < len(sent):
            piece = chunks[n]
            if pos + len(piece) > len(sent):  # reaches past what was sent: compare the part within
                if not sent.startswith(piece[:len(sent) - pos], pos):
                    self._diverged[j] = True
                    return False
                self._checked[j] = (n, pos)
                return True
            if not sent.startswith(piece, pos):
                self._diverged[j] = True
                return False
            n, pos = n + 1, pos + len(piece)
        self._checked[j] = (n, pos)
        return pos >= len(sent)

    def rest_of(self, j: int) -> str:
        """What answer j (which covers the received text) says beyond it."""
        n, pos = self._checked[j]
        return "".join(self.job.answers[j].chunks[n:])[self._sent_len - pos:]

    def _candidate(self, j: int) -> bool:
        answer = self.job.answers[j]
        return j != self.job.winner and not answer.scoring_only and answer.error is None

    def successor(self, now: float) -> int | None:
        """A miner that can continue the client's stream: the winner is broken or stalled, and this
        miner's answer so far begins with exactly what the client received (and it has not failed)."""
        job = self.job
        if job.winner is None or not job.streaming:
            return None
        if not self.winner_broken and now - self.winner_seen_at < job.stall_s:
            return None
        for j in range(len(job.answers)):
            if self._candidate(j) and job.answers[j].chunks and self.covers(j):
                return j
        return None

    def may_catch_up(self) -> bool:
        """Whether a miner still answering has said nothing yet that differs from what the client has:
        it may yet reach it (the watcher waits for that at most `stall_s`)."""
        return any(self._candidate(j) and not self.job.settled[j] and (self.covers(j) or not self._diverged[j])
                   for j in range(len(self.job.answers)))

    # -- what happens as answers arrive -----------------------------------------------------------

    def on_chunk(self, i: int, text: str, finish: str | None, choice: dict[str, Any] | None) -> None:
        """Miner i sent a chunk (its text already in its answer)."""
        job = self.job
        if job.winner is None:
            if not text:
                return
            job.winner = i
        elif job.winner != i:
            if self.successor(trio.current_time()) == i:
                self.take_over(i)
            return
        self.winner_seen_at = trio.current_time()
        if text:
            self.send_text(text)
            job.emit(Chunk(text, choice))
        if finish is not None:
            job.emit(End(finish))  # the client's answer is whole; the rest is for scoring only

    def on_settled(self, i: int) -> None:
        """Miner i's answer is over (whole, or failed)."""
        job = self.job
        answer = job.answers[i]
        if job.winner == i:
            if answer.error:
                self.winner_broken = True
            else:
                job.emit(End(answer.finish_reason))
        if self.winner_broken and job.streaming:
            successor = self.successor(trio.current_time())
            if successor is not None:
                self.take_over(successor)
            elif not self.may_catch_up():
                self.end_broken()
            elif self.broken_at is None:
                self.broken_at = trio.current_time()  # the watcher ends it after `stall_s`

    async def watch(self) -> None:
        """A stalled winner is noticed even when no other chunk arrives to prompt the check, and a
        broken winner that nobody can continue ends the stream exactly `stall_s` after the break."""
        job = self.job
        while job.streaming:
            wake = trio.current_time() + job.stall_s / 2
            if self.broken_at is not None:
                wake = min(wake, self.broken_at + job.stall_s)
            await trio.sleep_until(wake)
            now = trio.current_time()
            successor = self.successor(now)
            if successor is not None:
                self.take_over(successor)
            elif self.broken_at is not None and (now - self.broken_at >= job.stall_s or not self.may_catch_up()):
                self.end_broken()

    def take_over(self, j: int) -> None:
        """Continue the client's stream from miner j, which has already said what the client has."""
        job = self.job
        answer = job.answers[j]
        log.info("request %s: uid %d takes over the stream from uid %d", job.request_id, answer.uid,
                 job.answers[job.winner or 0].uid)
        rest = self.rest_of(j)
        job.winner, self.winner_broken, self.broken_at = j, False, None
        self.takeovers += 1
        self.winner_seen_at = trio.current_time()
        if rest:
            self.send_text(rest)
            job.emit(Chunk(rest))
        if answer.finish_reason is not None or answer.completed:
            job.emit(End(answer.finish_reason))

    def end_broken(self) -> None:
        self.job.emit(Broken(self.job.answers[self.job.winner or 0].error or "the answer broke off"))
