"""What every simulated server does with a request first: check Epistula, remember what arrived.

Rejections answer with the Verifier's status (400, or 401 for an unknown signer) and an OpenAI-style
JSON error body, so a test (or an operator with curl) sees exactly which check failed.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from quart import Response, request

from wire.epistula import EpistulaError, Verifier

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 500: "server_error"}


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived, and the status it was answered with."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


def error_response(status: int, message: str, code: str) -> Response:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": code}}
    return Response(json.dumps(body), status=status, content_type="application/json")


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, content_type="application/json")


class Inbox:
    """Verifies each request for one receiver and keeps the last `keep` of them (tests read `received`)."""

    def __init__(self, own_hotkey: str, signers: Iterable[str], *, keep: int = 100) -> None:
        self.verifier = Verifier(own_hotkey, frozenset(signers))
        self.received: collections.deque[Received] = collections.deque(maxlen=keep)

    async def take(self) -> tuple[bytes, Response | None]:
        """The current request's body, and the rejection to answer with when it fails verification."""
        body = await request.get_data()
        assert isinstance(body, bytes)
        try:
            self.verifier.verify(request.headers, body)
        except EpistulaError as exc:
            self.record(body, exc.status)
            return body, error_response(exc.status, str(exc), exc.code)
        return body, None

    def record(self, body: bytes, status: int) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.path, headers, body, status))

    def parse(self, body: bytes) -> tuple[Any, Response | None]:
        """The JSON body, or a 400 (recorded) when it is not JSON."""
        try:
            return json.loads(body) if body.strip() else None, None
        except ValueError:
            self.record(body, 400)
            return None, error_response(400, "the body is not valid JSON", "invalid_json")
