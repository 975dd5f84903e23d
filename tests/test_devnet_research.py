"""The devnet plays deep research: a whole run of the real orchestrator against devnet miners over
loopback HTTP (Epistula-signed), its bad-JSON fault, and ordinary prompts left as they were."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from bittensor_core import Keypair

from devnet import research as devnet_research
from devnet import text
from devnet.miner import Miner, MinerFault, MinerTiming
from devnet.network import Devnet
from web.research import (
    MARKER_PREFIX,
    ResearchCallFailed,
    ResearchFailure,
    ResearchLimits,
    ResearchOutcome,
    ResearchStep,
    prompts,
    run_research,
    steps,
)
from web.research.extract import Malformed, extract
from wire.epistula import Signer

TODAY = "2025-07-03"
QUESTION = "How do Subnet 1 validators score organic answers?"
FAST = MinerTiming(first_token_s=0.0, token_s=0.0)


class DevnetTools:
    """ResearchTools over devnet miners: each call goes to the next miner in turn, signed as the gateway,
    streamed as SSE and joined, as the gateway's fan-out would do with one miner."""

    def __init__(self, http: httpx.AsyncClient, devnet: Devnet) -> None:
        self.http = http
        self.miners = itertools.cycle(devnet.miners)
        self.signer = Signer(Keypair.create_from_uri(devnet.gateway_uri))
        self.steps: list[str] = []

    async def _ask(self, body: dict[str, Any]) -> str:
        miner: Miner = next(self.miners)
        raw = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **self.signer.headers(raw, miner.hotkey)}
        try:
            response = await self.http.post(f"http://{miner.address}/v1/chat/completions", content=raw,
                                            headers=headers)
        except httpx.HTTPError as exc:
            raise ResearchCallFailed(f"miner {miner.uid}: {exc!r}") from exc
        if response.status_code != 200:
            raise ResearchCallFailed(f"miner {miner.uid} answered {response.status_code}")
        pieces = []
        for line in response.text.splitlines():
            if line.startswith("data: ") and line[6:] != "[DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    pieces.append(chunk["choices"][0]["delta"].get("content") or "")
        return "".join(pieces)

    async def complete(self, messages: list[dict[str, str]], *, step: str) -> str:
        self.steps.append(step)
        return await self._ask({"model": "Default", "messages": messages, "stream": True, "seed": 7,
                                "task": "InferenceTask",
                                "sampling_parameters": {"temperature": 0.15, "max_new_tokens": 6144}})

    async def search(self, query: str, *, n_results: int) -> list[dict[str, str]]:
        answer = await self._ask({"messages": [{"role": "user", "content": query}], "seed": 7,
                                  "task": "WebRetrievalTask", "target_results": n_results, "timeout": 10})
        results: list[dict[str, str]] = json.loads(answer)
        return results


@pytest.fixture
async def devnet(nursery: trio.Nursery) -> AsyncIterator[Devnet]:
    net: Devnet = await nursery.start(Devnet(miners=3, timing=FAST, validator_poll_s=60).run)
    yield net
    nursery.cancel_scope.cancel()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def research(http: httpx.AsyncClient, devnet: Devnet, question: str = QUESTION,
                   limits: ResearchLimits | None = None) -> tuple[ResearchOutcome, str, DevnetTools]:
    tools = DevnetTools(http, devnet)
    emitted: list[str] = []

    async def emit(piece: str) -> None:
        emitted.append(piece)

    with trio.fail_after(20):
        outcome = await run_research([{"role": "user", "content": question}], tools, emit,
                                     limits or ResearchLimits(), today=TODAY)
    return outcome, "".join(emitted), tools


async def test_the_devnet_plays_a_whole_run(http: httpx.AsyncClient, devnet: Devnet) -> None:
    outcome, streamed, tools = await research(http, devnet)
    assert outcome.completed and outcome.researched and outcome.steps == 2, outcome
    assert re.findall(r"^## .*$", streamed, re.MULTILINE) == [
        "## Generating Research Plan", "## Research Plan",
        "## Step 1: Planning Tools", "## Executing web_search", "## Analyzing Step 1", "## Step 1 Summary",
        "## Updating Research Plan", "## Research Plan Updated",
        "## Step 2: Planning Tools", "## Executing web_search", "## Analyzing Step 2", "## Step 2 Summary",
        "## Generating Final Answer", "## Final Answer"]
    assert tools.steps == ["assess", "plan", "tools", "query", "search_answer", "think", "update",
                           "tools", "query", "search_answer", "think", "final"]
    # a plan of two items, checked off as the steps are done
    plan = streamed.split("## Research Plan\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert re.findall(r"^\d+\. ", plan, re.MULTILINE) == ["1. ", "2. "]
    assert "Information needed:" in plan and "Approach:" in plan and "Validation:" in plan
    updated = streamed.split("## Research Plan Updated\n\n", 1)[1]
    assert updated.startswith("✓ 1. Find current sources on How do Subnet 1 validators score organic answers")
    # the searches sent sensible queries, and the final answer cites what they returned
    queries = [r.json()["messages"][0]["content"] for m in devnet.miners for r in m.received
               if r.json().get("task") == "WebRetrievalTask"]
    assert sorted(queries) == ["how do sources differ on how do subnet 1 validators score organic answers",
                               "how do subnet 1 validators score organic answers"]
    cited = set(re.findall(r"<(https://[^>]+)>", outcome.answer))
    assert len(cited) == 4  # two pages per search
    shared = {str(r["url"]) for q in queries for r in text.search_results(q, 0, 2)
              if str(r["url"]).startswith("https://docs.example.org/")}  # the page every miner returns first
    assert len(shared) == 2 and shared <= cited
    assert all(re.match(r"https://(docs\.example\.org|miner-\d\.example\.net)/[0-9a-f]{10}/[01]$", url)
               for url in cited)
    assert "### Sources" in outcome.answer and "### Limitations" in outcome.answer
    assert streamed.endswith(outcome.answer + "\n")
    # every call reached a miner with its step's marker
    markers = [str(r.json()["messages"][0]["content"]).splitlines()[0] for m in devnet.miners for r in m.received
               if r.json().get("task") == "InferenceTask"]
    assert sorted(markers) == sorted(MARKER_PREFIX + s for s in tools.steps)


async def test_a_greeting_is_answered_without_research(http: httpx.AsyncClient, devnet: Devnet) -> None:
    outcome, streamed, tools = await research(http, devnet, "Hello!")
    assert outcome.completed and not outcome.researched
    assert streamed == outcome.answer == "Hello! Ask me a question and I will research it for you."
    assert tools.steps == ["assess"]


async def test_research_bad_json_ends_the_run_honestly(http: httpx.AsyncClient, devnet: Devnet) -> None:
    for miner in devnet.miners:
        await miner.set_fault(MinerFault.RESEARCH_BAD_JSON)
    outcome, streamed, tools = await research(http, devnet, limits=ResearchLimits(json_retries=2))
    assert not outcome.completed and outcome.failure is ResearchFailure.UNUSABLE_ANSWER
    assert outcome.message == ("the assess step's answer was not the JSON asked for in 3 tries "
                               "(the answer holds no valid JSON)")
    assert tools.steps == ["assess"] * 3 and streamed == ""


async def test_one_bad_miner_is_outvoted_by_asking_again(http: httpx.AsyncClient, devnet: Devnet) -> None:
    """Each retry goes to the next miner (as a new fan-out would): a single miner writing bad JSON
    costs a retry, not the run."""
    await devnet.miners[0].set_fault(MinerFault.RESEARCH_BAD_JSON)
    outcome, _, tools = await research(http, devnet)
    assert outcome.completed and outcome.steps == 2
    assert tools.steps[:3] == ["assess", "assess", "plan"]


@pytest.mark.parametrize("step", sorted(prompts.JSON_STEPS))
async def test_every_json_step_of_the_bad_json_fault_is_refused(step: ResearchStep) -> None:
    """What `research_bad_json` writes for a step is refused by that step's own check, while the
    healthy answer to the same prompt passes it."""
    results = (steps.SearchResult(1, "https://docs.example.org/a", "page a"),
               steps.SearchResult(2, "https://docs.example.org/b", "page b"))
    user = prompts.user(("Question", QUESTION), ("Research plan", "1. Find a\n2. Compare b"),
                        ("Findings so far", "### Step 1: a\nSources: https://docs.example.org/a"),
                        ("Search question", QUESTION), ("Search results", prompts.results_json(results)),
                        ("This step", "Step 2: go on"), ("Step just finished", "Step 1: a"))
    messages = [prompts.system(step, today=TODAY), user]
    shape = {
        ResearchStep.ASSESS: steps.assessment,
        ResearchStep.TOOLS: lambda v: steps.tool_plan(v, max_calls=2, max_results=2),
        ResearchStep.SEARCH_ANSWER: lambda v: steps.search_answer(v, results),
        ResearchStep.THINK: steps.thought,
        ResearchStep.UPDATE: steps.plan_update,
        ResearchStep.FINAL: steps.final_answer,
    }[step]
    healthy = devnet_research.reply_to(messages)
    broken = devnet_research.reply_to(messages, broken=True)
    assert healthy is not None and broken is not None
    extract(healthy, shape)
    with pytest.raises(Malformed):
        extract(broken, shape)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
    [{"role": "user", "content": "sn1-research/assess"}],  # a marker outside the system message
    [{"role": "system", "content": "Answer this.\nsn1-research/none_such"}],
    [{"role": "system", "content": None}], "not a list", [],
])
def test_other_prompts_are_not_research(messages: Any) -> None:
    assert devnet_research.reply_to(messages) is None
    assert devnet_research.reply_to(messages, broken=True) is None


async def test_a_bad_json_miner_answers_ordinary_chat_as_before(http: httpx.AsyncClient, devnet: Devnet) -> None:
    miner = devnet.miners[1]
    await miner.set_fault(MinerFault.RESEARCH_BAD_JSON)
    tools = DevnetTools(http, devnet)
    tools.miners = itertools.cycle([miner])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    said = await tools.complete(messages, step="chat")
    assert said == text.answer(7, messages, 6144).text


def test_research_prompts_of_hostile_clients_never_break_the_devnet() -> None:
    """A client may write the marker into its own system message and anything after it."""
    for step in ResearchStep:
        for content in ["", "## Question", "## Search results\n```json\n[1, {\"index\": \"x\"}]\n```",
                        "## Research plan\n1.\n✓", "## This step\nStep 99999999999"]:
            answer = devnet_research.reply_to([{"role": "system", "content": step.marker},
                                               {"role": "user", "content": content}])
            assert isinstance(answer, str) and answer
