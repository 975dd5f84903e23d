"""The messages each research step sends to miners.

Every system prompt starts with a marker line, `sn1-research/<step>`, that names the step: it is how
the devnet's miners (and anyone reading scored organics) tell the steps apart. The user message is
built of `## ` sections (the question, the earlier conversation, the plan, the findings, this step), each
bounded, so that a long conversation or many steps never make a prompt grow without limit.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from web.research.steps import CONTINUE, FINISH, SearchResult, clip
from wire import jsonio

MARKER_PREFIX = "sn1-research/"
MAX_QUESTION_CHARS = 8_000  # the client's last message, as each step sees it
MAX_CONVERSATION_CHARS = 16_000  # the earlier messages, newest kept first
MAX_MESSAGE_CHARS = 4_000  # one earlier message
MAX_FINDINGS_CHARS = 40_000  # the steps done so far; older steps shrink to their summary beyond it
MAX_ECHO_CHARS = 2_000  # a malformed answer, quoted back when the step is asked again


class ResearchStep(enum.StrEnum):
    """The kinds of model call a run makes; the value is the `step` given to `ResearchTools.complete`."""

    ASSESS = "assess"
    PLAN = "plan"
    TOOLS = "tools"
    QUERY = "query"
    SEARCH_ANSWER = "search_answer"
    THINK = "think"
    UPDATE = "update"
    FINAL = "final"

    @property
    def marker(self) -> str:
        return MARKER_PREFIX + self.value


_JSON_ONLY = "Reply with that JSON and nothing else: no introduction, no comment after it."

_SYSTEM = {
    ResearchStep.ASSESS: """\
You decide whether a message needs deep research: several rounds of web searches and reasoning \
before it is answered. Today is {today}.

Deep research is worth it for: facts that change (news, prices, releases, who holds an office, \
anything recent); complex or technical subjects that need more than one source; plans and guides with \
many parts; comparisons; answers that have to be put together from several sources.
Answer directly instead when the message is a greeting or small talk, asks for an opinion or for \
creative writing, asks about well-known facts that do not change, or asks about you.

Write one JSON object: {{"is_suitable": true or false, "reason": "one sentence on why", \
"direct_answer": null or "your answer"}}. When "is_suitable" is false, "direct_answer" is your \
complete answer to the message, written for the person who sent it; when it is true, it is null.""",

    ResearchStep.PLAN: """\
You plan a piece of research. Today is {today}.

Write a numbered list of the research steps that together answer the question: usually two to five, \
each something that can be found out or checked. Do not add a step for writing the report. Under \
each step write three indented lines:
   - Information needed: what the step must find out
   - Approach: how to find it (what to search for, what to compare)
   - Validation: how to tell that the finding holds
Write only the list, in plain text.""",

    ResearchStep.TOOLS: """\
You choose the tools for the next step of a research plan. Today is {today}.

The one tool:
- web_search(question, n_results): searches the web for the question and answers it from the pages \
found, citing them. n_results is how many pages to read, 1 to {max_results}.

Look at the first step of the plan that is not marked ✓ (done). Choose the searches it needs, at most \
{max_calls}; if the findings so far already cover it, choose none.
Write a JSON array, each item {{"tool_name": "web_search", "parameters": {{"question": "what to find \
out", "n_results": {max_results}}}, "purpose": "what the search is for"}}; write [] when no tool is needed.""",

    ResearchStep.QUERY: """\
You turn a research question into one web search query. Today is {today}.
Write the query alone on a single line: no quotes, no label, no explanation.""",

    ResearchStep.SEARCH_ANSWER: """\
You answer a question from web search results. Today is {today}.

Use only what the results say, and cite them inline by their index: [1], [2]. When the results do not \
answer the question, say so plainly.
Write one JSON object: {{"answer": "the answer, with [n] citations", "references": [{{"number": n, \
"url": "the url of result n"}}]}}, listing each result you cited.""",

    ResearchStep.THINK: """\
You carry out one step of a research plan. Today is {today}.

Work on the first step of the plan that is not marked ✓, using the findings so far and the tool \
results of this step. Reason it through: what is now known, how sure it is, what is still missing. \
Then choose the next action: "{continue_}" while steps of the plan that matter for the answer remain \
open, "{finish}" once what is known is enough to answer well.
Write one JSON object: {{"thinking_step_title": "a short title", "thoughts": "your reasoning", \
"summary": "what this step established, in two or three sentences", "next_action": "{continue_}" or \
"{finish}"}}.""",

    ResearchStep.UPDATE: """\
You keep a research plan up to date. Today is {today}.

Given the plan and the step just finished, put ✓ at the start of the line of each finished step \
(keep its number), change or add steps where the findings call for it, and keep the sub-points of the \
open steps.
Write one JSON object: {{"updated_todo_list": "the whole plan, as text", "changes_made": "what you \
changed", "next_step_number": the number of the next open step, "rationale": "why"}}.""",

    ResearchStep.FINAL: """\
You write the final answer of a piece of research. Today is {today}.

Base it on the findings and tool results below. Support each point with the URL of the page it comes \
from, and say plainly what stays uncertain.
Write one JSON object: {{"direct_answer": "the answer in a few sentences", "detailed_explanation": \
"the full explanation, in Markdown", "sources_and_evidence": [{{"point": "a claim", "evidence": "what \
supports it", "source": "the URL"}}], "limitations": ["what the research could not establish"]}}.""",
}

JSON_STEPS = frozenset({ResearchStep.ASSESS, ResearchStep.TOOLS, ResearchStep.SEARCH_ANSWER,
                        ResearchStep.THINK, ResearchStep.UPDATE, ResearchStep.FINAL})


def system(step: ResearchStep, *, today: str, max_calls: int = 2, max_results: int = 2) -> dict[str, str]:
    text = _SYSTEM[step].format(today=today, max_calls=max_calls, max_results=max_results,
                                continue_=CONTINUE, finish=FINISH)
    if step in JSON_STEPS:
        text += "\n" + _JSON_ONLY
    return {"role": "system", "content": f"{step.marker}\n{text}"}


def user(*sections: tuple[str, str]) -> dict[str, str]:
    """A user message of `## title` sections; empty sections are left out."""
    body = "\n\n".join(f"## {title}\n{text.strip()}" for title, text in sections if text.strip())
    return {"role": "user", "content": body}


def retry(answer: str, problem: str) -> list[dict[str, str]]:
    """What is added when a step is asked again: its answer, and what was wrong with it."""
    return [{"role": "assistant", "content": clip(answer, MAX_ECHO_CHARS) or "(empty)"},
            {"role": "user", "content": f"That answer could not be used: {problem}. Answer again, "
                                        "in exactly the format asked for."}]


class Conversation:
    """The client's messages as the steps see them: the question (its last user message) and the
    earlier messages, both bounded."""

    def __init__(self, messages: Sequence[Mapping[str, Any]]) -> None:
        texts = [(str(m.get("role") or "user"), m.get("content")) for m in messages]
        pairs = [(role, content if isinstance(content, str) else "") for role, content in texts]
        last = max((i for i, (role, _) in enumerate(pairs) if role == "user"), default=len(pairs) - 1)
        self.question = clip(pairs[last][1], MAX_QUESTION_CHARS) if pairs else ""
        earlier: list[str] = []
        used = 0
        for role, content in reversed(pairs[:last]):
            line = f"{role}: {clip(content, MAX_MESSAGE_CHARS)}"
            if used + len(line) > MAX_CONVERSATION_CHARS:
                earlier.append("(earlier messages left out)")
                break
            earlier.append(line)
            used += len(line)
        self.earlier = "\n\n".join(reversed(earlier))

    def sections(self) -> list[tuple[str, str]]:
        return [("Question", self.question), ("Earlier conversation", self.earlier)]


def results_json(results: Sequence[SearchResult]) -> str:
    """The search results as the search-answer step reads them: a fenced JSON array."""
    items = [{"index": r.index, "content": r.content, "url": r.url} for r in results]
    return "```json\n" + jsonio.dumps(items).decode() + "\n```"

