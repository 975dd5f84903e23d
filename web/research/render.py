"""Research results as Markdown: for the client's stream, and for the prompts of later steps.

What reaches the client is prose and lists, never a data structure printed as code; each miner-written
field shown in a list item is folded onto one line so that it cannot break the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from web.research.steps import MAX_SOURCES, FinalAnswer, Thought, ToolCall
from web.retrieval import usable_url


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """One web search of a step: what was asked, the query sent, and the cited answer (or why none)."""

    call: ToolCall
    query: str
    answer: str
    references: tuple[tuple[int, str], ...]
    failed: bool = False


@dataclass(frozen=True, slots=True)
class StepRecord:
    number: int
    thought: Thought
    tools: tuple[ToolOutcome, ...]


def one_line(text: str) -> str:
    return " ".join(text.split())


def link(text: str) -> str:
    """A URL as a Markdown autolink; anything else as it is, on one line."""
    text = one_line(text)
    return f"<{text}>" if usable_url(text) else text


def tool_results(outcomes: Sequence[ToolOutcome]) -> str:
    """The `### Tool Results` section's body, as the client reads it."""
    parts = []
    for outcome in outcomes:
        refs = "\n".join(f"[{n}] <{url}>" for n, url in outcome.references)
        parts.append(f"**{outcome.call.tool_name}**: {one_line(outcome.call.question)}\n\n{outcome.answer}"
                     + (f"\n\n{refs}" if refs else ""))
    return "\n\n".join(parts)


def tool_results_for_prompt(outcomes: Sequence[ToolOutcome]) -> str:
    parts = []
    for outcome in outcomes:
        refs = "".join(f"\n  [{n}] {url}" for n, url in outcome.references)
        parts.append(f'- web_search "{one_line(outcome.call.question)}" (query: {outcome.query}):\n'
                     f"  {outcome.answer}{refs}")
    return "\n".join(parts)


def _step(record: StepRecord, *, full: bool) -> str:
    text = f"### Step {record.number}: {one_line(record.thought.title)}\nSummary: {record.thought.summary}"
    if full:
        text += f"\nThoughts: {record.thought.thoughts}"
        if record.tools:
            text += "\nTool results:\n" + tool_results_for_prompt(record.tools)
    else:
        urls = ", ".join(url for outcome in record.tools for _, url in outcome.references)
        if urls:
            text += f"\nSources: {urls}"
    return text


def findings(records: Sequence[StepRecord], budget: int) -> str:
    """The steps done so far, newest in full while they fit in `budget` characters, older ones as
    their summary and sources."""
    parts: list[str] = []
    used = 0
    for record in reversed(records):
        text = _step(record, full=True)
        if used + len(text) > budget:
            text = _step(record, full=False)
        parts.append(text)
        used += len(text)
    return "\n\n".join(reversed(parts))


def consulted(records: Sequence[StepRecord]) -> list[str]:
    """The URLs the searches' answers cited, in order, each once, at most MAX_SOURCES."""
    urls: dict[str, None] = {}
    for record in records:
        for outcome in record.tools:
            for _, url in outcome.references:
                if len(urls) < MAX_SOURCES:
                    urls.setdefault(url, None)
    return list(urls)


def final_answer(final: FinalAnswer, pages: Sequence[str]) -> str:
    """The final answer as prose: the direct answer, the explanation, the sources with their URLs
    (and the pages the research read that no point cites), the limitations."""
    parts = [final.direct_answer]
    if final.explanation:
        parts.append(final.explanation)
    cited = {one_line(s.source) for s in final.sources}
    others = [url for url in pages if url not in cited]
    if final.sources or others:
        lines = []
        for s in final.sources:
            head = f"**{one_line(s.point)}**" if s.point else ""
            body = ": ".join(x for x in (head, one_line(s.evidence)) if x)
            lines.append(f"- {body} ({link(s.source)})" if s.source and body else f"- {body or link(s.source)}")
        section = "### Sources\n\n" + "\n".join(lines)
        if others:
            section += ("\n\n" if lines else "") + "Pages consulted:\n\n" + "\n".join(
                f"{i}. <{url}>" for i, url in enumerate(others, 1))
        parts.append(section)
    if final.limitations:
        parts.append("### Limitations\n\n" + "\n".join(f"- {one_line(x)}" for x in final.limitations))
    return "\n\n".join(parts)
