"""The deep-research run: assess, plan, then steps of tools and thinking, then the final answer.

Each model call goes through `ResearchTools.complete` (the caller fans it out to miners) and each web
retrieval through `ResearchTools.search`. Progress is emitted as Markdown headings as each step
starts, so a client sees the run move (and the caller knows when to send keep-alives). Unlike the
upstream orchestrator, the tool results of a step reach its thinking and the final answer, a step that
needs no tool goes on to thinking, an answer that cannot be used is asked for again (then the run ends
with the reason), the final answer is prose, and the whole run has a deadline.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from web.research import prompts, render, steps
from web.research.extract import Malformed, extract
from web.research.prompts import Conversation, ResearchStep
from web.research.render import StepRecord, ToolOutcome

T = TypeVar("T")


class ResearchCallFailed(Exception):
    """A model call or a web retrieval that could not be made (no miner answered, its time ran out);
    raised by `ResearchTools`. The message says why, for the client."""


class ResearchTools(Protocol):
    """What a run needs from the gateway."""

    async def complete(self, messages: list[dict[str, str]], *, step: str) -> str:
        """One model call: an ordinary fan-out to miners; the answer's text, joined."""
        ...

    async def search(self, query: str, *, n_results: int) -> list[dict[str, str]]:
        """One web retrieval: `[{"url", "content", "relevant"}]`."""
        ...


@dataclass(frozen=True)
class ResearchLimits:
    max_steps: int = 10  # research steps (tools, then thinking) before the final answer is written
    deadline_s: float = 600.0  # for the whole run, final answer included
    json_retries: int = 3  # a step whose answer cannot be used is asked again this many times
    max_tool_calls_per_step: int = 2  # further planned calls are dropped
    search_results: int = 2  # pages per web search, the most a plan may ask for

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.deadline_s <= 0 or self.json_retries < 0:
            raise ValueError(f"unusable research limits: {self}")
        if self.max_tool_calls_per_step < 0 or self.search_results < 1:
            raise ValueError(f"unusable research limits: {self}")


class ResearchFailure(enum.StrEnum):
    UNUSABLE_ANSWER = "unusable_answer"  # a step's answer was not the JSON asked for, after every retry
    DEADLINE = "deadline"  # `deadline_s` passed
    CALL_FAILED = "call_failed"  # a model call raised ResearchCallFailed


@dataclass(frozen=True)
class ResearchOutcome:
    completed: bool
    answer: str = ""  # the final answer (Markdown), also emitted last, when completed
    failure: ResearchFailure | None = None
    message: str = ""  # why it failed, for the client
    researched: bool = False  # False when the question needed no research and was answered directly
    steps: int = 0  # research steps done


class _Aborted(Exception):
    def __init__(self, failure: ResearchFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


async def run_research(messages: Sequence[Mapping[str, Any]], tools: ResearchTools,
                       emit: Callable[[str], Awaitable[None]], limits: ResearchLimits, *,
                       today: str) -> ResearchOutcome:
    """Research the conversation's last question. `emit` gets each piece of Markdown for the client, in
    order (never SSE framing or `[DONE]`). A failure returns an outcome saying why; cancellation (the
    client leaving) propagates."""
    run = _Run(Conversation(messages), tools, emit, limits, today)
    with trio.move_on_after(limits.deadline_s):
        try:
            return await run.research()
        except _Aborted as exc:
            return ResearchOutcome(False, failure=exc.failure, message=exc.message, researched=run.researched,
                                   steps=len(run.records))
    return ResearchOutcome(False, failure=ResearchFailure.DEADLINE,
                           message=f"deep research did not finish within {limits.deadline_s:g} s",
                           researched=run.researched, steps=len(run.records))


class _Run:
    def __init__(self, conversation: Conversation, tools: ResearchTools, emit: Callable[[str], Awaitable[None]],
                 limits: ResearchLimits, today: str) -> None:
        self.conversation = conversation
        self.tools = tools
        self.emit = emit
        self.limits = limits
        self.today = today
        self.todo = ""
        self.records: list[StepRecord] = []
        self.researched = False

    def _system(self, step: ResearchStep) -> dict[str, str]:
        return prompts.system(step, today=self.today, max_calls=self.limits.max_tool_calls_per_step,
                              max_results=self.limits.search_results)

    def _context(self) -> list[tuple[str, str]]:
        return [*self.conversation.sections(), ("Research plan", self.todo),
                ("Findings so far", render.findings(self.records, prompts.MAX_FINDINGS_CHARS))]

    async def _ask(self, step: ResearchStep, messages: list[dict[str, str]], shape: Callable[[str], T]) -> T:
        """One model call whose answer `shape` turns into the step's result; asked again with the
        problem named while `shape` raises Malformed, up to `json_retries` more times."""
        asked = messages
        problem = ""
        tries = 1 + self.limits.json_retries
        for _ in range(tries):
            try:
                text = await self.tools.complete(asked, step=step.value)
            except ResearchCallFailed as exc:
                raise _Aborted(ResearchFailure.CALL_FAILED,
                               f"the {step} call failed: {steps.clip(str(exc), 300)}") from exc
            try:
                return shape(text)
            except Malformed as exc:
                problem = str(exc)
                asked = [*messages, *prompts.retry(text, problem)]
        kind = "the JSON asked for" if step in prompts.JSON_STEPS else "usable"
        raise _Aborted(ResearchFailure.UNUSABLE_ANSWER,
                       f"the {step} step's answer was not {kind} in {tries} tries ({problem})")

    async def research(self) -> ResearchOutcome:
        assessed = await self._ask(ResearchStep.ASSESS,
                                   [self._system(ResearchStep.ASSESS), prompts.user(*self.conversation.sections())],
                                   lambda text: extract(text, steps.assessment))
        if not assessed.is_suitable:
            await self.emit(assessed.direct_answer)
            return ResearchOutcome(True, answer=assessed.direct_answer)
        self.researched = True
        await self.emit("## Generating Research Plan\n\n")
        self.todo = await self._ask(ResearchStep.PLAN, [self._system(ResearchStep.PLAN),
                                                        prompts.user(*self.conversation.sections())],
                                    steps.todo_list)
        await self.emit(f"## Research Plan\n\n{self.todo}\n\n")
        limit_reached = True
        for number in range(1, self.limits.max_steps + 1):
            if await self._step(number):
                limit_reached = False
                break
            if number < self.limits.max_steps:
                await self._update(number)
        await self.emit("## Generating Final Answer\n\n")
        task = "Write the final answer to the question."
        if limit_reached:
            task += (f" The research stopped at its limit of {self.limits.max_steps} steps: say what the "
                     "findings leave open.")
        final = await self._ask(ResearchStep.FINAL, [self._system(ResearchStep.FINAL),
                                                     prompts.user(*self._context(), ("This step", task))],
                                lambda text: extract(text, steps.final_answer))
        answer = render.final_answer(final, render.consulted(self.records))
        await self.emit(f"## Final Answer\n\n{answer}\n")
        return ResearchOutcome(True, answer=answer, researched=True, steps=len(self.records))

    async def _step(self, number: int) -> bool:
        """Research step `number`: plan its tools, run them, think. True when the thinking says the
        final answer can be written."""
        await self.emit(f"## Step {number}: Planning Tools\n\n")
        limits = self.limits
        calls = await self._ask(
            ResearchStep.TOOLS,
            [self._system(ResearchStep.TOOLS),
             prompts.user(*self._context(), ("This step", f"Step {number}: choose the tools for the first step "
                                                          "of the plan not marked ✓."))],
            lambda text: extract(text, lambda value: steps.tool_plan(
                value, max_calls=limits.max_tool_calls_per_step, max_results=limits.search_results)))
        if not calls:
            await self.emit("No tools are needed for this step.\n\n")
        for call in calls:
            await self.emit(f"## Executing {call.tool_name}\n\n{render.one_line(call.purpose or call.question)}\n\n")
        outcomes = await self._run_tools(calls)
        if outcomes:
            await self.emit(f"### Tool Results\n\n{render.tool_results(outcomes)}\n\n")
        await self.emit(f"## Analyzing Step {number}\n\n")
        this_step = render.tool_results_for_prompt(outcomes) or "No tools were used in this step."
        thought = await self._ask(
            ResearchStep.THINK,
            [self._system(ResearchStep.THINK),
             prompts.user(*self._context(), ("Tool results of this step", this_step),
                          ("This step", f"Step {number}: work on the first step of the plan not marked ✓."))],
            lambda text: extract(text, steps.thought))
        self.records.append(StepRecord(number, thought, outcomes))
        await self.emit(f"## Step {number} Summary\n\n**{render.one_line(thought.title)}**\n\n{thought.summary}\n\n")
        return thought.finish

    async def _update(self, number: int) -> None:
        await self.emit("## Updating Research Plan\n\n")
        done = self.records[-1].thought
        update = await self._ask(
            ResearchStep.UPDATE,
            [self._system(ResearchStep.UPDATE),
             prompts.user(*self._context(), ("Step just finished", f"Step {number}: {done.title}\n{done.summary}"))],
            lambda text: extract(text, steps.plan_update))
        self.todo = update.todo_list
        await self.emit(f"## Research Plan Updated\n\n{self.todo}\n\n")

    async def _run_tools(self, calls: Sequence[steps.ToolCall]) -> tuple[ToolOutcome, ...]:
        """The calls, concurrently; a step whose call cannot be made ends the run (the others stop)."""
        outcomes: list[ToolOutcome | None] = [None] * len(calls)
        aborted: list[_Aborted] = []

        async def one(i: int, call: steps.ToolCall) -> None:
            try:
                outcomes[i] = await self._web_search(call)
            except _Aborted as exc:
                aborted.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for i, call in enumerate(calls):
                nursery.start_soon(one, i, call)
        if aborted:
            raise aborted[0]
        return tuple(o for o in outcomes if o is not None)

    async def _web_search(self, call: steps.ToolCall) -> ToolOutcome:
        """A query line from the question, a web retrieval, and an answer citing what it found. A
        retrieval that fails or finds nothing is a result saying so (the thinking step reads it)."""
        query = await self._ask(
            ResearchStep.QUERY,
            [self._system(ResearchStep.QUERY),
             prompts.user(("Question", self.conversation.question), ("Search question", call.question))],
            lambda text: steps.query_line(text, call.question))
        try:
            raw = await self.tools.search(query, n_results=call.n_results)
        except ResearchCallFailed as exc:
            return ToolOutcome(call, query, f"The search failed: {steps.clip(str(exc), 300)}", (), failed=True)
        results = steps.search_results(raw if isinstance(raw, list) else [], call.n_results)
        if not results:
            return ToolOutcome(call, query, "The search found no usable pages.", (), failed=True)
        answer = await self._ask(
            ResearchStep.SEARCH_ANSWER,
            [self._system(ResearchStep.SEARCH_ANSWER),
             prompts.user(("Research question", self.conversation.question), ("Question", call.question),
                          ("Search results", prompts.results_json(results)))],
            lambda text: extract(text, lambda value: steps.search_answer(value, results)))
        return ToolOutcome(call, query, answer.answer, answer.references)
