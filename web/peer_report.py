"""What one worker publishes for the others (`actors/peers.py`): its metrics text and its status figures,
as it would answer `/metrics` and `/status/data` alone, but the keys.

Only figures at hand go in, since a report is built every few seconds whether anyone asks or not: the
key summary (a read of the whole key store) is left to `/status/data`, which reads it once, when asked,
from the store all workers share.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from web.metrics import metrics_registry, render
from web.services import Services
from web.status import status_figures


def worker_report(services: Services) -> Callable[[], Awaitable[dict[str, Any]]]:
    registry = metrics_registry(services)

    async def report() -> dict[str, Any]:
        return {"metrics": render(registry).decode(), "status": status_figures(services)}

    return report
