"""Liveness and readiness."""

from __future__ import annotations

from quart import Blueprint, Response

from web.errors import json_response
from web.services import Services


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @bp.get("/health/ready")
    async def ready() -> Response:
        report = services.readiness()
        return json_response(report, 200 if report["ready"] else 503)

    return bp
