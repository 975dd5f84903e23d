"""What a simulated miner answers to the gateway's deep-research prompts.

A research prompt is recognised by the marker its system message starts with, `sn1-research/<step>`
(the gateway's `web.research.prompts`); its user message is made of `## ` sections. The answers are
deterministic and valid for each step: a plan of two items, one web search per step, a think step that
finishes at step 2, a final answer citing the URLs of the search results it was given. A greeting is
answered directly, without research. Anything else a miner is asked gets its ordinary answer
(`reply_to` returns None). Every input is a client's text: nothing here may fail on it.

`broken=True` (the `research_bad_json` fault) answers every step that asks for JSON with its answer
written as a Python dict printout and cut short, which no JSON parser takes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

MARKER = re.compile(r"^sn1-research/([a-z_]+)\s*$", re.MULTILINE)
JSON_STEPS = frozenset({"assess", "tools", "search_answer", "think", "update", "final"})
FINISH_AT_STEP = 2
GREETING = re.compile(r"^\s*(hi|hello|hey|good (morning|afternoon|evening)|thanks|thank you)\b[\s!.,]*$",
                      re.IGNORECASE)
ITEM = re.compile(r"^(\s*)(✓\s*)?(\d+)\.\s+(.*)$")
STEP_NUMBER = re.compile(r"Step (\d+)")
URL = re.compile(r"https?://[^\s<>()\[\]\"'`,]+")
FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
MAX_TOPIC_CHARS = 80
MAX_CITED = 3


def step_of(messages: Any) -> str | None:
    """The research step a request's system message names, or None for any other request."""
    if not isinstance(messages, list) or not messages:
        return None
    first = messages[0]
    if not isinstance(first, dict) or first.get("role") != "system" or not isinstance(first.get("content"), str):
        return None
    found = MARKER.search(first["content"][:200])
    return found.group(1) if found else None


def sections(text: str) -> dict[str, str]:
    """The `## title` sections of a research prompt (title -> text)."""
    found: dict[str, str] = {}
    title: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            if title is not None:
                found.setdefault(title, "\n".join(lines).strip())
            title, lines = line[3:].strip(), []
        else:
            lines.append(line)
    if title is not None:
        found.setdefault(title, "\n".join(lines).strip())
    return found


def topic_of(question: str) -> str:
    """The question on one line, without its final punctuation, cut at a word to MAX_TOPIC_CHARS."""
    words = " ".join(question.split()).rstrip("?.! ")
    if len(words) > MAX_TOPIC_CHARS:
        words = words[:MAX_TOPIC_CHARS].rsplit(" ", 1)[0]
    return words or "the question"


def step_number(text: str) -> int:
    found = STEP_NUMBER.search(text)
    return int(found.group(1)) if found and len(found.group(1)) < 4 else 1


def plan_items(plan: str) -> list[tuple[int, bool, str]]:
    """(line index, done, title) of each numbered item of a plan."""
    items = []
    for i, line in enumerate(plan.splitlines()):
        found = ITEM.match(line)
        if found:
            items.append((i, bool(found.group(2)) or "✓" in found.group(4), found.group(4).strip()))
    return items


def _assess(parts: Mapping[str, str]) -> Any:
    question = parts.get("Question", "")
    if GREETING.match(question):
        return {"is_suitable": False, "reason": "A greeting needs no research.",
                "direct_answer": "Hello! Ask me a question and I will research it for you."}
    return {"is_suitable": True, "reason": f"Answering this needs current sources on {topic_of(question)}.",
            "direct_answer": None}


def _plan(parts: Mapping[str, str]) -> str:
    topic = topic_of(parts.get("Question", ""))
    return (f"1. Find current sources on {topic}\n"
            f"   - Information needed: the main facts about {topic}\n"
            f"   - Approach: search the web for {topic}\n"
            "   - Validation: at least two pages agree\n"
            f"2. Check the findings about {topic} against a second search\n"
            "   - Information needed: where the sources differ\n"
            f"   - Approach: search the web for comparisons of {topic}\n"
            "   - Validation: the differences are explained by the sources")


def _open_item(parts: Mapping[str, str]) -> tuple[int, str]:
    """The position (from 1) and title of the plan's first item not marked done."""
    items = plan_items(parts.get("Research plan", ""))
    for position, (_, done, title) in enumerate(items, 1):
        if not done:
            return position, title
    return len(items) + 1, topic_of(parts.get("Question", ""))


def _tools(parts: Mapping[str, str]) -> Any:
    position, item = _open_item(parts)
    topic = topic_of(parts.get("Question", ""))
    question = topic if position == 1 else f"How do sources differ on {topic}?"
    return [{"tool_name": "web_search", "parameters": {"question": question, "n_results": 2},
             "purpose": f"Search the web for step {position}: {item}"}]


def _query(parts: Mapping[str, str]) -> str:
    return topic_of(parts.get("Search question", "")).lower()


def _results(text: str) -> list[dict[str, Any]]:
    fenced = FENCED.search(text)
    try:
        results = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return []
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def _search_answer(parts: Mapping[str, str]) -> Any:
    results = [r for r in _results(parts.get("Search results", ""))
               if isinstance(r.get("index"), int) and isinstance(r.get("url"), str)]
    if not results:
        return {"answer": "The results do not answer the question.", "references": []}
    cited = " ".join(f"[{r['index']}]" for r in results)
    return {"answer": f"{topic_of(parts.get('Question', ''))}: the pages found agree {cited}.",
            "references": [{"number": r["index"], "url": r["url"]} for r in results]}


def _think(parts: Mapping[str, str]) -> Any:
    number = step_number(parts.get("This step", ""))
    _, item = _open_item(parts)
    tools = parts.get("Tool results of this step", "")
    found = len(set(URL.findall(tools)))
    return {"thinking_step_title": item[:120],
            "thoughts": f"The searches of this step found {found} sources about {item}.",
            "summary": f"Step {number} found {found} sources about {item}.",
            "next_action": "generate_final_answer" if number >= FINISH_AT_STEP else "continue_thinking"}


def _update(parts: Mapping[str, str]) -> Any:
    plan = parts.get("Research plan", "")
    lines = plan.splitlines()
    open_items = [(i, title) for i, done, title in plan_items(plan) if not done]
    if open_items:
        i = open_items[0][0]
        lines[i] = re.sub(r"^(\s*)", r"\1✓ ", lines[i], count=1)
    number = step_number(parts.get("Step just finished", ""))
    return {"updated_todo_list": "\n".join(lines), "changes_made": f"Marked step {number} done.",
            "next_step_number": number + 1, "rationale": "The step's searches answered it."}


def _final(parts: Mapping[str, str]) -> Any:
    topic = topic_of(parts.get("Question", ""))
    urls = list(dict.fromkeys(URL.findall(parts.get("Findings so far", ""))))[:MAX_CITED]
    return {"direct_answer": f"In short: the sources found agree on {topic}.",
            "detailed_explanation": f"The research searched the web twice for {topic} and compared the pages.",
            "sources_and_evidence": [{"point": f"Finding {i} on {topic}", "evidence": "stated by the page",
                                      "source": url} for i, url in enumerate(urls, 1)],
            "limitations": ["The devnet's pages are simulated."]}


_HANDLERS: dict[str, Callable[[Mapping[str, str]], Any]] = {
    "assess": _assess, "plan": _plan, "tools": _tools, "query": _query, "search_answer": _search_answer,
    "think": _think, "update": _update, "final": _final}


def reply_to(messages: Any, *, broken: bool = False) -> str | None:
    """The answer to a research prompt, or None when `messages` is not one."""
    step = step_of(messages)
    handler = _HANDLERS.get(step or "")
    if step is None or handler is None:
        return None
    prompt = messages[1].get("content") if len(messages) > 1 and isinstance(messages[1], dict) else None
    answer = handler(sections(prompt if isinstance(prompt, str) else ""))
    if isinstance(answer, str):
        return answer
    if broken and step in JSON_STEPS:
        printed = repr(answer)
        return f"Here is the result: {printed[: max(1, len(printed) - 2)]}"
    return json.dumps(answer, ensure_ascii=False)
