"""What one worker publishes for the others (`actors/peers.py`): its metrics text and its status figures,
exactly as it would answer `/metrics` and `/status/data` alone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from web.metrics import metrics_registry, render
from web.services import Services
from web.status import KeySummary, status_data


def worker_report(services: Services) -> Callable[[], Awaitable[dict[str, Any]]]:
    registry = metrics_registry(services)
    keys = KeySummary()

    async def report() -> dict[str, Any]:
        return {"metrics": render(registry).decode(), "status": await status_data(services, keys)}

    return report
