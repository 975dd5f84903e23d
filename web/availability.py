"""Miner availability, answered from the availability snapshot (no request reaches a miner).

Both routes need an API key, like every client route, checked before any body is read; a list of
uids is bounded (`MAX_UIDS`), so one request cannot make the gateway build an answer of any size.
"""

from __future__ import annotations

from quart import Blueprint, Response, request

from actors.availability import KNOWN_TASKS
from web.auth import authorize, rate_limit_headers_on_errors
from web.body import int_arg, json_body
from web.errors import ApiError, json_response
from web.services import Services

MAX_UIDS = 65_536  # uids are 16-bit on the chain: more entries than that cannot all be distinct uids


def blueprint(services: Services) -> Blueprint:
    bp = Blueprint("availability", __name__, url_prefix="/miner_availabilities")

    @bp.post("/miner_availabilities")
    async def miner_availabilities() -> Response:
        grant = await authorize(services)
        with rate_limit_headers_on_errors(grant):
            data = await json_body(allow_empty=True)
            subnet = services.subnet.get()
            if isinstance(data, list) and len(data) > MAX_UIDS:
                raise ApiError(400, f"At most {MAX_UIDS} uids may be asked for at once, not {len(data)}.",
                               code="invalid_request")
            if data is None or data == []:
                uids = [n.uid for n in subnet.neurons]
            elif isinstance(data, list) and all(isinstance(u, int) and not isinstance(u, bool) for u in data):
                uids = data
            else:
                raise ApiError(400, "The body must be a JSON array of integer uids, or null for all.",
                               code="invalid_request")
            snapshot = services.availability.get()
            answer = {}
            for uid in uids:
                found = snapshot.miners.get(uid)
                answer[str(uid)] = None if found is None else found.as_wire()
            return json_response(answer, headers=grant.headers)

    @bp.get("/get_available_miners")
    async def get_available_miners() -> Response:
        grant = await authorize(services)
        with rate_limit_headers_on_errors(grant):
            return json_response(available_miners(services), headers=grant.headers)

    return bp


def available_miners(services: Services) -> list[int]:
    """`get_available_miners`: uids serving `task` (and `model`), best incentive first, at most `k`."""
    task = request.args.get("task") or None
    if task is not None and task not in KNOWN_TASKS:
        raise ApiError(400, f"Unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}.",
                       param="task", code="invalid_parameter")
    model = request.args.get("model") or None
    k = int_arg("k", request.args.get("k"), default=10, low=1, high=65536)
    index = services.selector.index()
    snapshot = services.availability.get()
    miners = index.miners()
    if task is not None:
        miners = index.eligible(task, model)
    elif model is not None:
        miners = tuple(n for n in miners if (found := snapshot.miners.get(n.uid)) and model in found.models)
    elif not snapshot.everyone:
        miners = tuple(n for n in miners if snapshot.miners.get(n.uid) is not None)
    return [n.uid for n in miners[:k]]
