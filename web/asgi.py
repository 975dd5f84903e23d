"""The ASGI wrapper every served app runs inside: a response's last write survives the cancellation
that follows it, and a request's close callbacks run however the exchange ends."""

from __future__ import annotations

from collections.abc import Callable

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from quart import request as quart_request

CLOSE_CALLBACKS = "sn1_gateway.close_callbacks"  # ASGI scope key: see `shield_response_end`


def shield_response_end(app: ASGIFramework, limit_s: float) -> ASGIFramework:
    """Let the last body message of each response finish even when the app's task is cancelled, and
    run the request's close callbacks however the exchange ends.

    Quart-Trio cancels its request task as soon as hypercorn reports the response complete, and
    hypercorn does that from inside this very send, before it re-arms the connection's keep-alive
    watch. Cancelled there, an idle keep-alive connection is never closed: neither after
    `keep_alive_timeout` nor at shutdown, which then waits the whole drain deadline. The shield is
    bounded by `limit_s`, so a client that stops reading cannot hold it.

    Handlers append plain callables to `scope[CLOSE_CALLBACKS]`; they run once the app is done with
    the request, also when the client left before a streamed body was ever started (its generator's
    own `finally` then never runs).
    """

    async def app_with_shielded_end(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_end_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True, deadline=trio.current_time() + limit_s):
                    await send(message)
            else:
                await send(message)

        callbacks: list[Callable[[], object]] = []
        scope[CLOSE_CALLBACKS] = callbacks  # type: ignore[literal-required]
        try:
            await app(scope, receive, send_end_shielded)
        finally:
            for callback in callbacks:
                callback()

    return app_with_shielded_end


def on_close(callback: Callable[[], object]) -> None:
    """Run `callback` when the current exchange ends, however it ends (see `shield_response_end`,
    which every served app runs inside)."""
    callbacks: list[Callable[[], object]] = quart_request.scope[CLOSE_CALLBACKS]  # type: ignore[literal-required]
    callbacks.append(callback)
