"""Reading request bodies and parameters into plain values, with 400s that name the parameter."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable
from quart import request

from web.errors import ApiError, body_timeout, too_large
from wire import jsonio


async def json_body(*, allow_empty: bool = False) -> Any:
    """The Quart request's body as JSON (see `parse_json`); a body over the limit is a 413."""
    return parse_json(await request.get_data(cache=False, as_text=False, parse_form_data=False),
                      allow_empty=allow_empty)


class AsgiBody:
    """A plain ASGI request's body, read as Quart reads one: as it comes, while the handler works (so a
    refusal sent before the handler asks for it finds the body read when it came with the head), bounded
    by `max_bytes` (a declared or received length over it is a 413 at once, nothing more is kept)."""

    def __init__(self, headers: Mapping[str, str], receive: ASGIReceiveCallable, *, max_bytes: int) -> None:
        self._receive = receive
        self.max_bytes = max_bytes
        declared = headers.get("content-length")
        self._too_large = declared is not None and declared.isdigit() and int(declared) > max_bytes
        self._data = bytearray()
        self._whole = trio.Event()
        if self._too_large:
            self._whole.set()

    async def receive_all(self, exchange: trio.CancelScope) -> None:
        """Take the body's messages, then wait for the client to leave: its leaving cancels `exchange`."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                exchange.cancel()
                return
            if message["type"] != "http.request" or self._whole.is_set():
                continue
            self._data += message.get("body", b"")
            if len(self._data) > self.max_bytes:
                self._too_large = True
                self._data.clear()
                self._whole.set()
            elif not message.get("more_body", False):
                self._whole.set()

    async def read(self, timeout_s: float | None) -> bytes:
        """The whole body: a 413 when it is over the limit, a 408 when not whole within `timeout_s`."""
        with trio.move_on_after(float("inf") if timeout_s is None else timeout_s) as waiting:
            await self._whole.wait()
        if self._too_large:
            raise too_large(self.max_bytes)
        if waiting.cancelled_caught:
            raise body_timeout()
        return bytes(self._data)


def parse_json(raw: bytes, *, allow_empty: bool = False) -> Any:
    """A request body as JSON; invalid JSON is a 400, and so is JSON nested deeper than
    `jsonio.MAX_DEPTH`.

    The standard library's parser, not orjson: a client may send integers beyond 64 bits and lone
    surrogates, which are valid JSON (see `wire.jsonio`). It recurses once per level, so a body of
    100,000 brackets exhausts the interpreter's stack (RecursionError): that, too, is the client's 400.
    """
    if not raw.strip():
        if allow_empty:
            return None
        raise ApiError(400, "The request body is empty; a JSON body is required.", code="invalid_json")
    try:
        value = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if raw.count(b"{") + raw.count(b"[") > jsonio.MAX_DEPTH:  # fewer brackets cannot nest too deep
        try:
            jsonio.check_depth(value)
        except jsonio.TooDeep:
            raise _too_deep() from None
    return value


def _too_deep() -> ApiError:
    return ApiError(400, f"The request body is not valid JSON: it is nested too deeply (more than "
                    f"{jsonio.MAX_DEPTH} levels of arrays and objects).", code="invalid_json")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a 64-bit float")
    return value


def int_arg(name: str, raw: str | None, *, default: int | None = None, low: int | None = None,
            high: int | None = None) -> int:
    """An integer query parameter within bounds; anything else is a 400 naming it."""
    if raw is None or raw == "":
        if default is None:
            raise ApiError(400, f"The query parameter '{name}' is required.", param=name, code="missing_parameter")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer, not {raw!r}.", param=name,
                       code="invalid_parameter") from None
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if low is not None and high is not None else (
            f"at least {low}" if low is not None else f"at most {high}")
        raise ApiError(400, f"'{name}' must be {bounds}, not {value}.", param=name, code="invalid_parameter")
    return value
