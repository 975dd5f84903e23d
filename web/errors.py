"""OpenAI-style errors: every failure a client sees is `{"error": {message, type, param, code}}`.

Handlers raise `ApiError`; framework errors (unknown route, wrong method, body too large) and
unexpected exceptions are mapped here, at the boundary, so no route returns a bare 500 or a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from quart import Quart, Response
from werkzeug.exceptions import HTTPException

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


_HTTP_CODES = {
    404: ("not_found", "Unknown path {path}."),
    405: ("method_not_allowed", "Method {method} is not allowed on {path}."),
    413: ("request_too_large", "The request body is larger than {limit} bytes."),
}


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
        log.error("unhandled error", exc_info=error)
        return ApiError(500, "The gateway failed to handle this request.", code="internal_error").response()
