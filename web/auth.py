"""Client authentication: the API key of the current request, checked and counted against its limit.

Routes that need a key call `grant = await authorize(services)` first and add `grant.headers`
(X-RateLimit-Limit / -Remaining / -Reset) to their response; a plain ASGI handler calls
`check_key(services, api_key_of(headers), client_address(scope))`. The key is never logged or echoed.

Failed authentications (a missing or unknown API key, a wrong admin key) are counted per client
address, the ASGI peer (X-Forwarded-For and the like are the client's own words, not trusted):
past `auth.failed_auth_per_minute` within a minute the address gets 429 `too_many_failed_auth`.
A correct API key still passes from a throttled address, so a legitimate client behind a shared
address recovers at once (API keys are 192 random bits: guessing is not the threat, load is); the
admin key is not even compared from a throttled address, correct or not, since an operator may
have chosen a guessable one.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import trio
from hypercorn.typing import HTTPScope, WebsocketScope
from quart import request

from actors.keystore import Denial, Grant, KeyStoreUnavailable
from web.errors import ApiError
from web.services import Services

__all__ = ["Grant", "admin_required", "api_key_of", "authorize", "check_key", "client_address",
           "rate_limit_headers_on_errors", "store_unavailable"]

MISSING_KEY = (
    "Missing API key: send it in the 'api-key' header, or as 'Authorization: Bearer <key>'."
)
STORE_TIMEOUT_S = 5.0


class HeaderLookup(Protocol):
    """Quart's request headers, or a plain dict of lower-cased names (`web.asgi.request_headers`)."""

    def get(self, key: str, default: str, /) -> str: ...


def api_key_of(headers: HeaderLookup) -> str | None:
    """The key from `api-key`, else from `Authorization: Bearer`; None when neither is present."""
    key = headers.get("api-key", "").strip()
    if key:
        return key
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def store_unavailable() -> ApiError:
    return ApiError(503, "The API key store is unavailable; try again shortly.", code="key_store_unavailable")


def peer_address() -> str | None:
    """The current Quart request's peer (see `client_address`)."""
    return client_address(request.scope)


def client_address(scope: HTTPScope | WebsocketScope) -> str | None:
    """A request's peer, as the server saw the connection (None on a unix socket)."""
    client = scope.get("client")
    return str(client[0]) if client else None


def throttled_error(wait_s: int) -> ApiError:
    return ApiError(
        429,
        f"Too many failed authentications from this address; retry in {wait_s} s.",
        code="too_many_failed_auth",
        headers={"Retry-After": str(wait_s)},
    )


def failed(services: Services, error: ApiError, peer: str | None) -> ApiError:
    """`error` (a 401), counted against the peer; or the 429 when the peer is over its limit."""
    wait_s = services.keys.failed_auth.fail(peer)
    return throttled_error(wait_s) if wait_s else error


async def authorize(services: Services) -> Grant:
    """Authorise the current Quart request and count it (see `check_key`)."""
    return await check_key(services, api_key_of(request.headers), peer_address())


async def check_key(services: Services, api_key: str | None, peer: str | None) -> Grant:
    """Authorise a request presenting `api_key` from `peer`, and count it: a Grant, or an ApiError
    (401, 429 or 503)."""
    if api_key is None:
        raise failed(services, ApiError(401, MISSING_KEY, code="missing_api_key"), peer)
    try:
        with trio.fail_after(STORE_TIMEOUT_S):
            verdict = await services.keys.check(api_key)
    except (KeyStoreUnavailable, trio.TooSlowError) as exc:
        raise store_unavailable() from exc
    if isinstance(verdict, Grant):
        return verdict
    if verdict.reason == "unknown":
        raise failed(services, denial_error(verdict), peer)
    raise denial_error(verdict)


@contextmanager
def rate_limit_headers_on_errors(grant: Grant) -> Iterator[None]:
    """An ApiError raised inside carries the grant's X-RateLimit-* headers: the request was counted."""
    try:
        yield
    except ApiError as exc:
        exc.headers = {**grant.headers, **exc.headers}
        raise


def denial_error(denial: Denial) -> ApiError:
    if denial.reason == "unknown":
        return ApiError(401, "Invalid API key: it is unknown or has been revoked.", code="invalid_api_key")
    headers = {
        "Retry-After": str(denial.retry_after_s),
        "X-RateLimit-Limit": str(denial.limit),
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(denial.reset_s),
    }
    if denial.reason == "blocked":
        return ApiError(429, "This API key is blocked: its rate limit is 0 requests per minute.",
                        code="key_blocked", headers=headers)
    return ApiError(
        429,
        f"Rate limit of {denial.limit} requests per minute exceeded; retry in {denial.retry_after_s} s.",
        code="rate_limit_exceeded",
        headers=headers,
    )


def admin_required(services: Services) -> None:
    """The `admin-key` header must match `auth.admin_key` (compared in constant time).

    With no admin key configured the admin endpoints are off: 403. A missing or wrong key: 401, counted
    against the client's address; from an address over its limit, 429 without looking at the key.
    """
    expected = services.settings.auth.admin_key
    if not expected:
        raise ApiError(403, "The admin endpoints are disabled: no admin key is configured (auth.admin_key).",
                       code="admin_disabled")
    peer = peer_address()
    if wait_s := services.keys.failed_auth.refusal(peer):
        raise throttled_error(wait_s)
    given = request.headers.get("admin-key", "")
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise failed(services, ApiError(401, "Missing or wrong admin key (the 'admin-key' header).",
                                        code="invalid_admin_key"), peer)
