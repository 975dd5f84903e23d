"""The deep-research orchestrator against scripted `ResearchTools` (no network): what the client is
streamed, what each step's model call is given, and how the run ends (done, or failed and why)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from web.research import (
    MARKER_PREFIX,
    ResearchCallFailed,
    ResearchFailure,
    ResearchLimits,
    ResearchOutcome,
    ResearchStep,
    run_research,
)
from web.research import steps as research_steps
from web.research.extract import MAX_SCAN_CHARS, Malformed, extract

TODAY = "2025-07-03"
QUESTION = [{"role": "user", "content": "How do Subnet 1 validators score organic answers?"}]
PLAN = ("1. Find how validators score answers\n   - Information needed: the scoring rules\n"
        "   - Approach: search the web\n   - Validation: two sources agree\n"
        "2. Compare with synthetic scoring\n   - Information needed: the differences\n"
        "   - Approach: search the web\n   - Validation: sources explain them")
PAGES = [{"url": "https://docs.example.org/scoring", "content": "Validators compare logprobs.", "relevant": "yes"},
         {"url": "https://blog.example.net/organics", "content": "Organic answers are scored later.", "relevant": ""}]
SEARCH_ANSWER = "Validators check each answer's logprobs [1] and score organics later [2]."


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def think(finish: bool, step: int = 1) -> str:
    return dumps({"thinking_step_title": f"Scoring, part {step}", "thoughts": "Reasoned about the results.",
                  "summary": f"Step {step} established how scoring works.",
                  "next_action": "generate_final_answer" if finish else "continue_thinking"})


FINAL: dict[str, Any] = {"direct_answer": "Validators re-check logprobs of each organic answer.",
         "detailed_explanation": "Each answer is compared token by token with the validator's own model.",
         "sources_and_evidence": [{"point": "Logprobs are compared", "evidence": "the scoring page says so",
                                   "source": "https://docs.example.org/scoring"}],
         "limitations": ["Only two pages were read."]}

Answer = str | BaseException | Callable[[list[dict[str, str]], int], Any]


class Script:
    """Scripted ResearchTools: per step a list of answers used in turn (the last one repeated), each a
    text, an exception to raise, or a function of (messages, call index) returning either."""

    def __init__(self, **answers: list[Answer]) -> None:
        self.answers: dict[str, list[Answer]] = {
            "assess": [dumps({"is_suitable": True, "reason": "needs sources", "direct_answer": None})],
            "plan": [PLAN],
            "tools": ["Here is the plan:\n```json\n" + dumps([{
                "tool_name": "web_search", "parameters": {"question": "How are organics scored?", "n_results": 2},
                "purpose": "Find the scoring rules"}]) + "\n```"],
            "query": ["subnet 1 organic scoring"],
            "search_answer": [dumps({"answer": SEARCH_ANSWER, "references": [
                {"number": 1, "url": PAGES[0]["url"]}, {"number": 2, "url": PAGES[1]["url"]}]})],
            "think": [lambda messages, i: think(finish=i >= 1, step=i + 1)],
            "update": [dumps({"updated_todo_list": "✓ " + PLAN, "changes_made": "marked step 1",
                              "next_step_number": 2, "rationale": "done"})],
            "final": ["```json\n" + dumps(FINAL) + "\n```"],
            **answers,
        }
        self.pages: list[Any] = [PAGES]
        self.calls: list[tuple[str, list[dict[str, str]]]] = []
        self.searches: list[tuple[str, int]] = []
        self.search_delay_s = 0.0
        self.call_delay_s = 0.0

    def steps(self) -> list[str]:
        return [step for step, _ in self.calls]

    def prompts(self, step: str) -> list[str]:
        """The user messages the calls of `step` were given."""
        return ["\n".join(m["content"] for m in messages if m["role"] == "user")
                for s, messages in self.calls if s == step]

    async def complete(self, messages: list[dict[str, str]], *, step: str) -> str:
        index = sum(1 for s, _ in self.calls if s == step)
        self.calls.append((step, messages))
        await trio.sleep(self.call_delay_s)
        script = self.answers[step]
        answer = script[min(index, len(script) - 1)]
        if callable(answer) and not isinstance(answer, BaseException):
            answer = answer(messages, index)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, str)
        return answer

    async def search(self, query: str, *, n_results: int) -> list[dict[str, str]]:
        self.searches.append((query, n_results))
        await trio.sleep(self.search_delay_s)
        pages = self.pages[min(len(self.searches) - 1, len(self.pages) - 1)]
        if isinstance(pages, BaseException):
            raise pages
        assert isinstance(pages, list)
        return pages


async def research(script: Script, limits: ResearchLimits | None = None,
                   messages: list[dict[str, str]] | None = None) -> tuple[ResearchOutcome, list[str]]:
    emitted: list[str] = []

    async def emit(text: str) -> None:
        emitted.append(text)

    with trio.fail_after(5_000):  # the autojump clock passes long runs at once
        outcome = await run_research(messages or QUESTION, script, emit, limits or ResearchLimits(), today=TODAY)
    return outcome, emitted


def headings(emitted: list[str]) -> list[str]:
    return re.findall(r"^#{2,3} .*$", "".join(emitted), re.MULTILINE)


async def test_a_whole_run_streams_its_progress_in_order_and_ends_in_prose_with_sources() -> None:
    script = Script()
    outcome, emitted = await research(script)
    assert outcome.completed and outcome.researched and outcome.steps == 2, outcome
    assert headings(emitted) == [
        "## Generating Research Plan", "## Research Plan",
        "## Step 1: Planning Tools", "## Executing web_search", "### Tool Results", "## Analyzing Step 1",
        "## Step 1 Summary", "## Updating Research Plan", "## Research Plan Updated",
        "## Step 2: Planning Tools", "## Executing web_search", "### Tool Results", "## Analyzing Step 2",
        "## Step 2 Summary",
        "## Generating Final Answer", "## Final Answer", "### Sources", "### Limitations"]
    assert script.steps() == ["assess", "plan", "tools", "query", "search_answer", "think", "update",
                              "tools", "query", "search_answer", "think", "final"]
    text = "".join(emitted)
    assert PLAN in text and "Find the scoring rules" in text and SEARCH_ANSWER in text
    assert "Step 1 established how scoring works." in text
    assert script.searches == [("subnet 1 organic scoring", 2)] * 2
    # the final answer is prose: the direct answer, the explanation, sources with URLs, limitations
    final = text.split("## Final Answer\n\n", 1)[1]
    assert final.strip() == outcome.answer.strip()
    assert final.startswith(FINAL["direct_answer"])
    assert FINAL["detailed_explanation"] in final
    assert "- **Logprobs are compared**: the scoring page says so (<https://docs.example.org/scoring>)" in final
    assert "<https://blog.example.net/organics>" in final  # read by the research, cited by no point
    assert "- Only two pages were read." in final
    assert "{" not in final and "direct_answer" not in final  # never a dict printout


async def test_each_system_prompt_carries_its_step_marker_and_the_date() -> None:
    script = Script()
    await research(script)
    for step, messages in script.calls:
        assert messages[0]["role"] == "system"
        assert messages[0]["content"].splitlines()[0] == MARKER_PREFIX + step
        assert TODAY in messages[0]["content"]
    assert {step for step, _ in script.calls} == {s.value for s in ResearchStep}


async def test_a_question_needing_no_research_gets_the_direct_answer_alone() -> None:
    script = Script(assess=[dumps({"is_suitable": False, "reason": "a greeting",
                                   "direct_answer": "Hello! What shall I look into?"})])
    outcome, emitted = await research(script, messages=[{"role": "user", "content": "hi"}])
    assert emitted == ["Hello! What shall I look into?"]
    assert outcome == ResearchOutcome(True, answer="Hello! What shall I look into?", researched=False)
    assert script.steps() == ["assess"]


async def test_an_empty_tool_plan_goes_on_to_thinking() -> None:
    script = Script(tools=["No search is needed: []"], think=[think(finish=True)])
    outcome, emitted = await research(script)
    assert outcome.completed and outcome.steps == 1
    assert script.searches == []
    assert script.steps() == ["assess", "plan", "tools", "think", "final"]
    assert "## Executing web_search" not in headings(emitted)
    assert "No tools were used in this step." in script.prompts("think")[0]


async def test_invalid_json_is_asked_again_then_the_run_ends_saying_why() -> None:
    script = Script(think=["I think we should continue, {'next_action': 'continue_thinking'}"])
    outcome, emitted = await research(script, ResearchLimits(json_retries=2))
    assert not outcome.completed
    assert outcome.failure is ResearchFailure.UNUSABLE_ANSWER
    assert "think" in outcome.message and "3 tries" in outcome.message and "no valid JSON" in outcome.message
    assert script.steps().count("think") == 3
    # each retry shows the model its answer and what was wrong with it
    _, retried = [c for c in script.calls if c[0] == "think"][1]
    assert retried[-2] == {"role": "assistant", "content": script.answers["think"][0]}
    assert "could not be used: the answer holds no valid JSON" in retried[-1]["content"]
    assert "## Final Answer" not in "".join(emitted)


async def test_a_retry_that_gets_good_json_carries_on() -> None:
    script = Script(assess=["Sure! {is_suitable: true}",
                            dumps({"is_suitable": True, "reason": "r", "direct_answer": None})])
    outcome, _ = await research(script)
    assert outcome.completed and script.steps()[:3] == ["assess", "assess", "plan"]


@pytest.mark.parametrize(("step", "answer", "problem"), [
    ("assess", dumps({"is_suitable": "yes", "reason": "r"}), '"is_suitable" must be true or false'),
    ("assess", dumps({"is_suitable": False, "reason": "r", "direct_answer": None}), '"direct_answer" must hold'),
    ("tools", dumps([{"tool_name": "browse", "parameters": {"url": "x"}}]), "unknown tool 'browse'"),
    ("tools", dumps({"searches": "none"}), "expected a JSON array"),
    ("search_answer", dumps({"references": []}), '"answer" must be a string'),
    ("think", dumps({"thinking_step_title": "t", "thoughts": "x", "summary": "s", "next_action": "maybe"}),
     '"next_action" must be'),
    ("update", dumps({"changes_made": "c", "next_step_number": 2}), '"updated_todo_list" must be a string'),
    ("final", dumps({**FINAL, "sources_and_evidence": "see above"}), '"sources_and_evidence" must be an array'),
    ("plan", "   \n", "the research plan is empty"),
])
async def test_an_answer_of_the_wrong_shape_is_asked_again_then_ends_the_run(step: str, answer: str,
                                                                             problem: str) -> None:
    script = Script(**{step: [answer]})  # type: ignore[arg-type]
    outcome, _ = await research(script, ResearchLimits(json_retries=1))
    assert outcome.failure is ResearchFailure.UNUSABLE_ANSWER, outcome
    assert outcome.message.startswith(f"the {step} step's answer was not") and problem in outcome.message
    assert script.steps().count(step) == 2
    assert problem in [m for s, m in script.calls if s == step][1][-1]["content"]


async def test_the_deadline_ends_the_run_honestly(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(think=[think(finish=False)])
    script.call_delay_s = 30.0
    start = trio.current_time()
    outcome, emitted = await research(script, ResearchLimits(deadline_s=200.0))
    assert trio.current_time() - start == pytest.approx(200.0)
    assert outcome.failure is ResearchFailure.DEADLINE and not outcome.completed
    assert outcome.message == "deep research did not finish within 200 s"
    assert outcome.researched and outcome.steps == 1
    assert "## Final Answer" not in "".join(emitted)


async def test_the_step_limit_goes_to_the_final_answer(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(think=[think(finish=False)])
    outcome, emitted = await research(script, ResearchLimits(max_steps=3))
    assert outcome.completed and outcome.steps == 3
    assert script.steps().count("think") == 3
    assert script.steps().count("update") == 2  # none after the last step
    assert "## Step 4: Planning Tools" not in headings(emitted)
    assert "limit of 3 steps" in script.prompts("final")[0]


async def test_cancellation_mid_step_propagates_and_nothing_more_is_emitted() -> None:
    script = Script()
    script.search_delay_s = 1_000.0
    emitted: list[str] = []
    returned: list[ResearchOutcome] = []
    search_cancelled = trio.Event()
    search = script.search

    async def watched_search(query: str, *, n_results: int) -> list[dict[str, str]]:
        try:
            return await search(query, n_results=n_results)
        except trio.Cancelled:
            search_cancelled.set()
            raise

    script.search = watched_search  # type: ignore[method-assign]

    async def emit(text: str) -> None:
        emitted.append(text)

    async def client() -> None:
        returned.append(await run_research(QUESTION, script, emit, ResearchLimits(), today=TODAY))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()
            assert len(script.searches) == 1  # the run is waiting for its search
            seen = len(emitted)
            nursery.cancel_scope.cancel()  # the client leaves
    assert search_cancelled.is_set() and returned == []
    assert len(emitted) == seen and emitted[-1].startswith("## Executing web_search")


async def test_a_failed_model_call_ends_the_run_with_its_reason() -> None:
    script = Script(plan=[ResearchCallFailed("no miner answered within 120 s")])
    outcome, emitted = await research(script)
    assert outcome.failure is ResearchFailure.CALL_FAILED
    assert outcome.message == "the plan call failed: no miner answered within 120 s"
    assert script.steps() == ["assess", "plan"]  # a failed call is not retried as a bad answer
    assert headings(emitted) == ["## Generating Research Plan"]


async def test_a_failed_call_inside_a_tool_ends_the_run_and_stops_the_other_tool(
        autojump_clock: trio.testing.MockClock) -> None:
    two = dumps([{"tool_name": "web_search", "parameters": {"question": q}, "purpose": q} for q in ("a", "b")])
    script = Script(tools=[two],
                    query=[lambda messages, i: ResearchCallFailed("miners down") if i == 1 else "query a"])
    script.search_delay_s = 10.0
    start = trio.current_time()
    outcome, _ = await research(script)
    assert trio.current_time() == start  # the other search did not run its 10 s
    assert outcome.failure is ResearchFailure.CALL_FAILED and outcome.message == "the query call failed: miners down"
    assert "search_answer" not in script.steps()  # the other tool's search was cut short


async def test_a_failed_search_is_a_tool_result_the_thinking_reads() -> None:
    script = Script()
    script.pages = [ResearchCallFailed("no miner returned results"), PAGES]
    outcome, _ = await research(script)
    assert outcome.completed
    assert "The search failed: no miner returned results" in script.prompts("think")[0]
    assert script.steps().count("search_answer") == 1  # only the search that found pages is answered


async def test_tool_results_reach_the_thinking_and_the_final_answer() -> None:
    script = Script()
    await research(script)
    first_think = script.prompts("think")[0]
    this_step = first_think.split("## Tool results of this step\n", 1)[1]
    assert SEARCH_ANSWER in this_step and PAGES[0]["url"] in this_step and PAGES[1]["url"] in this_step
    final = script.prompts("final")[0]
    assert final.count(SEARCH_ANSWER) == 2 and PAGES[0]["url"] in final  # both steps' results
    assert "Step 2 established how scoring works." in final
    # the search answer was given the pages it cites, by index
    search_prompt = script.prompts("search_answer")[0]
    assert '{"index":1,"content":"Validators compare logprobs.","url":"https://docs.example.org/scoring"}' in search_prompt


async def test_two_planned_searches_run_at_once(autojump_clock: trio.testing.MockClock) -> None:
    two = dumps([{"tool_name": "web_search", "parameters": {"question": q, "n_results": 9}, "purpose": q}
                 for q in ("first", "second", "third")])
    script = Script(tools=[two], query=[lambda messages, i: f"query {i}"], think=[think(finish=True)])
    script.search_delay_s = 50.0
    start = trio.current_time()
    outcome, emitted = await research(script)
    assert outcome.completed
    assert trio.current_time() - start == pytest.approx(50.0)  # not 100: concurrent
    assert sorted(script.searches) == [("query 0", 2), ("query 1", 2)]  # two calls at most, 2 results at most
    assert headings(emitted).count("## Executing web_search") == 2


async def test_sources_shown_are_pages_really_retrieved() -> None:
    invented = dumps({"answer": "See [1] and [7].", "references": [
        {"number": 7, "url": "https://invented.example/x"}, {"number": "1", "url": "https://other.example"}]})
    script = Script(search_answer=[invented], think=[think(finish=True)])
    outcome, emitted = await research(script)
    text = "".join(emitted)
    assert "invented.example" not in text and "other.example" not in text
    assert "[1] <https://docs.example.org/scoring>" in text
    assert "https://docs.example.org/scoring" in outcome.answer


async def test_whatever_a_miner_writes_is_held_and_sent_within_bounds() -> None:
    huge = "word " * 100_000  # where free text is read
    big = "word " * 4_000  # in JSON: a step's answer is looked at up to MAX_SCAN_CHARS
    final = {"direct_answer": big, "detailed_explanation": big,
             "sources_and_evidence": [{"point": big[:300], "evidence": "e", "source": f"https://x.example/{i}"}
                                      for i in range(100)],
             "limitations": [big[:300]] * 30}
    script = Script(plan=["\n".join(f"{i}. step {huge[:50]}" for i in range(10_000))],
                    query=[huge], think=[lambda m, i: think(finish=True).replace("Reasoned", big * 3)],
                    final=[dumps(final)])
    script.pages = [[{"url": f"https://p.example/{i}", "content": huge, "relevant": ""} for i in range(1_000)]]
    outcome, emitted = await research(script)
    assert outcome.completed
    plan = "".join(emitted).split("## Research Plan\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert len(plan) <= research_steps.MAX_TODO_CHARS and len(plan.splitlines()) <= research_steps.MAX_TODO_LINES
    assert script.searches[0][0] == "word " * 59 + "word…"  # the query line, cut to 300 characters
    assert outcome.answer.count("https://x.example/") == research_steps.MAX_SOURCES
    assert len(outcome.answer) < 30 * 1000 + 2 * research_steps.MAX_TEXT_CHARS
    for _, messages in script.calls:
        assert sum(len(m["content"]) for m in messages) < 80_000
    search_prompt = script.prompts("search_answer")[0]
    assert search_prompt.count('"index":') == 2  # n_results, whatever the search returned


async def test_a_long_conversation_is_cut_to_its_newest_messages() -> None:
    older = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} " + "x" * 3_000}
             for i in range(200)]
    script = Script(assess=[dumps({"is_suitable": False, "reason": "r", "direct_answer": "ok"})])
    await research(script, messages=[*older, *QUESTION])
    prompt = script.prompts("assess")[0]
    assert prompt.startswith("## Question\n" + QUESTION[0]["content"])
    assert "message 199 " in prompt and "message 0 " not in prompt and "(earlier messages left out)" in prompt
    assert len(prompt) < 25_000


# -- finding the JSON in an answer -------------------------------------------------------------------------


def _thought(value: object) -> research_steps.Thought:
    return research_steps.thought(value)


GOOD = {"thinking_step_title": "t", "thoughts": "x", "summary": "s", "next_action": "continue_thinking"}


@pytest.mark.parametrize("text", [
    dumps(GOOD),
    "Here you go:\n```json\n" + dumps(GOOD) + "\n```\nHope it helps.",
    "```\n" + dumps(GOOD) + "\n```",
    "As found in [1] and [2], my answer: " + dumps(GOOD) + " {trailing",
    "```json\n{\"a\": 1}\n```\nActually: " + dumps(GOOD),  # a fenced block of the wrong shape is passed over
    '{"broken": ' + dumps(GOOD),  # an unclosed object before it
])
def test_the_json_is_found_where_models_put_it(text: str) -> None:
    assert extract(text, _thought) == research_steps.Thought("t", "x", "s", False)


def test_the_first_fenced_block_wins_over_json_earlier_in_the_prose() -> None:
    example = {**GOOD, "thinking_step_title": "an example of the format"}
    text = f"The format is {dumps(example)}; mine:\n```json\n{dumps(GOOD)}\n```"
    assert extract(text, _thought).title == "t"


@pytest.mark.parametrize(("text", "problem"), [
    ("no JSON here", "no valid JSON"),
    ('{"thinking_step_title": "t", "thoughts": NaN, "summary": "s", "next_action": "continue_thinking"}',
     "no valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "no valid JSON"),
    # deeper than wire.jsonio.MAX_DEPTH: refused whole, so only its inner objects are candidates
    (dumps({**GOOD, "extra": json.loads('{"a": ' * 40 + "1" + "}" * 40)}), '"next_action" must be'),
    (" " * MAX_SCAN_CHARS + dumps(GOOD), "no valid JSON"),  # past the part of the answer looked at
    ("[1] " * 200 + dumps(GOOD), '"thinking_step_title"'),  # past the candidates tried: a list is the first error
])
def test_what_is_not_usable_json_is_refused(text: str, problem: str) -> None:
    with pytest.raises(Malformed, match=re.escape(problem)):
        extract(text, _thought)


def test_limits_refuse_what_cannot_run() -> None:
    bad: dict[str, Any]
    for bad in ({"max_steps": 0}, {"deadline_s": 0}, {"json_retries": -1}, {"search_results": 0}):
        with pytest.raises(ValueError):
            ResearchLimits(**bad)
