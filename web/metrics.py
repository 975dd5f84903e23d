"""`GET /metrics`: the readiness report and per-miner health in the Prometheus text format.

Every number already reported on `/health/ready` becomes a gauge named after its path
(`sn1_gateway_scoring_dropped_spool_full`); actors, miners and scoring validators get labels
(`sn1_gateway_scoring_validator_refused_signer{hotkey="5F..."} 1`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from quart import Blueprint, Response

from web.services import Services

PREFIX = "sn1_gateway"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
_UNSAFE_LABEL = re.compile(r'["\\\n]')  # what a label value cannot hold unescaped
_SKIP = frozenset({"actors", "ready", "draining"})


def metric_name(*parts: str) -> str:
    return _UNSAFE.sub("_", "_".join((PREFIX, *parts))).lower()


def flatten(value: Any, path: tuple[str, ...]) -> Iterator[tuple[str, float]]:
    """Numeric and boolean leaves of a report, with their paths; text and None are left out."""
    if isinstance(value, int | float):  # booleans too
        yield metric_name(*path), float(value)
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            yield from flatten(inner, (*path, str(key)))


def render(services: Services) -> str:
    report = services.readiness()
    lines = [
        f"# TYPE {PREFIX}_ready gauge",
        f"{PREFIX}_ready {int(report['ready'])}",
        f"{PREFIX}_draining {int(report['draining'])}",
    ]
    for actor, state in report["actors"].items():
        lines.append(f'{PREFIX}_actor_running{{actor="{actor}"}} {int(state["status"] == "running")}')
        lines.append(f'{PREFIX}_actor_restarts{{actor="{actor}"}} {state["restarts"]}')
    seen: set[str] = set()
    for component, details in report.items():
        if component in _SKIP:
            continue
        if component == "scoring" and isinstance(details, Mapping) and isinstance(details.get("validators"), Mapping):
            validators = details["validators"]
            details = {k: v for k, v in details.items() if k != "validators"}
            for hotkey, state in validators.items():
                label = f'{{hotkey="{_UNSAFE_LABEL.sub("", str(hotkey))}"}}'
                for name, number in flatten(state, ("scoring", "validator")):
                    lines.append(f"{name}{label} {number:g}")
        for name, number in flatten(details, (component,)):
            if name not in seen:  # two paths can sanitise to one name; keep the first
                seen.add(name)
                lines.append(f"{name} {number:g}")
    for uid, miner in services.miner_health.report().items():
        label = f'{{uid="{uid}"}}'
        lines.append(f"{PREFIX}_miner_breaker_open{label} {int(miner['breaker'] == 'open')}")
        lines.append(f"{PREFIX}_miner_successes{label} {miner['successes']}")
        lines.append(f"{PREFIX}_miner_failures{label} {miner['failures']}")
        if miner["ttft_ewma_s"] is not None:
            lines.append(f"{PREFIX}_miner_ttft_ewma_seconds{label} {miner['ttft_ewma_s']:g}")
    return "\n".join(lines) + "\n"


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("metrics", __name__)

    @bp.get("/metrics")
    async def metrics() -> Response:
        return Response(render(services), content_type="text/plain; version=0.0.4; charset=utf-8")

    return bp
