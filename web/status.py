"""`GET /status/miners`: each miner's breaker and health figures, and the fan-out pool's."""

from __future__ import annotations

from quart import Blueprint, Response

from web.errors import json_response
from web.services import Services


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("status", __name__)

    @bp.get("/status/miners")
    async def miners_status() -> Response:
        return json_response({"miners": services.miner_health.report(),
                              "fanout": services.fanout.health()})

    return bp
