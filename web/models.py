"""`GET /v1/models`: the models miners say they serve (OpenAI's list shape)."""

from __future__ import annotations

from quart import Blueprint, Response

from web.auth import authorize
from web.errors import json_response
from web.services import Services


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("models", __name__)

    @bp.get("/v1/models")
    async def models() -> Response:
        grant = await authorize(services)
        names = services.availability.get().models()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "sn1"} for name in names]
        return json_response({"object": "list", "data": data}, headers=grant.headers)

    return bp
