"""The ASGI wrappers of the served app: a response's last write survives the cancellation that follows
it (`shield_response_end`, around every served app); each request gets an id, its figures and one access line (`observe_requests`, around the
gateway's)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart import request as quart_request

from actors.keystore.records import display_prefix
from web.auth import api_key_of
from web.telemetry import (
    RequestRecord,
    Telemetry,
    current_request,
    loggable_path,
    open_request,
    route_template,
)
from wire.ids import uuid4_hex

if TYPE_CHECKING:
    from quart_trio import QuartTrio

def shield_response_end(app: ASGIFramework, limit_s: float) -> ASGIFramework:
    """Let the last body message of each response finish even when the app's task is cancelled.

    Quart-Trio cancels its request task as soon as hypercorn reports the response complete, and
    hypercorn does that from inside this very send, before it re-arms the connection's keep-alive
    watch. Cancelled there, an idle keep-alive connection is never closed: neither after
    `keep_alive_timeout` nor at shutdown, which then waits the whole drain deadline. The shield is
    bounded by `limit_s`, so a client that stops reading cannot hold it.

    A WebSocket upgrade is refused here: no route serves one.
    """

    async def app_with_shielded_end(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "websocket":  # no route speaks WebSocket: refused before the app (a 403)
            await receive()
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        body_pending = [has_body(scope)]

        async def receive_tracked() -> ASGIReceiveEvent:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_pending[0] = False
            return message

        async def send_end_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and body_pending[0]:
                # Answered before the request's body was read (a 401, 413, 429): the connection
                # cannot carry another request, and the client is told so instead of finding out.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True, deadline=trio.current_time() + limit_s):
                    await send(message)
            else:
                await send(message)

        await app(scope, receive_tracked, send_end_shielded)

    return app_with_shielded_end


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a Content-Length above 0, or chunked)."""
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())  # type: ignore[assignment]
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding" or (lower == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def request_headers(scope: Scope) -> dict[str, str]:
    """A plain ASGI request's headers by lower-cased name, the first of each as Quart's would give it."""
    headers: dict[str, str] = {}
    raw: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())  # type: ignore[assignment]
    for name, value in raw:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


# -- request ids, the access line and the request figures ---------------------------------------------

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID = 64
# What a client's X-Request-ID may hold to be kept: printable token characters, nothing that could
# break a log line, a header or a JSON string.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:~+/=-]{1,%d}" % MAX_REQUEST_ID)
ACCESS_LOGGER = "sn1_gateway.access"


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a short printable token, else a new uuid (hex)."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            value = value.strip()
            if _REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid4_hex()


def key_prefix_from(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The display prefix (as the key store shows it) of the API key a request presents, if any."""
    wanted = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in (b"api-key", b"authorization"):
            wanted[lowered.decode("latin-1")] = value.decode("latin-1")
    if not wanted:
        return None
    key = api_key_of(wanted)
    return None if key is None else display_prefix(key)


def access_fields(record: RequestRecord) -> dict[str, Any]:
    """What the access line says, by name (the JSON log's fields)."""
    return {
        "method": record.method,
        "path": loggable_path(record),
        "status": record.status,
        "duration_ms": round(record.duration_s * 1000, 1),
        "key": record.key_prefix,
        "miners": list(record.miners),
        "winner": record.winner,
        "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 1),
    }


def access_line(fields: Mapping[str, Any]) -> str:
    """`POST /v1/chat/completions 200 35.2ms key=sn1-AbCd miners=0,3,4 winner=3 ttft=20.4ms`; a part
    that does not apply is `-`."""
    status = "-" if fields["status"] is None else fields["status"]
    miners = ",".join(map(str, fields["miners"])) or "-"
    ttft = "-" if fields["ttft_ms"] is None else f"{fields['ttft_ms']}ms"
    return (f"{fields['method']} {fields['path']} {status} {fields['duration_ms']}ms key={fields['key'] or '-'} "
            f"miners={miners} winner={'-' if fields['winner'] is None else fields['winner']} ttft={ttft}")


def observe_requests(app: QuartTrio, telemetry: Telemetry, *,
                     access_log: logging.Logger | None = None) -> ASGIFramework:
    """`app`, with every HTTP request observed: a request id (the client's `X-Request-ID` when it is a
    short printable token, else a new uuid) in the response's `X-Request-ID` (replacing any a route
    set) and on every log record emitted while the request is handled; its figures counted in
    `telemetry`; one access line at its end, on the `sn1_gateway.access` logger at INFO.

    The matched route is noted by a `before_request` hook registered on `app`, so the access line and
    the labels name a rule (`/modify-api-key/{api_key}`), never a path that holds a key.
    """
    log = access_log or logging.getLogger(ACCESS_LOGGER)

    @app.before_request
    async def note_route() -> None:
        record = current_request()
        if record is not None and quart_request.url_rule is not None:
            record.route = route_template(quart_request.url_rule.rule)

    async def observed(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = scope["headers"]
        record = RequestRecord(id=request_id_from(headers), method=scope["method"], path=scope["path"],
                               started=trio.current_time())
        id_header = (REQUEST_ID_HEADER, record.id.encode("ascii"))

        async def send_observed(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                kept = [(n, v) for n, v in message.get("headers", ()) if n.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*kept, id_header]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record.ended = trio.current_time()
            await send(message)

        close = open_request(record)
        telemetry.started()
        try:
            await app(scope, receive, send_observed)
        except Exception:
            if record.status is None:
                record.status = 500  # what the server answers for an app that raised
            raise
        finally:
            if record.ended is None:
                record.ended = trio.current_time()
            record.settle()
            telemetry.finished(record)
            if log.isEnabledFor(logging.INFO):
                record.key_prefix = key_prefix_from(headers)
                fields = access_fields(record)
                log.info("%s", access_line(fields), extra={"access": fields})
            close()

    return observed
