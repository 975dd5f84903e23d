"""What each research step must answer, checked and cut to size.

A model's answer is a miner's text: every field is checked for its type and cut to a bound, and every
list to a length, so that nothing a miner writes makes the run hold (or send on) more than these bounds.
A wrong type or a missing field is `Malformed`, and the step is asked again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from web.research.extract import Malformed
from web.retrieval import usable_url

MAX_TEXT_CHARS = 16_000  # a direct answer or the final explanation
MAX_FIELD_CHARS = 6_000  # thoughts, a search answer
MAX_SUMMARY_CHARS = 2_000  # a step's summary, a rationale, what changed
MAX_SHORT_CHARS = 500  # a title, a purpose, a reason, a point or a source
MAX_TODO_CHARS = 6_000  # the research plan
MAX_TODO_LINES = 80
MAX_QUESTION_CHARS = 1_000  # what a web_search is asked
MAX_QUERY_CHARS = 300  # the search query line
MAX_REFERENCES = 10  # per search answer
MAX_SOURCES = 20  # evidence items of the final answer
MAX_LIMITATIONS = 10
MAX_RESULT_CHARS = 4_000  # one search result's content, as the search-answer step sees it

WEB_SEARCH = "web_search"
CONTINUE = "continue_thinking"
FINISH = "generate_final_answer"


def clip(text: str, limit: int) -> str:
    """`text` stripped and cut to at most `limit` characters (an ellipsis marks a cut)."""
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Malformed(f"expected a JSON object with {what}")
    return value


def _text(obj: Mapping[str, Any], key: str, limit: int, *, required: bool = True) -> str:
    """A string field; a list of strings is joined by lines (models write lists where prose was asked)."""
    value = obj.get(key)
    if value is None and not required:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    if not isinstance(value, str):
        raise Malformed(f'"{key}" must be a string')
    if required and not value.strip():
        raise Malformed(f'"{key}" must not be empty')
    return clip(value, limit)


@dataclass(frozen=True, slots=True)
class Assessment:
    is_suitable: bool
    reason: str
    direct_answer: str


def assessment(value: object) -> Assessment:
    obj = _object(value, '"is_suitable", "reason" and "direct_answer"')
    suitable = obj.get("is_suitable")
    if not isinstance(suitable, bool):
        raise Malformed('"is_suitable" must be true or false')
    direct = obj.get("direct_answer")
    if not suitable and (not isinstance(direct, str) or not direct.strip()):
        raise Malformed('"direct_answer" must hold the answer when "is_suitable" is false')
    return Assessment(suitable, _text(obj, "reason", MAX_SHORT_CHARS, required=False),
                      clip(direct, MAX_TEXT_CHARS) if isinstance(direct, str) else "")


def todo_list(text: str) -> str:
    """The research plan (free text), without surrounding fences, cut to its bounds; empty is Malformed."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("markdown").removeprefix("text").strip()
    lines = text.splitlines()[:MAX_TODO_LINES]
    plan = clip("\n".join(line.rstrip() for line in lines), MAX_TODO_CHARS)
    if not plan:
        raise Malformed("the research plan is empty")
    return plan


@dataclass(frozen=True, slots=True)
class ToolCall:
    question: str
    n_results: int
    purpose: str
    tool_name: str = WEB_SEARCH


def tool_plan(value: object, *, max_calls: int, max_results: int) -> tuple[ToolCall, ...]:
    """At most `max_calls` web searches (extra ones are dropped), each asking for 1..`max_results`."""
    if isinstance(value, Mapping) and "tool_name" in value:
        value = [value]  # one call written without its array
    if not isinstance(value, list):
        raise Malformed("expected a JSON array of tool calls (empty when no tool is needed)")
    calls = []
    for i, item in enumerate(value[:max_calls]):
        obj = _object(item, f'"tool_name", "parameters" and "purpose" (item {i})')
        if obj.get("tool_name") != WEB_SEARCH:
            raise Malformed(f'item {i}: unknown tool {str(obj.get("tool_name"))[:60]!r}; the only tool is "web_search"')
        params = _object(obj.get("parameters"), f'"question" in "parameters" (item {i})')
        question = _text(params, "question", MAX_QUESTION_CHARS)
        wanted = params.get("n_results", max_results)
        if isinstance(wanted, str) and wanted.strip().isdigit():
            wanted = int(wanted)
        if isinstance(wanted, bool) or not isinstance(wanted, int):
            raise Malformed(f'item {i}: "n_results" must be an integer')
        calls.append(ToolCall(question, max(1, min(wanted, max_results)),
                              _text(obj, "purpose", MAX_SHORT_CHARS, required=False)))
    return tuple(calls)


def query_line(text: str, fallback: str) -> str:
    """The first non-empty line of the answer, without quotes or a "Query:" label; else `fallback`."""
    for line in text.splitlines():
        line = line.strip().strip("`\"'").strip()
        if line.lower().startswith("query:"):
            line = line[6:].strip().strip("\"'")
        if line:
            return clip(line, MAX_QUERY_CHARS)
    return clip(fallback, MAX_QUERY_CHARS)


@dataclass(frozen=True, slots=True)
class SearchResult:
    index: int  # from 1, as the search-answer step cites it
    url: str
    content: str


def search_results(raw: Sequence[Mapping[str, Any]], n_results: int) -> tuple[SearchResult, ...]:
    """What a retrieval returned, kept when it has a usable URL and content, de-duplicated, at most
    `n_results`, numbered from 1."""
    results: list[SearchResult] = []
    seen: set[str] = set()
    for item in raw[: n_results * 4]:  # enough to fill n_results after dropping unusable ones
        if not isinstance(item, Mapping):
            continue
        url, content = item.get("url"), item.get("content")
        if not isinstance(url, str) or not usable_url(url) or url in seen:
            continue
        if not isinstance(content, str) or not content.strip():
            continue
        seen.add(url)
        results.append(SearchResult(len(results) + 1, url, clip(content, MAX_RESULT_CHARS)))
        if len(results) >= n_results:
            break
    return tuple(results)


@dataclass(frozen=True, slots=True)
class SearchAnswer:
    answer: str
    references: tuple[tuple[int, str], ...]  # (number, url), URLs of the results given


def search_answer(value: object, results: Sequence[SearchResult]) -> SearchAnswer:
    """The answer and its references. A reference counts only when it names a result that was given
    (by its number, or else by its URL): the sources shown are pages really retrieved."""
    obj = _object(value, '"answer" and "references"')
    answer = _text(obj, "answer", MAX_FIELD_CHARS)
    refs = obj.get("references", [])
    if not isinstance(refs, list):
        raise Malformed('"references" must be an array of {"number", "url"}')
    by_url = {r.url: r for r in results}
    kept: dict[int, str] = {}
    for ref in refs[: MAX_REFERENCES * 2]:
        if not isinstance(ref, Mapping):
            raise Malformed('each reference must be an object {"number", "url"}')
        number, url = ref.get("number"), ref.get("url")
        if isinstance(number, str) and number.strip().isdigit():
            number = int(number)
        found = None
        if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= len(results):
            found = results[number - 1]
        elif isinstance(url, str) and url in by_url:
            found = by_url[url]
        if found is not None and len(kept) < MAX_REFERENCES:
            kept.setdefault(found.index, found.url)
    return SearchAnswer(answer, tuple(sorted(kept.items())))


@dataclass(frozen=True, slots=True)
class Thought:
    title: str
    thoughts: str
    summary: str
    finish: bool


def thought(value: object) -> Thought:
    obj = _object(value, '"thinking_step_title", "thoughts", "summary" and "next_action"')
    action = obj.get("next_action")
    if action not in (CONTINUE, FINISH):
        raise Malformed(f'"next_action" must be "{CONTINUE}" or "{FINISH}"')
    return Thought(_text(obj, "thinking_step_title", MAX_SHORT_CHARS), _text(obj, "thoughts", MAX_FIELD_CHARS),
                   _text(obj, "summary", MAX_SUMMARY_CHARS), action == FINISH)


@dataclass(frozen=True, slots=True)
class PlanUpdate:
    todo_list: str
    changes: str
    next_step: int | None
    rationale: str


def plan_update(value: object) -> PlanUpdate:
    obj = _object(value, '"updated_todo_list", "changes_made", "next_step_number" and "rationale"')
    plan = todo_list(_text(obj, "updated_todo_list", MAX_TODO_CHARS * 2))
    number = obj.get("next_step_number")
    if isinstance(number, str) and number.strip().isdigit():
        number = int(number)
    next_step = number if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 1000 else None
    return PlanUpdate(plan, _text(obj, "changes_made", MAX_SUMMARY_CHARS, required=False), next_step,
                      _text(obj, "rationale", MAX_SUMMARY_CHARS, required=False))


@dataclass(frozen=True, slots=True)
class Evidence:
    point: str
    evidence: str
    source: str


@dataclass(frozen=True, slots=True)
class FinalAnswer:
    direct_answer: str
    explanation: str
    sources: tuple[Evidence, ...]
    limitations: tuple[str, ...]


def final_answer(value: object) -> FinalAnswer:
    obj = _object(value, '"direct_answer", "detailed_explanation", "sources_and_evidence" and "limitations"')
    raw_sources = obj.get("sources_and_evidence", [])
    if not isinstance(raw_sources, list):
        raise Malformed('"sources_and_evidence" must be an array of {"point", "evidence", "source"}')
    sources = []
    for item in raw_sources[:MAX_SOURCES]:
        entry = _object(item, '"point", "evidence" and "source" in each of "sources_and_evidence"')
        sources.append(Evidence(_text(entry, "point", MAX_SHORT_CHARS, required=False),
                                _text(entry, "evidence", MAX_SHORT_CHARS, required=False),
                                _text(entry, "source", MAX_SHORT_CHARS, required=False)))
    limitations = obj.get("limitations", [])
    if isinstance(limitations, str):
        limitations = [limitations]
    if not isinstance(limitations, list) or not all(isinstance(x, str) for x in limitations):
        raise Malformed('"limitations" must be an array of strings')
    return FinalAnswer(_text(obj, "direct_answer", MAX_TEXT_CHARS),
                       _text(obj, "detailed_explanation", MAX_TEXT_CHARS, required=False),
                       tuple(s for s in sources if s.point or s.evidence or s.source),
                       tuple(clip(x, MAX_SHORT_CHARS) for x in limitations[:MAX_LIMITATIONS] if x.strip()))
