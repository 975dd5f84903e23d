"""Mixture of miners: several miners answer first, then one more combines their answers.

The first round never waits for the slowest: once the fastest has answered, the others get as long again
as it took (at least `MIXTURE_MIN_GRACE_S`), all within `fanout.mixture_deadline_s`; only whole answers are
combined, unless none is whole yet. The combining miner is a healthy, high-incentive one not asked before;
its answer is what the client receives (streamed if asked).
"""

from __future__ import annotations

import trio

from actors.fanout.job import FanoutJob
from web.asking import start_job
from web.chat_request import ChatRequest
from web.errors import ApiError
from web.services import Services

MIXTURE_PREAMBLE = "I have received the following answers from other assistants:"
MIXTURE_CLOSING = "I will now combine them into one concise reply."
MIXTURE_MIN_GRACE_S = 0.5


def mixture_message(answers: list[str]) -> dict[str, str]:
    numbered = "\n\n".join(f"{i}. {text.strip()}" for i, text in enumerate(answers, 1))
    return {"role": "assistant", "content": f"{MIXTURE_PREAMBLE}\n\n{numbered}\n\n{MIXTURE_CLOSING}"}


async def wait_first_round(job: FanoutJob, deadline_s: float) -> None:
    """Until every miner is done, but never for the slowest: once the fastest has answered, the others
    get as long again as it took (at least `MIXTURE_MIN_GRACE_S`), all within `deadline_s`."""
    with trio.move_on_after(deadline_s):
        await job.first_done.wait()
        grace = max(trio.current_time() - job.started, MIXTURE_MIN_GRACE_S)
        with trio.move_on_after(grace):
            await job.finished.wait()


async def mixture_job(services: Services, request: ChatRequest, *, stream: bool) -> FanoutJob:
    """First round to several miners (see `wait_first_round`), then one miner combines the answers; its
    fan-out is in mode "stream" or "complete"."""
    first_round = start_job(services, request, request.miner_body, mode="all")
    try:
        await wait_first_round(first_round, services.settings.fanout.mixture_deadline_s)
    finally:
        first_round.release()  # also when the client leaves during the first round
    answers = [a for a in first_round.answers if a.whole]
    if not answers:  # none whole in time: take what has arrived
        answers = [a for a in first_round.answers if a.chunks]
    if not answers:
        raise ApiError(502, "No miner answered the mixture's first round.", code="miners_failed",
                       details={str(uid): e for uid, e in first_round.errors().items()})
    final_body = dict(request.miner_body)
    final_body["messages"] = [*request.messages, mixture_message([a.text for a in answers])]
    asked = tuple(a.uid for a in first_round.answers)
    return start_job(services, request, final_body, mode="stream" if stream else "complete",
                     final=True, exclude=asked)
