"""OpenAI-style errors: every failure a client sees is `{"error": {message, type, param, code}}`.

Handlers raise `ApiError`; framework errors (unknown route, wrong method, body too large) and
unexpected exceptions are mapped here, at the boundary, so no route returns a bare 500 or a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from hypercorn.typing import ASGISendCallable, ASGISendEvent
from quart import Quart, Response
from werkzeug.exceptions import HTTPException, RequestTimeout

from actors.fanout.pool import PoolBusy
from actors.fanout.selection import SelectionError
from wire import jsonio

log = logging.getLogger("sn1_gateway.web")

# The `type` field per status, following OpenAI's vocabulary where it has a word for it.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error with everything the client should see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}

    def response(self) -> Response:
        return json_response(self.body(), self.status, headers=self.headers)

    async def send(self, send: ASGISendCallable) -> None:
        """The same answer as `response`, sent over plain ASGI."""
        await send_json(send, self.body(), self.status, headers=self.headers)


@contextmanager
def fanout_errors() -> Iterator[None]:
    """Choosing miners and starting a fan-out: what fails there is the client's answer (400, 503, ...)."""
    try:
        yield
    except SelectionError as exc:
        raise ApiError(exc.status, str(exc), code=exc.code, param=exc.param) from exc
    except PoolBusy as exc:
        raise ApiError(503, f"The gateway is at capacity ({exc}); retry shortly.", code="overloaded",
                       headers={"Retry-After": "1"}) from exc


def json_response(payload: Any, status: int = 200, *, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        jsonio.dumps(payload),
        status=status,
        content_type="application/json",
        headers=dict(headers or {}),
    )


async def send_json(send: ASGISendCallable, payload: Any, status: int = 200, *,
                    headers: Mapping[str, str] | None = None) -> None:
    """`json_response` over plain ASGI, with the same headers in the same order."""
    body = jsonio.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [*encode_headers(headers or {}), (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode("ascii"))]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def encode_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Header pairs as ASGI carries them (names lower-cased, as Quart sends them)."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


_HTTP_CODES = {
    404: ("not_found", "Unknown path {path}."),
    405: ("method_not_allowed", "Method {method} is not allowed on {path}."),
    413: ("request_too_large", "The request body is larger than {limit} bytes."),
}


def too_large(limit: int | None) -> ApiError:
    """A body over `server.max_body_bytes`."""
    code, template = _HTTP_CODES[413]
    return ApiError(413, template.format(limit=limit), code=code)


def body_timeout() -> ApiError:
    """A body that did not arrive within Quart's BODY_TIMEOUT (its 408, said as Quart says it)."""
    return ApiError(408, str(RequestTimeout.description), code="http_error")


def internal_error(error: BaseException) -> ApiError:
    """What the client hears of an unexpected exception (logged here, with its traceback)."""
    log.error("unhandled error", exc_info=error)
    return ApiError(500, "The gateway failed to handle this request.", code="internal_error")


@asynccontextmanager
async def errors_answered(send: ASGISendCallable) -> AsyncIterator[ASGISendCallable]:
    """A plain ASGI handler's boundary, as `install_error_handlers` is Quart's: an ApiError raised inside
    is sent as its answer, any other exception as the 500. The handler sends through the `send` given
    here; once it has started its response, an exception goes on up, as it does from a Quart body."""
    started = False

    async def send_tracked(message: ASGISendEvent) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        yield send_tracked
    except ApiError as exc:
        if started:
            raise
        await exc.send(send)
    except Exception as exc:
        if started:
            raise
        api_error = first_api_error(exc)
        await (api_error or internal_error(exc)).send(send)


def first_api_error(exc: BaseException) -> ApiError | None:
    """The ApiError a nursery's group carries (as Quart-Trio's handler unwraps it), if any."""
    found: BaseException | None = exc
    while isinstance(found, BaseExceptionGroup):
        matched, _ = found.split(ApiError)
        found = matched.exceptions[0] if matched is not None else None
    return found if isinstance(found, ApiError) else None


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error.response()

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        from quart import request

        status = error.code or 500
        code, template = _HTTP_CODES.get(status, ("http_error", error.description or "HTTP error."))
        message = template.format(
            path=request.path, method=request.method, limit=app.config.get("MAX_CONTENT_LENGTH")
        )
        headers = {}
        if status == 405:
            allowed = error.get_headers()
            headers = {k: v for k, v in allowed if k.lower() == "allow"}
        return ApiError(status, message, code=code, headers=headers).response()

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        return internal_error(error).response()
