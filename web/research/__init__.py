"""Deep research (`inference_mode: "Chain-of-Thought"`, `test_time_inference: true`).

`run_research(messages, tools, emit, limits, today=...)` researches the conversation's last question
through `ResearchTools` (model calls and web retrievals the caller fans out to miners) and emits
Markdown progress and the final answer through `emit`; the caller frames it as SSE, adds `[DONE]` on
success (an error event otherwise) and keeps the connection alive while a step works. See
`orchestrator.py` for the run, `prompts.py` for what miners are asked, `steps.py` for the bounds,
`tools.py` for the tools over the gateway's own fan-out (and how a run is charged to the key), and
`running.py` for how many runs may be under way at once.
"""

from web.research.orchestrator import (
    ResearchCallFailed,
    ResearchFailure,
    ResearchLimits,
    ResearchOutcome,
    ResearchTools,
    run_research,
)
from web.research.prompts import MARKER_PREFIX, ResearchStep

__all__ = ["MARKER_PREFIX", "ResearchCallFailed", "ResearchFailure", "ResearchLimits", "ResearchOutcome",
           "ResearchStep", "ResearchTools", "run_research"]
