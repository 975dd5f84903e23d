"""API-key management (`admin-key` header) and `whoami` (an API key's own view of itself).

Served under `/api_management/...` as in the seed document, and without the prefix as the
predecessor did. Answers are those of docs/protocol.md, "The client API". Keys are never logged, and no error
repeats one: the modify and delete paths carry the key, so a wrong method on them gets its 405 here,
naming the route rather than the path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from quart import Blueprint, Response, request

from actors.keystore import KeyNotFound, KeyStoreUnavailable
from actors.keystore.records import RATE_LIMIT_MAX
from web.auth import admin_required, authorize, store_unavailable
from web.body import int_arg
from web.errors import ApiError, json_response
from web.services import Services

log = logging.getLogger("sn1_gateway.keys")

PREFIXES = ("/api_management", "")
OTHER_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def rate_limit_arg() -> int:
    return int_arg("rate_limit", request.args.get("rate_limit"), low=0, high=RATE_LIMIT_MAX)


def not_found() -> ApiError:
    return ApiError(404, "No such API key.", code="api_key_not_found")


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("keys", __name__)

    async def create_key() -> Response:
        admin_required(services)
        rate_limit = rate_limit_arg()
        try:
            api_key, info = await services.keys.create(rate_limit)
        except KeyStoreUnavailable as exc:
            raise store_unavailable() from exc
        log.info("API key %s (id %s) created, rate limit %d/min", info.prefix, info.id[:16], rate_limit)
        return json_response({"message": "API key created", "api_key": api_key})

    async def modify_key(api_key: str) -> Response:
        admin_required(services)
        rate_limit = rate_limit_arg()
        try:
            info = await services.keys.modify(api_key, rate_limit)
        except KeyNotFound:
            raise not_found() from None
        except KeyStoreUnavailable as exc:
            raise store_unavailable() from exc
        log.info("API key %s (id %s) rate limit set to %d/min", info.prefix, info.id[:16], rate_limit)
        return json_response({"message": "API key updated", "api_key": api_key})

    async def delete_key(api_key: str) -> Response:
        admin_required(services)
        try:
            info = await services.keys.delete(api_key)
        except KeyNotFound:
            raise not_found() from None
        except KeyStoreUnavailable as exc:
            raise store_unavailable() from exc
        log.info("API key %s (id %s) deleted", info.prefix, info.id[:16])
        return json_response({"message": "API key deleted"})

    def wrong_method(route: str, allowed: str) -> Callable[[str], Awaitable[Response]]:
        async def refuse(api_key: str) -> Response:
            raise ApiError(405, f"Method {request.method} is not allowed on {route}.", code="method_not_allowed",
                           headers={"Allow": f"{allowed}, OPTIONS"})

        return refuse

    for prefix in PREFIXES:
        for action, allowed in (("modify", "PUT"), ("delete", "DELETE")):
            route = f"{prefix}/{action}-api-key/{{key}}"
            bp.add_url_rule(f"{prefix}/{action}-api-key/<path:api_key>", f"{action}{prefix}-other",
                            wrong_method(route, allowed), methods=[m for m in OTHER_METHODS if m != allowed])
        # The seed's path ends in a slash; answer without it too (no redirect: clients may not follow).
        bp.add_url_rule(f"{prefix}/create-api-key/", f"create{prefix}", create_key, methods=["POST"],
                        strict_slashes=False)
        bp.add_url_rule(f"{prefix}/modify-api-key/<path:api_key>", f"modify{prefix}", modify_key,
                        methods=["PUT"])
        bp.add_url_rule(f"{prefix}/delete-api-key/<path:api_key>", f"delete{prefix}", delete_key,
                        methods=["DELETE"])

    @bp.get("/api_management/keys")
    async def list_keys() -> Response:
        admin_required(services)
        try:
            keys = await services.keys.list_keys()
        except KeyStoreUnavailable as exc:
            raise store_unavailable() from exc
        return json_response({"object": "list", "data": [info.as_dict() for info in keys]})

    @bp.get("/api_management/whoami")
    async def whoami() -> Response:
        grant = await authorize(services)
        try:
            info = await services.keys.info(grant.key_id)
        except KeyStoreUnavailable as exc:
            raise store_unavailable() from exc
        if info is None:  # deleted between the check and now
            raise ApiError(401, "Invalid API key: it is unknown or has been revoked.", code="invalid_api_key")
        return json_response({"object": "api_key", **info.as_dict()}, headers=grant.headers)

    return bp
